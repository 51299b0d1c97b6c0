//! The conflict measures against a dense computation written here: every delta formed entry by
//! entry with loops, a layer's deltas laid side by side, cosines and signs counted directly.

use moerge_policy_layerwise::conflict::{
    cosine_dispersion, delta_inner, layer_conflicts, layer_key, layers, sign_disagreement,
    ConflictError, Layer, Measure,
};
use moerge_sdk::policy::ExpertView;
use moerge_sdk::testing::{random_expert, TestExpert, TestModule};

const MODULES: [(&str, usize, usize); 4] = [
    ("model.layers.2.self_attn.q", 6, 4),
    ("model.layers.2.mlp.fc1", 6, 5),
    ("model.layers.10.self_attn.q", 6, 4),
    ("lm_head", 6, 7),
];

/// `scale · B A` entry by entry, row-major `[out, in]`.
fn dense(m: &TestModule) -> Vec<f64> {
    let mut out = vec![0.0; m.out_features * m.in_features];
    for o in 0..m.out_features {
        for i in 0..m.in_features {
            let mut sum = 0.0;
            for t in 0..m.rank {
                sum += f64::from(m.b[o * m.rank + t]) * f64::from(m.a[t * m.in_features + i]);
            }
            out[o * m.in_features + i] = m.scale * sum;
        }
    }
    out
}

/// Each expert's deltas over `modules` side by side, zeros where it lacks one.
fn flat(experts: &[TestExpert], modules: &[&str]) -> Vec<Vec<f64>> {
    experts
        .iter()
        .map(|e| {
            let mut v = Vec::new();
            for &name in modules {
                let (_, inputs, out) = MODULES.iter().find(|(m, _, _)| *m == name).unwrap();
                match e.modules.iter().find(|m| m.module == name) {
                    Some(m) => v.extend(dense(m)),
                    None => v.extend(vec![0.0; inputs * out]),
                }
            }
            v
        })
        .collect()
}

fn dot(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

fn reference_cosine(deltas: &[Vec<f64>]) -> f64 {
    let (mut sum, mut pairs) = (0.0, 0);
    for i in 0..deltas.len() {
        for j in i + 1..deltas.len() {
            let (ni, nj) = (dot(&deltas[i], &deltas[i]), dot(&deltas[j], &deltas[j]));
            if ni > 0.0 && nj > 0.0 {
                sum += dot(&deltas[i], &deltas[j]) / (ni * nj).sqrt();
                pairs += 1;
            }
        }
    }
    if pairs == 0 {
        0.0
    } else {
        1.0 - sum / pairs as f64
    }
}

fn reference_sign(deltas: &[Vec<f64>]) -> f64 {
    let (mut total, mut entries) = (0.0, 0);
    for k in 0..deltas[0].len() {
        let positive = deltas.iter().filter(|d| d[k] > 0.0).count() as f64;
        let negative = deltas.iter().filter(|d| d[k] < 0.0).count() as f64;
        if positive + negative > 0.0 {
            total += 1.0 - (positive - negative).abs() / (positive + negative);
            entries += 1;
        }
    }
    if entries == 0 {
        0.0
    } else {
        total / entries as f64
    }
}

/// Three experts of different ranks and scales; `c` lacks a module of layer 2 and all of
/// layer 10, and one row of its `lm_head` B is zero (so its entries there are exactly 0).
fn mixed_experts() -> Vec<TestExpert> {
    let a = random_expert("a", &MODULES, 2, 1);
    let mut b = random_expert("b", &MODULES, 3, 2);
    b.modules.iter_mut().for_each(|m| m.scale = 0.5);
    let mut c = random_expert("c", &MODULES, 2, 3);
    c.modules
        .retain(|m| !m.module.starts_with("model.layers.10") && m.module != MODULES[1].0);
    let head = c
        .modules
        .iter_mut()
        .find(|m| m.module == "lm_head")
        .unwrap();
    head.b[..2].iter_mut().for_each(|x| *x = 0.0);
    head.scale = 2.0;
    vec![a, b, c]
}

fn views(experts: &[TestExpert]) -> Vec<ExpertView<'_>> {
    experts.iter().map(TestExpert::view).collect()
}

#[test]
fn layers_group_modules_by_their_first_index() {
    let check = |module: &str, key: &str, index: Option<usize>| {
        assert_eq!(layer_key(module), (key.to_owned(), index), "{module}");
    };
    check("model.layers.3.mlp.fc1", "model.layers.3", Some(3));
    check("model.layers.10.self_attn.q", "model.layers.10", Some(10));
    check("transformer.h.0.attn", "transformer.h.0", Some(0));
    check("a.007.b", "a.007", Some(7));
    check("lm_head", "lm_head", None);
    check("model.layers.x1.q", "model.layers.x1.q", None);

    let experts = mixed_experts();
    let got = layers(&views(&experts)).unwrap();
    let keys: Vec<(&str, Option<usize>, Vec<&str>)> = got
        .iter()
        .map(|l| {
            let modules = l.modules.iter().map(String::as_str).collect();
            (l.key.as_str(), l.index, modules)
        })
        .collect();
    assert_eq!(
        keys,
        [
            (
                "model.layers.2",
                Some(2),
                vec!["model.layers.2.mlp.fc1", "model.layers.2.self_attn.q"]
            ),
            (
                "model.layers.10",
                Some(10),
                vec!["model.layers.10.self_attn.q"]
            ),
            ("lm_head", None, vec!["lm_head"]),
        ]
    );
}

