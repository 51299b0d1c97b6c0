//! PEFT's tensor names: which keys are LoRA factors, of which module, and what the others are.
//!
//! PEFT saves `base_model.model.<module>.lora_A.weight` (and `.lora_B.weight`); older
//! versions and some tools keep the adapter-name segment, `.lora_A.<adapter>.weight`.

const PREFIX: &str = "base_model.model.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Factor {
    // Explicit: callers index `[A, B]` pairs with `factor as usize`.
    A = 0,
    B = 1,
}

impl Factor {
    pub(crate) fn segment(self) -> &'static str {
        match self {
            Factor::A => "lora_A",
            Factor::B => "lora_B",
        }
    }
}

/// What a tensor key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Key<'a> {
    Factor {
        module: &'a str,
        factor: Factor,
        adapter_name: Option<&'a str>,
    },
    /// Anything else, described for the refusal message.
    Unsupported { what: &'static str },
}

pub(crate) fn classify(key: &str) -> Key<'_> {
    if let Some(parsed) = parse_factor(key) {
        return parsed;
    }
    let what = if key.contains("lora_embedding_A") || key.contains("lora_embedding_B") {
        "a LoRA factor of an embedding layer (lora_embedding_A/B)"
    } else if key.contains("lora_magnitude_vector") {
        "a DoRA magnitude vector"
    } else if (key.contains(".lora_A.") || key.contains(".lora_B.")) && key.ends_with(".bias") {
        "a LoRA bias (lora_bias=True)"
    } else if key.contains("trainable_tokens") {
        "a trainable-token embedding delta"
    } else if key.contains("modules_to_save") {
        "a fully saved module (modules_to_save)"
    } else if key.ends_with(".bias") {
        "a bias"
    } else if !key.starts_with(PREFIX) {
        "not under base_model.model., so not a PEFT LoRA key"
    } else {
        "not a LoRA factor (a saved base-model weight?)"
    };
    Key::Unsupported { what }
}

fn parse_factor(key: &str) -> Option<Key<'_>> {
    let body = key.strip_prefix(PREFIX)?.strip_suffix(".weight")?;
    // `<module>.lora_X`, or `<module>.lora_X.<adapter>` with the adapter-name segment.
    let (head, adapter_name) = match body.rsplit_once('.') {
        Some((head, last)) if last != "lora_A" && last != "lora_B" => (head, Some(last)),
        _ => (body, None),
    };
    let (module, segment) = head.rsplit_once('.')?;
    let factor = [Factor::A, Factor::B]
        .into_iter()
        .find(|f| f.segment() == segment)?;
    (!module.is_empty() && adapter_name != Some("")).then_some(Key::Factor {
        module,
        factor,
        adapter_name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(key: &str, expected: Option<(&str, Factor, Option<&str>)>) {
        let got = match classify(key) {
            Key::Factor {
                module,
                factor,
                adapter_name,
            } => Some((module, factor, adapter_name)),
            Key::Unsupported { .. } => None,
        };
        assert_eq!(got, expected, "{key}");
    }

    #[test]
    fn factor_keys() {
        let m = "model.layers.0.self_attn.q_proj";
        check(
            &format!("base_model.model.{m}.lora_A.weight"),
            Some((m, Factor::A, None)),
        );
        check(
            &format!("base_model.model.{m}.lora_B.weight"),
            Some((m, Factor::B, None)),
        );
        check(
            &format!("base_model.model.{m}.lora_A.default.weight"),
            Some((m, Factor::A, Some("default"))),
        );
        check(
            &format!("base_model.model.{m}.lora_B.math.weight"),
            Some((m, Factor::B, Some("math"))),
        );
        check(
            "base_model.model.lm_head.lora_A.weight",
            Some(("lm_head", Factor::A, None)),
        );
    }

    #[test]
    fn other_keys() {
        for (key, word) in [
            (
                "base_model.model.model.embed_tokens.lora_embedding_A",
                "embedding",
            ),
            (
                "base_model.model.model.layers.0.mlp.fc1.lora_magnitude_vector",
                "DoRA",
            ),
            (
                "base_model.model.model.layers.0.mlp.fc1.lora_B.bias",
                "LoRA bias",
            ),
            ("base_model.model.model.layers.0.mlp.fc1.bias", "a bias"),
            (
                "base_model.model.score.modules_to_save.default.weight",
                "modules_to_save",
            ),
            ("model.layers.0.mlp.fc1.lora_A.weight", "base_model.model."),
            (
                "base_model.model.model.layers.0.mlp.fc1.weight",
                "not a LoRA factor",
            ),
            ("base_model.model.lora_A.weight", "not a LoRA factor"),
        ] {
            match classify(key) {
                Key::Unsupported { what } => assert!(what.contains(word), "{key}: {what}"),
                k => panic!("{key} parsed as {k:?}"),
            }
        }
    }
}
