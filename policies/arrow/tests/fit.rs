//! `arrow` through the SDK's testing harness (the host's ABI path).

use moerge_policy_arrow::moerge_policy_declaration;
use moerge_sdk::plan::{Granularity, Mix, ModulePlan, Router};
use moerge_sdk::testing::{random_expert, FitRequest, Harness, TestExpert, TestServices};

fn experts(n: usize) -> Vec<TestExpert> {
    let modules = [("model.layers.0.mlp.fc1", 6, 4)];
    (0..n)
        .map(|i| random_expert(&format!("e{i}"), &modules, 2, i as u64))
        .collect()
}

type Expected<'a> = Result<(usize, f64, Granularity, Mix), &'a str>;

fn check(n: usize, params: &[(&str, &str)], expected: Expected<'_>) {
    let harness = Harness::new(moerge_policy_declaration);
    let experts = experts(n);
    let services = TestServices::new();
    match (
        harness.fit(&FitRequest::new(&experts).params(params), &services),
        expected,
    ) {
        (Ok(fitted), Ok((top_k, temperature, granularity, mix))) => {
            assert_eq!(
                fitted.plan.default,
                ModulePlan::Routed {
                    router: Router::Arrow,
                    top_k,
                    temperature,
                    granularity,
                    groups: vec![],
                    mix,
                }
            );
            assert_eq!(fitted.plan.experts.len(), n);
            assert!(fitted.tensors.is_empty() && services.calls().is_empty());
        }
        (Err(e), Err(words)) => assert!(e.to_string().contains(words), "{e}"),
        (got, want) => panic!("{params:?}: got {got:?}, want {want:?}"),
    }
}

#[test]
fn routed_plans_with_clipped_top_k() {
    check(6, &[], Ok((4, 1.0, Granularity::Token, Mix::Outputs)));
    check(3, &[], Ok((3, 1.0, Granularity::Token, Mix::Outputs)));
    check(
        3,
        &[("mix", "factors")],
        Ok((3, 1.0, Granularity::Token, Mix::Factors)),
    );
    check(3, &[("mix", "weights")], Err("one of outputs, factors"));
    check(
        6,
        &[
            ("top_k", "2"),
            ("temperature", "0.5"),
            ("granularity", "sequence"),
        ],
        Ok((2, 0.5, Granularity::Sequence, Mix::Outputs)),
    );
    check(6, &[("top_k", "0")], Err("top_k"));
    check(6, &[("temperature", "0")], Err("temperature"));
    check(
        6,
        &[("granularity", "layer")],
        Err("one of token, sequence"),
    );
}