#[test]
fn measures_match_a_dense_computation() {
    let experts = mixed_experts();
    let views = views(&experts);
    // The factor inner product against the dense one, across ranks and scales.
    for module in [MODULES[0].0, MODULES[3].0] {
        let x = views[0].module(module).unwrap();
        let y = views[1].module(module).unwrap();
        let z = views[2].module(module).unwrap();
        let d = flat(&experts, &[module]);
        for (got, want) in [
            (delta_inner(x, y), dot(&d[0], &d[1])),
            (delta_inner(y, z), dot(&d[1], &d[2])),
            (delta_inner(z, z), dot(&d[2], &d[2])),
        ] {
            assert!(
                (got - want).abs() < 1e-9 * want.abs().max(1.0),
                "{module}: {got} vs {want}"
            );
        }
    }
    let conflicts_cos = layer_conflicts(&views, Measure::Cosine).unwrap();
    let conflicts_sign = layer_conflicts(&views, Measure::Sign).unwrap();
    for (i, layer) in layers(&views).unwrap().iter().enumerate() {
        let modules: Vec<&str> = layer.modules.iter().map(String::as_str).collect();
        let deltas = flat(&experts, &modules);
        let (cos, sign) = (reference_cosine(&deltas), reference_sign(&deltas));
        assert!(
            cos > 0.1 && sign > 0.1,
            "{}: random experts conflict",
            layer.key
        );
        let got_cos = cosine_dispersion(&views, layer);
        let got_sign = sign_disagreement(&views, layer);
        assert!(
            (got_cos - cos).abs() < 1e-9,
            "{}: {got_cos} vs {cos}",
            layer.key
        );
        assert!(
            (got_sign - sign).abs() < 1e-12,
            "{}: {got_sign} vs {sign}",
            layer.key
        );
        assert_eq!(conflicts_cos[i].layer, *layer);
        assert_eq!(
            (conflicts_cos[i].score, conflicts_sign[i].score),
            (got_cos, got_sign)
        );
    }
    // Layer 10: only a and b adapt it, so the dispersion is theirs alone.
    let layer10 = &conflicts_cos[1];
    let d = flat(&experts, &["model.layers.10.self_attn.q"]);
    let cos_ab = dot(&d[0], &d[1]) / (dot(&d[0], &d[0]) * dot(&d[1], &d[1])).sqrt();
    assert!((layer10.score - (1.0 - cos_ab)).abs() < 1e-9);
}

#[test]
fn identical_experts_do_not_conflict_and_opposite_ones_conflict_most() {
    let a = random_expert("a", &MODULES, 2, 5);
    let mut same = random_expert("same", &MODULES, 2, 5);
    // Same delta, different factors: B·2 and scale/2.
    for m in &mut same.modules {
        m.b.iter_mut().for_each(|x| *x *= 2.0);
        m.scale = 0.5;
    }
    let mut opposite = random_expert("opposite", &MODULES, 2, 5);
    opposite
        .modules
        .iter_mut()
        .for_each(|m| m.b.iter_mut().for_each(|x| *x = -*x));
    let check = |experts: &[TestExpert], cos: f64, sign: f64| {
        let views = views(experts);
        for layer in layers(&views).unwrap() {
            let got = (
                cosine_dispersion(&views, &layer),
                sign_disagreement(&views, &layer),
            );
            assert!((got.0 - cos).abs() < 1e-9, "{}: {got:?}", layer.key);
            assert!((got.1 - sign).abs() < 1e-12, "{}: {got:?}", layer.key);
        }
    };
    check(&[a.clone(), same.clone()], 0.0, 0.0);
    check(&[a.clone(), same, a.clone()], 0.0, 0.0);
    check(&[a.clone(), opposite.clone()], 2.0, 1.0);
    // Two against one: every pair's cosine is 1 or -1, every entry splits 2:1.
    check(
        &[a.clone(), a.clone(), opposite],
        4.0 / 3.0,
        1.0 - 1.0 / 3.0,
    );
    // One expert has nothing to disagree with.
    check(&[a], 0.0, 0.0);
}

#[test]
fn an_empty_layer_scores_zero() {
    let experts = [random_expert("a", &MODULES, 2, 1)];
    let layer = Layer {
        key: "model.layers.9".into(),
        index: Some(9),
        modules: vec!["model.layers.9.q".into()],
    };
    let views = views(&experts);
    assert_eq!(cosine_dispersion(&views, &layer), 0.0);
    assert_eq!(sign_disagreement(&views, &layer), 0.0);
}

#[test]
fn experts_of_different_shapes_are_refused() {
    let a = random_expert("a", &MODULES, 2, 1);
    let b = random_expert("b", &[("model.layers.2.mlp.fc1", 6, 3)], 2, 2);
    let err = layers(&views(&[a, b])).unwrap_err();
    assert!(matches!(err, ConflictError::Shape { .. }));
    let msg = err.to_string();
    for word in [
        "model.layers.2.mlp.fc1",
        "expert b",
        "3x6",
        "expert a",
        "5x6",
    ] {
        assert!(msg.contains(word), "{msg:?} lacks {word:?}");
    }
}
