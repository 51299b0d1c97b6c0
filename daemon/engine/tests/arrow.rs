//! Arrow prototypes against the fixtures' float64 SVD of the dense `B A` (computed by the
//! fixture's author with numpy, largest-magnitude component positive).

mod common;

use candle_core::Device;
use common::fixtures;
use moerge_engine::arrow;
use moerge_library::Adapter;

#[test]
fn prototypes_equal_the_dense_svd() {
    for base in ["dev-phi", "dev-llama"] {
        let reference = candle_core::safetensors::load(
            fixtures()
                .join(base)
                .join("reference/arrow_prototypes.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let names = ["swapcase", "rot13", "twice", "length", "minus"];
        let experts: Vec<Adapter> = names
            .iter()
            .map(|n| Adapter::load(&fixtures().join(base).join("adapters").join(n)).unwrap())
            .collect();
        let mut checked = 0;
        for module in experts[0].modules().keys() {
            let want = reference[&format!("{module}.exact_svd")]
                .to_vec2::<f32>()
                .unwrap();
            for (e, expert) in experts.iter().enumerate() {
                let got = arrow::prototype(expert, &expert.modules()[module]);
                let worst = got
                    .iter()
                    .zip(&want[e])
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst < 1e-4,
                    "{base} {module} expert {}: max |diff| {worst}",
                    names[e]
                );
                checked += 1;
            }
        }
        assert!(checked >= 50, "{checked}");
    }
}
