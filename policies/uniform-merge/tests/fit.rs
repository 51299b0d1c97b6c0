//! `uniform-merge` through the SDK's testing harness (the host's ABI path).

use moerge_policy_uniform_merge::moerge_policy_declaration;
use moerge_sdk::plan::{MergeSpace, ModulePlan};
use moerge_sdk::testing::{random_expert, FitRequest, Harness, TestExpert, TestServices};

fn experts(ranks: &[usize]) -> Vec<TestExpert> {
    let modules = [
        ("model.layers.0.q_proj", 8, 8),
        ("model.layers.1.q_proj", 8, 8),
    ];
    let names = ["a", "b", "c", "d"];
    (ranks.iter().enumerate())
        .map(|(i, &r)| random_expert(names[i], &modules, r, i as u64))
        .collect()
}

fn check(ranks: &[usize], params: &[(&str, &str)], expected: Result<ModulePlan, &str>) {
    let harness = Harness::new(moerge_policy_declaration);
    let experts = experts(ranks);
    let services = TestServices::new();
    let got = harness.fit(&FitRequest::new(&experts).params(params), &services);
    match (got, expected) {
        (Ok(fitted), Ok(plan)) => {
            assert_eq!(fitted.plan.default, plan);
            assert!(fitted.plan.modules.is_empty() && fitted.tensors.is_empty());
            let names: Vec<&str> = fitted
                .plan
                .experts
                .iter()
                .map(|e| e.name.as_str())
                .collect();
            assert_eq!(names, ["a", "b", "c", "d"][..ranks.len()]);
        }
        (Err(e), Err(words)) => assert!(e.to_string().contains(words), "{e}"),
        (got, want) => panic!("{params:?}: got {got:?}, want {want:?}"),
    }
    assert!(
        services.calls().is_empty(),
        "uniform-merge needs no service"
    );
}

fn static_plan(n: usize, space: MergeSpace, svd_rank: Option<usize>) -> ModulePlan {
    ModulePlan::Static {
        weights: vec![1.0 / n as f64; n],
        space,
        svd_rank,
    }
}

#[test]
fn uniform_weights_in_each_space() {
    check(
        &[2, 2, 2],
        &[],
        Ok(static_plan(3, MergeSpace::LowRank, None)),
    );
    check(
        &[2, 4],
        &[("space", "exact")],
        Ok(static_plan(2, MergeSpace::Exact, None)),
    );
    check(
        &[2, 2, 2, 2],
        &[("space", "folded"), ("svd_rank", "3")],
        Ok(static_plan(4, MergeSpace::Folded, Some(3))),
    );
}

#[test]
fn refusals_name_the_parameter() {
    check(
        &[2, 4],
        &[],
        Err("module model.layers.0.q_proj has rank 2 in a and 4 in b"),
    );
    check(
        &[2, 2],
        &[("svd_rank", "2")],
        Err("svd_rank needs space=exact"),
    );
    check(&[2, 2], &[("svd_rank", "0")], Err("svd_rank"));
    check(
        &[2, 2],
        &[("space", "deep")],
        Err("one of lowrank, exact, folded"),
    );
}
