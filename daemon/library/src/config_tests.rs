//! PEFT's matching rules for target_modules, rank_pattern and alpha_pattern, case by case.

use std::path::Path;

use super::*;

fn config(extra: &str) -> AdapterConfig {
    let json = format!(r#"{{"peft_type":"LORA","r":8,"lora_alpha":16{extra}}}"#);
    AdapterConfig::parse(Path::new("adapter_config.json"), json.as_bytes()).expect(&json)
}

fn parse_err(json: &str) -> String {
    AdapterConfig::parse(Path::new("dir/adapter_config.json"), json.as_bytes())
        .unwrap_err()
        .to_string()
}

#[test]
fn target_list_matches_names_and_dotted_suffixes() {
    let c = config(r#","target_modules":["q_proj","mlp.fc1"]"#);
    for (module, expected) in [
        ("model.layers.0.self_attn.q_proj", true),
        ("q_proj", true),
        ("model.layers.0.mlp.fc1", true),
        ("model.layers.0.self_attn.xq_proj", false), // suffix must follow a dot
        ("model.layers.0.self_attn.q_proj.inner", false),
        ("model.layers.0.fc1", false),
    ] {
        assert_eq!(c.targets(module), expected, "{module}");
    }
}

#[test]
fn target_string_is_a_full_match_regex() {
    let c = config(r#","target_modules":".*layers\\.1\\..*(q|v)_proj""#);
    assert!(c.targets("model.layers.1.self_attn.q_proj"));
    assert!(!c.targets("model.layers.0.self_attn.q_proj"));
    assert!(
        !c.targets("model.layers.1.self_attn.q_proj.x"),
        "a full match, not a search"
    );
    let all = config(r#","target_modules":"ALL-LINEAR""#);
    assert_eq!(all.target_modules, TargetModules::AllLinear);
    assert!(all.targets("anything.at.all"));
}

#[test]
fn exclude_modules_and_layers_to_transform_narrow_the_targets() {
    let c =
        config(r#","target_modules":["q_proj"],"exclude_modules":["layers.1.self_attn.q_proj"]"#);
    assert!(c.targets("model.layers.0.self_attn.q_proj"));
    assert!(!c.targets("model.layers.1.self_attn.q_proj"));
    let c = config(
        r#","target_modules":["q_proj"],"layers_to_transform":[1],"layers_pattern":"layers""#,
    );
    assert!(!c.targets("model.layers.0.self_attn.q_proj"));
    assert!(c.targets("model.layers.1.self_attn.q_proj"));
    let c = config(r#","target_modules":["q_proj"],"layers_to_transform":0"#);
    assert!(c.targets("model.layers.0.self_attn.q_proj"));
    assert!(!c.targets("model.layers.10.self_attn.q_proj"));
}

#[test]
fn patterns_match_as_peft_does_first_key_in_file_order_wins() {
    let c = config(
        r#","target_modules":["q_proj","fc1"],
           "rank_pattern":{"layers.1.self_attn.q_proj":4,"q_proj":2,"model.layers.0.mlp.fc1":16},
           "alpha_pattern":{"fc.":32,"q_proj":4}"#,
    );
    assert_eq!(
        c.rank_for("model.layers.1.self_attn.q_proj"),
        (4, r#"rank_pattern["layers.1.self_attn.q_proj"]"#.to_owned())
    );
    assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj").0, 2);
    assert_eq!(
        c.rank_for("model.layers.0.mlp.fc1").0,
        16,
        "a key may be the full module name"
    );
    assert_eq!(c.rank_for("model.layers.1.mlp.fc1"), (8, "r".to_owned()));
    assert_eq!(
        c.rank_for("model.layers.1.self_attn.xq_proj").0,
        8,
        "a key matches after a dot only"
    );
    // Keys are regexes anchored at the end: "fc." matches fc1 and fc2.
    assert_eq!(c.alpha_for("model.layers.0.mlp.fc1"), 32.0);
    assert_eq!(c.alpha_for("model.layers.0.self_attn.q_proj"), 4.0);
    assert_eq!(c.alpha_for("model.layers.0.self_attn.k_proj"), 16.0);
    // File order, not alphabetical order, decides.
    let c = config(
        r#","target_modules":["q_proj"],"rank_pattern":{"q_proj":2,"layers.1.self_attn.q_proj":4}"#,
    );
    assert_eq!(c.rank_for("model.layers.1.self_attn.q_proj").0, 2);
}

#[test]
fn scale_is_alpha_over_rank_or_over_its_square_root() {
    let c = config(r#","target_modules":["q_proj"]"#);
    assert_eq!(c.scale(8, 16.0), 2.0);
    let rs = config(r#","target_modules":["q_proj"],"use_rslora":true"#);
    assert_eq!(rs.scale(16, 16.0), 4.0);
}

#[test]
fn type_errors_name_the_file_and_key() {
    let base = r#""peft_type":"LORA","target_modules":["q"]"#;
    for (json, expected) in [
        (
            format!(r#"{{{base},"lora_alpha":8}}"#),
            r#"key "r" is missing"#,
        ),
        (
            format!(r#"{{{base},"r":0,"lora_alpha":8}}"#),
            r#"key "r" must be a positive integer"#,
        ),
        (
            format!(r#"{{{base},"r":8.5,"lora_alpha":8}}"#),
            r#"key "r" must be a positive integer"#,
        ),
        (
            format!(r#"{{{base},"r":8}}"#),
            r#"key "lora_alpha" is missing"#,
        ),
        (
            format!(r#"{{{base},"r":8,"lora_alpha":"8"}}"#),
            r#"key "lora_alpha" must be a finite number"#,
        ),
        (
            format!(r#"{{{base},"r":8,"lora_alpha":8,"use_rslora":1}}"#),
            r#"key "use_rslora" must be true or false"#,
        ),
        (
            format!(r#"{{{base},"r":8,"lora_alpha":8,"rank_pattern":{{"q":-1}}}}"#),
            r#"key "rank_pattern" entry "q""#,
        ),
        (
            format!(r#"{{{base},"r":8,"lora_alpha":8,"rank_pattern":{{"(q":4}}}}"#),
            "not a valid regular expression",
        ),
        (
            r#"{"peft_type":"LORA","r":8,"lora_alpha":8}"#.to_owned(),
            r#"key "target_modules" is missing"#,
        ),
        (
            r#"{"peft_type":"LORA","r":8,"lora_alpha":8,"target_modules":7}"#.to_owned(),
            r#"key "target_modules" must be a list"#,
        ),
        (r#"{"r":8,"r":9}"#.to_owned(), "duplicate key \"r\""),
        ("{".to_owned(), "not valid JSON"),
    ] {
        let msg = parse_err(&json);
        assert!(msg.contains("dir/adapter_config.json"), "{msg}");
        assert!(msg.contains(expected), "{json}: {msg:?} lacks {expected:?}");
    }
}
