//! `Generate`'s options, sent as a D-Bus dictionary `a{sv}` so that new options can be added
//! without changing the method's signature. Unknown keys are refused, not ignored.

use std::collections::HashMap;

use zbus::{OwnedVariant, Variant};

/// How to generate. Every field is optional on the wire; absent means the daemon's default.
///
/// | key           | type  | default                      |
/// |---------------|-------|------------------------------|
/// | `max_tokens`  | `u`   | 64                           |
/// | `temperature` | `d`   | 0 (greedy)                   |
/// | `top_p`       | `d`   | none (no nucleus cut)        |
/// | `seed`        | `t`   | fixed, so runs repeat        |
/// | `stop`        | `as`  | none (the base's EOS stops)  |
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateOptions {
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    /// Generation stops before the first occurrence of any of these strings.
    pub stop: Vec<String>,
}

/// Why an options dictionary was refused; the message names the key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("options.{key}: {message}")]
pub struct OptionError {
    pub key: String,
    pub message: String,
}

/// The keys [`GenerateOptions`] knows.
pub const GENERATE_OPTION_KEYS: [&str; 5] = ["max_tokens", "temperature", "top_p", "seed", "stop"];

fn owned(v: Variant<'_>) -> OwnedVariant {
    v.try_into_owned()
        .expect("plain numbers and strings always convert (only file descriptors can fail)")
}

impl GenerateOptions {
    /// Greedy decoding of at most `max_tokens` tokens.
    pub fn greedy(max_tokens: u32) -> GenerateOptions {
        GenerateOptions {
            max_tokens: Some(max_tokens),
            ..GenerateOptions::default()
        }
    }

    /// The `a{sv}` dictionary to send.
    pub fn to_dict(&self) -> HashMap<String, OwnedVariant> {
        let mut d = HashMap::new();
        if let Some(v) = self.max_tokens {
            d.insert("max_tokens".into(), owned(Variant::from(v)));
        }
        if let Some(v) = self.temperature {
            d.insert("temperature".into(), owned(Variant::from(v)));
        }
        if let Some(v) = self.top_p {
            d.insert("top_p".into(), owned(Variant::from(v)));
        }
        if let Some(v) = self.seed {
            d.insert("seed".into(), owned(Variant::from(v)));
        }
        if !self.stop.is_empty() {
            d.insert("stop".into(), owned(Variant::from(self.stop.clone())));
        }
        d
    }

    /// Reads a received dictionary. Integers are accepted in any D-Bus integer width that
    /// holds the value (Python and shell clients rarely pick the exact one).
    pub fn from_dict(dict: &HashMap<String, OwnedVariant>) -> Result<GenerateOptions, OptionError> {
        let mut out = GenerateOptions::default();
        for (key, value) in dict {
            let err = |message: String| OptionError {
                key: key.clone(),
                message,
            };
            match key.as_str() {
                "max_tokens" => {
                    let v = integer(value).ok_or_else(|| err(type_error("an integer", value)))?;
                    let v = u32::try_from(v)
                        .map_err(|_| err(format!("{v} is not a token count (0..2^32)")))?;
                    out.max_tokens = Some(v);
                }
                "seed" => {
                    let v = integer(value).ok_or_else(|| err(type_error("an integer", value)))?;
                    out.seed = Some(v as u64);
                }
                "temperature" => {
                    out.temperature =
                        Some(float(value).ok_or_else(|| err(type_error("a number", value)))?)
                }
                "top_p" => {
                    out.top_p =
                        Some(float(value).ok_or_else(|| err(type_error("a number", value)))?)
                }
                "stop" => {
                    let v = value
                        .try_clone()
                        .ok()
                        .and_then(|v| Vec::<String>::try_from(v).ok())
                        .ok_or_else(|| err(type_error("an array of strings (as)", value)))?;
                    if v.iter().any(String::is_empty) {
                        return Err(err("stop strings must not be empty".into()));
                    }
                    out.stop = v;
                }
                _ => {
                    return Err(err(format!(
                        "unknown option (known: {})",
                        GENERATE_OPTION_KEYS.join(", ")
                    )))
                }
            }
        }
        Ok(out)
    }
}

fn type_error(want: &str, value: &OwnedVariant) -> String {
    format!(
        "must be {want}, got a value of type {}",
        value.value_signature()
    )
}

fn integer(v: &OwnedVariant) -> Option<i128> {
    integer_any(v).filter(|x| *x >= 0)
}

fn float(v: &OwnedVariant) -> Option<f64> {
    let v: &Variant<'_> = v;
    match v {
        Variant::F64(x) => Some(*x),
        _ => integer_any(v).map(|x| x as f64),
    }
}

fn integer_any(v: &Variant<'_>) -> Option<i128> {
    Some(match v {
        Variant::U8(x) => i128::from(*x),
        Variant::I16(x) => i128::from(*x),
        Variant::U16(x) => i128::from(*x),
        Variant::I32(x) => i128::from(*x),
        Variant::U32(x) => i128::from(*x),
        Variant::I64(x) => i128::from(*x),
        Variant::U64(x) => i128::from(*x),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(dict: HashMap<String, OwnedVariant>, want: Result<GenerateOptions, &str>) {
        let got = GenerateOptions::from_dict(&dict).map_err(|e| e.to_string());
        match want {
            Ok(w) => assert_eq!(got, Ok(w)),
            Err(fragment) => {
                let e = got.expect_err("should be refused");
                assert!(e.contains(fragment), "{e:?} lacks {fragment:?}");
            }
        }
    }

    fn dict(pairs: Vec<(&str, Variant<'static>)>) -> HashMap<String, OwnedVariant> {
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), owned(v)))
            .collect()
    }

    #[test]
    fn options_round_trip_and_refusals_name_the_key() {
        let full = GenerateOptions {
            max_tokens: Some(12),
            temperature: Some(0.7),
            top_p: Some(0.9),
            seed: Some(7),
            stop: vec!["\n".into()],
        };
        check(full.to_dict(), Ok(full.clone()));
        check(HashMap::new(), Ok(GenerateOptions::default()));
        // Other integer widths are fine; an int temperature too.
        check(
            dict(vec![
                ("max_tokens", Variant::I32(5)),
                ("temperature", Variant::I32(1)),
            ]),
            Ok(GenerateOptions {
                max_tokens: Some(5),
                temperature: Some(1.0),
                ..GenerateOptions::default()
            }),
        );
        check(
            dict(vec![("max_tokens", Variant::from("ten"))]),
            Err("options.max_tokens: must be an integer"),
        );
        check(
            dict(vec![("max_tokens", Variant::I64(-1))]),
            Err("options.max_tokens"),
        );
        check(
            dict(vec![("temprature", Variant::F64(0.5))]),
            Err("options.temprature: unknown option"),
        );
        check(
            dict(vec![("stop", Variant::from(vec![String::new()]))]),
            Err("options.stop: stop strings must not be empty"),
        );
        check(
            dict(vec![("stop", Variant::from("x"))]),
            Err("options.stop: must be an array of strings"),
        );
    }
}
