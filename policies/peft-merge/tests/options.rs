//! peft-merge's options beyond the arithmetic: sign election methods on a crafted example,
//! DARE's seed, and refusals that name what is wrong.

mod common;

use common::*;
use moerge_sdk::testing::{fake_hash, TestExpert, TestModule};

const UNIT: &str = "model.layers.0.mlp.gate";

/// An expert whose only module is 1x1 with `A = [1]`, `B = [b]`: delta `b`.
fn scalar_expert(name: &str, b: f32) -> TestExpert {
    TestExpert {
        name: name.to_owned(),
        hash: fake_hash(name),
        tasks: vec![],
        modules: vec![TestModule {
            module: UNIT.to_owned(),
            rank: 1,
            in_features: 1,
            out_features: 1,
            scale: 1.0,
            a: vec![1.0],
            b: vec![b],
        }],
    }
}

#[test]
fn frequency_and_total_elect_different_signs() {
    // Deltas +1, +1, -5: the sum is negative (total elects -, keeps -5 alone), but two of three
    // are positive (frequency elects +, averages 1 and 1).
    let experts = [
        scalar_expert("a", 1.0),
        scalar_expert("b", 1.0),
        scalar_expert("c", -5.0),
    ];
    for combination in ["ties", "ties_svd", "dare_ties", "dare_ties_svd"] {
        for (method, want) in [("total", -5.0), ("frequency", 1.0)] {
            let params = [
                ("combination_type", combination),
                ("density", "1"),
                ("weights", "1,1,1"),
                ("majority_sign_method", method),
            ];
            let fitted = fit(&experts, &params).unwrap();
            let got = product(&fitted, UNIT)[0];
            assert!((got - want).abs() < 1e-6, "{combination} {method}: {got}");
        }
    }
}

#[test]
fn dare_is_reproducible_from_its_seed() {
    let experts = equal_rank_experts();
    for combination in [
        "dare_linear",
        "dare_ties",
        "dare_linear_svd",
        "dare_ties_svd",
    ] {
        let run = |seed: &str| {
            let params = [
                ("combination_type", combination),
                ("density", "0.5"),
                ("seed", seed),
            ];
            fit(&experts, &params).unwrap().tensors
        };
        assert_eq!(run("11"), run("11"), "{combination}: same seed");
        assert_ne!(run("11"), run("12"), "{combination}: different seeds");
    }
    // The pruning-by-magnitude types draw nothing: the seed changes nothing.
    let run = |seed: &str| {
        let params = [("combination_type", "ties"), ("seed", seed)];
        fit(&experts, &params).unwrap().tensors
    };
    assert_eq!(run("1"), run("2"));
}

fn check_refused(experts: &[TestExpert], params: &[(&str, &str)], words: &[&str]) {
    let err = fit(experts, params).expect_err("should be refused");
    for w in words {
        assert!(err.contains(w), "{params:?}: {err:?} lacks {w:?}");
    }
}

#[test]
fn refusals_name_what_is_wrong() {
    let mixed = mixed_rank_experts();
    let equal = equal_rank_experts();
    // Low-rank space with unequal ranks: the module, both experts, their ranks, the way out.
    // Modules go in sorted order, so fc1 (ranks 2 and 3 in a and b) is the first refused.
    check_refused(
        &mixed,
        &[("combination_type", "dare_ties")],
        &[
            FC,
            "rank 2 in expert a",
            "rank 3 in expert b",
            "dare_ties_svd",
        ],
    );
    check_refused(&mixed, &[], &["combination_type=ties", FC, "ties_svd"]);
    check_refused(
        &equal,
        &[("weights", "1,2")],
        &["weights", "2 values for 3 experts"],
    );
    check_refused(
        &equal,
        &[("weights", "1,x,2")],
        &["weights", "not a comma-separated list"],
    );
    check_refused(&equal, &[("weights", "1,inf,2")], &["weights", "finite"]);
    check_refused(&equal, &[("density", "1.5")], &["density", "out of range"]);
    check_refused(&equal, &[("density", "-0.1")], &["density", "out of range"]);
    check_refused(
        &equal,
        &[("combination_type", "dare_linear"), ("density", "0")],
        &["density=0", "dare_linear"],
    );
    check_refused(
        &equal,
        &[("combination_type", "ties"), ("svd_rank", "2")],
        &["svd_rank", "_svd", "ties"],
    );
    check_refused(
        &equal,
        &[("combination_type", "svd")],
        &["combination_type"],
    );
    check_refused(
        &equal,
        &[("majority_sign_method", "mean")],
        &["majority_sign_method"],
    );
    // Density 0 is fine where nothing is divided by it: everything is pruned.
    let fitted = fit(
        &equal,
        &[("combination_type", "ties_svd"), ("density", "0")],
    )
    .unwrap();
    assert!(product(&fitted, Q).iter().all(|x| *x == 0.0));
}
