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

fn arrow_plan(experts: &[Adapter], top_k: usize) -> moerge_sdk::plan::Plan {
    use moerge_sdk::plan::*;
    common::plan_of(
        experts,
        ModulePlan::Routed {
            router: Router::Arrow,
            top_k,
            temperature: 1.0,
            granularity: Granularity::Token,
            groups: Vec::new(),
            mix: Default::default(),
        },
    )
}

#[test]
fn arrow_routing_equals_peft_with_exact_prototypes() {
    use moerge_engine::{inference, BaseModel, Precision};
    for base_name in ["dev-phi", "dev-llama"] {
        let names = ["swapcase", "rot13", "twice", "length", "minus"];
        let experts: Vec<Adapter> = names
            .iter()
            .map(|n| Adapter::load(&fixtures().join(base_name).join("adapters").join(n)).unwrap())
            .collect();
        let base = BaseModel::load_dir(&fixtures().join(base_name), Precision::F32).unwrap();
        for k in [2, 3] {
            let model = base
                .with_plan(&arrow_plan(&experts, k), &experts, &Default::default())
                .unwrap();
            let file = format!("arrow_top{k}_exactproto_logits.safetensors");
            for (i, (ids, want)) in common::reference_sequences(base_name, &file, "logits")
                .into_iter()
                .enumerate()
            {
                let got = inference::logits(&model, &ids).unwrap();
                let diff = common::max_abs_diff(&got, &want);
                assert!(
                    diff <= 1e-4,
                    "{base_name} top-{k} sequence {i}: max |diff| {diff}"
                );
            }
        }
    }
}

#[test]
fn arrow_routing_weights_equal_peft_per_token_and_module() {
    use moerge_engine::{inference, routing, BaseModel, Precision};
    let names = ["swapcase", "rot13", "twice", "length", "minus"];
    for (base_name, k) in [("dev-phi", 2), ("dev-llama", 3)] {
        let experts: Vec<Adapter> = names
            .iter()
            .map(|n| Adapter::load(&fixtures().join(base_name).join("adapters").join(n)).unwrap())
            .collect();
        let base = BaseModel::load_dir(&fixtures().join(base_name), Precision::F32).unwrap();
        let model = base
            .with_plan(&arrow_plan(&experts, k), &experts, &Default::default())
            .unwrap();
        let file = fixtures().join(base_name).join(format!(
            "reference/arrow_top{k}_exactproto_routing.safetensors"
        ));
        let reference = candle_core::safetensors::load(file, &Device::Cpu).unwrap();
        let sequences = common::reference_sequences(
            base_name,
            &format!("arrow_top{k}_exactproto_logits.safetensors"),
            "logits",
        );
        for (i, (ids, _)) in sequences.iter().enumerate() {
            let (_, records) = routing::trace(&model, ids).unwrap();
            assert_eq!(
                records.len(),
                experts[0].modules().len(),
                "one record per routed module"
            );
            for record in &records {
                let want = &reference[&format!("{}.coeff.{i}", record.module)];
                let diff = common::max_abs_diff(&record.weights, want);
                assert!(
                    diff < 1e-4,
                    "{base_name} {} sequence {i}: max |diff| {diff}",
                    record.module
                );
                // At most k experts per token carry weight (a far-behind one may underflow to
                // 0), and the weights of a token sum to 1.
                for row in record.weights.to_vec2::<f32>().unwrap() {
                    assert!(row.iter().filter(|w| **w > 0.0).count() <= k);
                    assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                }
            }
        }
        // Outside a trace nothing is recorded (and nothing is kept).
        let mut untraced = moerge_engine::ForwardState::new();
        inference::logits_in(&model, &sequences[0].0, &mut untraced).unwrap();
        assert!(untraced.take_trace().is_empty());
    }
}
