//! Every way an adapter folder is refused, one damaged copy of a real PEFT adapter per case.
//!
//! Each case copies `dev-phi/adapters/rot13` into a temporary folder named `victim`, applies
//! one mutation, and checks that `Adapter::load` fails with a message naming the file and
//! the tensor or key at fault plus a word for what is wrong, and that `inspect_adapter`
//! reports `rejected` with the same message.

mod support;

use std::path::Path;

use moerge_library::{inspect_adapter, Adapter, AdapterState};
use serde_json::{json, Map, Value};
use support::*;

const CONFIG: &str = "victim/adapter_config.json";
const WEIGHTS: &str = "victim/adapter_model.safetensors";
/// The first two tensors of the file (offsets 0..3072 and 3072..9216).
const A0: &str = "base_model.model.model.layers.0.mlp.fc1.lora_A.weight";
const B0: &str = "base_model.model.model.layers.0.mlp.fc1.lora_B.weight";

fn config(dir: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let path = dir.join("adapter_config.json");
    let mut value = read_json(&path);
    edit(value.as_object_mut().unwrap());
    write_json(&path, &value);
}

fn tensors(dir: &Path, edit: impl FnOnce(&mut Vec<Tensor>)) {
    let path = dir.join("adapter_model.safetensors");
    let mut ts = read_tensors(&path);
    edit(&mut ts);
    write_tensors(&path, &ts);
}

fn tensor<'a>(ts: &'a mut [Tensor], name: &str) -> &'a mut Tensor {
    ts.iter_mut().find(|t| t.name == name).unwrap()
}

fn extra(ts: &mut Vec<Tensor>, name: &str) {
    ts.push(Tensor::f32(name, &[4], &[0.5; 4]));
}

/// Edits the header map and data area without fixing anything up.
fn raw(dir: &Path, edit: impl FnOnce(&mut Map<String, Value>, &mut Vec<u8>)) {
    let path = dir.join("adapter_model.safetensors");
    let (mut header, mut data) = read_raw(&path);
    edit(&mut header, &mut data);
    write_raw(&path, &header, &data);
}

fn bytes(dir: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let path = dir.join("adapter_model.safetensors");
    let mut b = std::fs::read(&path).unwrap();
    edit(&mut b);
    std::fs::write(&path, b).unwrap();
}

fn set_f32(t: &mut Tensor, index: usize, value: f32) {
    t.data[4 * index..4 * index + 4].copy_from_slice(&value.to_le_bytes());
}

fn check(label: &str, mutate: fn(&Path), expected: &[&str]) -> Result<(), String> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("victim");
    copy_adapter(&adapter_dir("dev-phi", "rot13"), &dir);
    mutate(&dir);
    let msg = match Adapter::load(&dir) {
        Ok(_) => return Err(format!("{label}: loaded, expected a refusal")),
        Err(e) => e.to_string(),
    };
    if let Some(missing) = expected.iter().find(|e| !msg.contains(*e)) {
        return Err(format!("{label}: {msg:?} lacks {missing:?}"));
    }
    let report = inspect_adapter(&dir, None);
    if report.state
        != (AdapterState::Rejected {
            reason: msg.clone(),
        })
    {
        return Err(format!(
            "{label}: inspect says {:?}, load said {msg:?}",
            report.state
        ));
    }
    Ok(())
}

