//! A forward pass split over threads carries its request state with it: routing traces,
//! sequence-routing sums and ensemble member blocks come back exactly as one thread makes
//! them. Under `cargo test` candle itself runs multithreaded, so the engine would not split
//! on its own; these tests force the split through `ForwardState::with_threads`.

mod common;

use candle_core::{Device, Tensor};
use common::{fixtures, max_abs_diff, plan_of};
use moerge_engine::routing::RoutingRecord;
use moerge_engine::{BaseModel, ForwardState, FusedModel, LanguageModel, Precision};
use moerge_library::Adapter;
use moerge_sdk::plan::{Ensemble, EnsembleLevel, Granularity, Member, ModulePlan, Plan, Router};

const NAMES: [&str; 3] = ["swapcase", "rot13", "twice"];

fn setup() -> (BaseModel, Vec<Adapter>) {
    let base = BaseModel::load_dir(&fixtures().join("dev-phi"), Precision::F32).unwrap();
    let experts = NAMES
        .iter()
        .map(|n| Adapter::load(&fixtures().join("dev-phi/adapters").join(n)).unwrap())
        .collect();
    (base, experts)
}

fn arrow(top_k: usize, temperature: f64) -> ModulePlan {
    ModulePlan::Routed {
        router: Router::Arrow,
        top_k,
        temperature,
        granularity: Granularity::Sequence,
        groups: vec![],
        mix: Default::default(),
    }
}

/// Three members routing the same experts differently (sequence-level Arrow, so each keeps
/// running sums): stacked, since none folds a merge into the base weights.
fn routed_ensemble(base: &BaseModel, experts: &[Adapter]) -> FusedModel {
    let members = [(1, 1.0), (2, 1.0), (2, 0.5)]
        .into_iter()
        .map(|(k, t)| Member {
            weight: 1.0 / 3.0,
            default: arrow(k, t),
            modules: Default::default(),
        })
        .collect();
    let ensemble = Ensemble {
        level: EnsembleLevel::Probability,
        members,
    };
    let model = base
        .fuse(
            &Plan {
                ensemble: Some(ensemble),
                ..plan_of(experts, ModulePlan::None)
            },
            experts,
        )
        .unwrap();
    let FusedModel::Ensemble(e) = &model else {
        panic!("an ensemble plan fuses into an ensemble")
    };
    assert!(e.is_stacked());
    model
}

fn ids(rows: &[&[u32]]) -> Tensor {
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
}

/// Prefill then three decoding steps in one state; every step's scores and the trace.
fn decode(
    model: &impl LanguageModel,
    threads: usize,
    rows: &[&[u32]],
) -> (Vec<Tensor>, Vec<RoutingRecord>) {
    let mut state = ForwardState::tracing().with_threads(threads);
    let mut outputs = vec![model.forward(&ids(rows), &mut state).unwrap()];
    for step in 0..3u32 {
        let next: Vec<Vec<u32>> = (0..rows.len() as u32)
            .map(|r| vec![40 + 7 * step + r])
            .collect();
        let next: Vec<&[u32]> = next.iter().map(Vec::as_slice).collect();
        outputs.push(model.forward_last(&ids(&next), &mut state).unwrap());
    }
    (outputs, state.take_trace())
}

fn assert_same(
    label: &str,
    one: &(Vec<Tensor>, Vec<RoutingRecord>),
    many: &(Vec<Tensor>, Vec<RoutingRecord>),
) {
    for (step, (a, b)) in one.0.iter().zip(&many.0).enumerate() {
        let diff = max_abs_diff(a, b);
        assert!(diff < 1e-5, "{label}: step {step} scores differ by {diff}");
    }
    assert!(!one.1.is_empty(), "{label}: nothing was traced");
    let names = |t: &[RoutingRecord]| t.iter().map(|r| r.module.clone()).collect::<Vec<_>>();
    assert_eq!(names(&one.1), names(&many.1), "{label}: trace order");
    for (a, b) in one.1.iter().zip(&many.1) {
        assert_eq!(a.units, b.units, "{label}: {}", a.module);
        let diff = max_abs_diff(&a.weights, &b.weights);
        assert!(
            diff < 1e-6,
            "{label}: {} weights differ by {diff}",
            a.module
        );
    }
}

#[test]
fn a_stacked_ensemble_split_over_threads_traces_and_decodes_as_one_thread() {
    let (base, experts) = setup();
    let model = routed_ensemble(&base, &experts);
    let rows: [&[u32]; 2] = [&[72, 101, 76, 76, 111, 62], &[5, 77, 3, 140, 9, 200]];
    let one = decode(&model, 1, &rows);
    // Every member's every routed module, at every step: 3 members x 4 forwards.
    let routed_modules = experts[0].modules().len();
    assert_eq!(one.1.len(), 3 * 4 * routed_modules);
    assert!(one.1.iter().any(|r| r.module.ends_with("#2")));
    for threads in [2, 3] {
        assert_same(
            &format!("{threads} threads"),
            &one,
            &decode(&model, threads, &rows),
        );
    }
    // The members run one after another (their own states) give the same numbers.
    let FusedModel::Ensemble(e) = &model else {
        unreachable!()
    };
    let sequential = decode(&e.sequential(), 2, &rows);
    for (a, b) in one.0.iter().zip(&sequential.0) {
        assert!(max_abs_diff(a, b) < 1e-4);
    }
}

#[test]
fn batch_rows_split_over_threads_trace_and_decode_as_one_thread() {
    let (base, experts) = setup();
    let model = base
        .fuse(&plan_of(&experts, arrow(2, 1.0)), &experts)
        .unwrap();
    let rows: [&[u32]; 3] = [&[72, 101, 76, 76], &[5, 77, 3, 140], &[9, 200, 31, 62]];
    let one = decode(&model, 1, &rows);
    assert_eq!(
        one.1[0].weights.dims(),
        &[12, 3],
        "one record holds every row"
    );
    for threads in [2, 3] {
        assert_same(
            &format!("{threads} threads"),
            &one,
            &decode(&model, threads, &rows),
        );
    }
}