type Case = (&'static str, fn(&Path), &'static [&'static str]);

const CASES: &[Case] = &[
    // Files.
    (
        "missing config",
        |d| std::fs::remove_file(d.join("adapter_config.json")).unwrap(),
        &["victim", "no adapter_config.json"],
    ),
    (
        "pickle only",
        |d| {
            std::fs::remove_file(d.join("adapter_model.safetensors")).unwrap();
            std::fs::write(d.join("adapter_model.bin"), b"\x80\x02not read").unwrap();
        },
        &[
            "victim",
            "adapter_model.bin",
            "pickle",
            "safe_serialization=True",
        ],
    ),
    (
        "missing weights",
        |d| std::fs::remove_file(d.join("adapter_model.safetensors")).unwrap(),
        &["victim", "no adapter_model.safetensors"],
    ),
    // Config.
    (
        "config not JSON",
        |d| std::fs::write(d.join("adapter_config.json"), "{\"r\": 8,").unwrap(),
        &[CONFIG, "not valid JSON"],
    ),
    (
        "r of the wrong type",
        |d| {
            config(d, |c| {
                c.insert("r".into(), json!("8"));
            })
        },
        &[CONFIG, "\"r\"", "positive integer"],
    ),
    (
        "peft_type not LORA",
        |d| {
            config(d, |c| {
                c.insert("peft_type".into(), json!("IA3"));
            })
        },
        &[CONFIG, "\"peft_type\"", "\"IA3\""],
    ),
    (
        "DoRA",
        |d| {
            config(d, |c| {
                c.insert("use_dora".into(), json!(true));
            })
        },
        &[CONFIG, "\"use_dora\"", "DoRA"],
    ),
    (
        "modules_to_save",
        |d| {
            config(d, |c| {
                c.insert("modules_to_save".into(), json!(["lm_head"]));
            })
        },
        &[CONFIG, "\"modules_to_save\"", "lm_head", "not supported"],
    ),
    (
        "trainable tokens",
        |d| {
            config(d, |c| {
                c.insert("trainable_token_indices".into(), json!([3, 4]));
            })
        },
        &[CONFIG, "\"trainable_token_indices\"", "not supported"],
    ),
    (
        "aLoRA",
        |d| {
            config(d, |c| {
                c.insert("alora_invocation_tokens".into(), json!([1, 2]));
            })
        },
        &[CONFIG, "\"alora_invocation_tokens\"", "aLoRA"],
    ),
    (
        "bad rank_pattern regex",
        |d| {
            config(d, |c| {
                c.insert("rank_pattern".into(), json!({"(fc1": 4}));
            })
        },
        &[
            CONFIG,
            "\"rank_pattern\"",
            "(fc1",
            "not a valid regular expression",
        ],
    ),
    // Tensors that are not LoRA factors.
    (
        "embedding LoRA",
        |d| {
            tensors(d, |t| {
                extra(t, "base_model.model.model.embed_tokens.lora_embedding_A")
            })
        },
        &[
            WEIGHTS,
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "embedding layer",
        ],
    ),
    (
        "DoRA magnitude",
        |d| {
            tensors(d, |t| {
                extra(
                    t,
                    "base_model.model.model.layers.0.mlp.fc1.lora_magnitude_vector",
                )
            })
        },
        &[WEIGHTS, "fc1.lora_magnitude_vector", "DoRA magnitude"],
    ),
    (
        "a bias",
        |d| {
            tensors(d, |t| {
                extra(t, "base_model.model.model.layers.0.mlp.fc1.bias")
            })
        },
        &[
            WEIGHTS,
            "base_model.model.model.layers.0.mlp.fc1.bias",
            "a bias",
        ],
    ),
    (
        "a LoRA bias",
        |d| {
            tensors(d, |t| {
                extra(t, "base_model.model.model.layers.0.mlp.fc1.lora_B.bias")
            })
        },
        &[WEIGHTS, "fc1.lora_B.bias", "LoRA bias"],
    ),
    (
        "a saved module",
        |d| tensors(d, |t| extra(t, "base_model.model.lm_head.weight")),
        &[
            WEIGHTS,
            "base_model.model.lm_head.weight",
            "not a LoRA factor",
        ],
    ),
    (
        "F64 factor",
        |d| {
            tensors(d, |ts| {
                let t = tensor(ts, A0);
                t.data = t
                    .values()
                    .iter()
                    .flat_map(|v| f64::from(*v).to_le_bytes())
                    .collect();
                t.dtype = "F64".into();
            })
        },
        &[WEIGHTS, A0, "F64", "F32, F16 or BF16"],
    ),
    (
        "two adapter names",
        |d| {
            tensors(d, |ts| {
                for t in ts.iter_mut().take(2) {
                    t.name = t.name.replace(".weight", ".default.weight");
                }
            })
        },
        &[
            WEIGHTS,
            "fc1.lora_A.default.weight",
            "different adapter names",
        ],
    ),
    (
        "no LoRA tensors",
        |d| tensors(d, Vec::clear),
        &[WEIGHTS, "no LoRA tensors"],
    ),
    // Framing and header.
    (
        "shorter than 8 bytes",
        |d| bytes(d, |b| b.truncate(5)),
        &[WEIGHTS, "truncated", "5 bytes"],
    ),
    (
        "header beyond the file",
        |d| {
            bytes(d, |b| {
                let claimed = b.len() as u64;
                b[..8].copy_from_slice(&claimed.to_le_bytes());
            })
        },
        &[WEIGHTS, "truncated", "header claims"],
    ),
    (
        "absurd header length",
        |d| bytes(d, |b| b[..8].copy_from_slice(&200_000_000u64.to_le_bytes())),
        &[WEIGHTS, "absurdly large"],
    ),
    (
        "header not JSON",
        |d| bytes(d, |b| b[8] = b'x'),
        &[WEIGHTS, "not valid JSON"],
    ),
    (
        "header not UTF-8",
        |d| {
            bytes(d, |b| {
                let at = 8 + b[8..].windows(4).position(|w| w == b"fc1.").unwrap();
                b[at] = 0xff;
            })
        },
        &[WEIGHTS, "not valid UTF-8"],
    ),
    (
        "duplicate tensor name",
        |d| {
            bytes(d, |b| {
                let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
                let text = String::from_utf8(b[8..8 + n].to_vec())
                    .unwrap()
                    .replacen(B0, A0, 1);
                b.splice(8..8 + n, text.into_bytes());
            })
        },
        &[WEIGHTS, "duplicate key", A0],
    ),
    (
        "data shorter than the header says",
        |d| bytes(d, |b| b.truncate(b.len() - 100)),
        &[
            WEIGHTS,
            "model.layers.2.self_attn.v_proj.lora_B.weight",
            "beyond the data area",
        ],
    ),
    (
        "offsets reversed",
        |d| {
            raw(d, |h, _| {
                h[A0]["data_offsets"] = json!([3072, 0]);
            })
        },
        &[WEIGHTS, A0, "end before they start"],
    ),
    (
        "offsets beyond the data",
        |d| {
            raw(d, |h, _| {
                h[A0]["data_offsets"] = json!([0, 1u64 << 40]);
            })
        },
        &[WEIGHTS, A0, "beyond the data area"],
    ),
    (
        "size not dtype x shape",
        |d| {
            raw(d, |h, _| {
                h[A0]["shape"] = json!([8, 95]);
            })
        },
        &[WEIGHTS, A0, "span 3072 bytes", "needs 3040"],
    ),
    (
        "overlapping tensors",
        |d| {
            raw(d, |h, _| {
                h[B0]["data_offsets"] = json!([3000, 9144]);
            })
        },
        &[WEIGHTS, A0, B0, "overlap"],
    ),
    (
        "trailing bytes",
        |d| raw(d, |_, data| data.extend_from_slice(&[0; 4])),
        &[WEIGHTS, "belong to no tensor"],
    ),
    // Pairs and shapes.
    (
        "A without B",
        |d| tensors(d, |ts| ts.retain(|t| t.name != B0)),
        &[WEIGHTS, A0, "no matching lora_B", "incomplete"],
    ),
    (
        "B without A",
        |d| tensors(d, |ts| ts.retain(|t| t.name != A0)),
        &[WEIGHTS, B0, "no matching lora_A", "incomplete"],
    ),
    (
        "A not 2-D",
        |d| tensors(d, |ts| tensor(ts, A0).shape = vec![8, 96, 1]),
        &[WEIGHTS, A0, "[8, 96, 1]", "2-D"],
    ),
    (
        "B not 2-D",
        |d| tensors(d, |ts| tensor(ts, B0).shape = vec![1536]),
        &[WEIGHTS, B0, "[1536]", "2-D"],
    ),
    (
        "rank zero",
        |d| {
            tensors(d, |ts| {
                *tensor(ts, A0) = Tensor::f32(A0, &[0, 96], &[]);
                *tensor(ts, B0) = Tensor::f32(B0, &[192, 0], &[]);
            })
        },
        &[WEIGHTS, A0, "[0, 96]", "no zero dimension"],
    ),
    (
        "ranks disagree",
        |d| tensors(d, |ts| tensor(ts, B0).shape = vec![96, 16]),
        &[WEIGHTS, A0, B0, "ranks disagree", "rank 8", "rank 16"],
    ),
    (
        "rank is not r",
        |d| {
            config(d, |c| {
                c.insert("r".into(), json!(4));
            })
        },
        &[WEIGHTS, A0, "rank 8", "sets r = 4"],
    ),
    (
        "rank is not its rank_pattern",
        |d| {
            config(d, |c| {
                c.insert("rank_pattern".into(), json!({"fc1": 16}));
            })
        },
        &[WEIGHTS, A0, "rank_pattern[\"fc1\"] = 16"],
    ),
    (
        "module not in target_modules",
        |d| {
            config(d, |c| {
                c.insert(
                    "target_modules".into(),
                    json!(["q_proj", "k_proj", "v_proj", "dense", "fc2"]),
                );
            })
        },
        &[WEIGHTS, A0, "model.layers.0.mlp.fc1", "target_modules"],
    ),
    (
        "module not matched by the regex",
        |d| {
            config(d, |c| {
                c.insert("target_modules".into(), json!(".*_proj"));
            })
        },
        &[WEIGHTS, A0, "target_modules"],
    ),
    (
        "module excluded",
        |d| {
            config(d, |c| {
                c.insert("exclude_modules".into(), json!(["fc1"]));
            })
        },
        &[WEIGHTS, A0, "target_modules"],
    ),
    // Values.
    (
        "NaN",
        |d| tensors(d, |ts| set_f32(tensor(ts, B0), 5, f32::NAN)),
        &[WEIGHTS, B0, "NaN", "element 5"],
    ),
    (
        "infinity",
        |d| tensors(d, |ts| set_f32(tensor(ts, A0), 0, f32::NEG_INFINITY)),
        &[WEIGHTS, A0, "-inf", "element 0"],
    ),
    (
        "NaN deep in a big tensor",
        |d| {
            tensors(d, |ts| {
                let big = Tensor::f32("x", &[8, 4096], &values(8 * 4096, 1));
                *tensor(ts, A0) = Tensor {
                    name: A0.into(),
                    ..big.clone()
                };
                *tensor(ts, B0) = Tensor::f32(B0, &[192, 8], &values(192 * 8, 2));
                set_f32(tensor(ts, A0), 20_000, f32::NAN);
            })
        },
        &[WEIGHTS, A0, "NaN", "element 20000"],
    ),
];

#[test]
fn each_refusal_names_file_culprit_and_cause() {
    let failures: Vec<String> = CASES
        .iter()
        .filter_map(|(label, mutate, expected)| check(label, *mutate, expected).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

#[test]
fn the_unmutated_copy_loads() {
    // Guards the table: a case only proves something if the untouched copy is accepted.
    assert!(
        check("no mutation", |_| {}, &[]).is_err_and(|e| e.contains("loaded, expected a refusal"))
    );
}

#[test]
fn inspect_salvages_what_it_can_from_a_rejected_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dora");
    copy_adapter(&adapter_dir("dev-phi", "rot13"), &dir);
    config(&dir, |c| {
        c.insert("use_dora".into(), json!(true));
    });
    let report = inspect_adapter(&dir, None);
    assert!(matches!(&report.state, AdapterState::Rejected { reason } if reason.contains("DoRA")));
    assert_eq!(
        (report.rank, report.alpha, report.scale),
        (Some(8), Some(16.0), Some(2.0))
    );
    assert_eq!(report.modules.len(), 18);
    assert_eq!(report.modules[0].module, "model.layers.0.mlp.fc1");
    assert!(report.hash.is_some() && report.size_bytes.is_some());
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["state"], "rejected");
    assert!(json["reason"].as_str().unwrap().contains("use_dora"));

    // A folder with nothing readable still gets a report.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let report = inspect_adapter(&empty, None);
    assert_eq!(report.name, "empty");
    assert!(matches!(report.state, AdapterState::Rejected { .. }));
    assert_eq!(
        (report.rank, report.hash, report.modules.len()),
        (None, None, 0)
    );
    let missing = inspect_adapter(&tmp.path().join("nope"), None);
    assert!(matches!(&missing.state, AdapterState::Rejected { reason } if reason.contains("nope")));
}
