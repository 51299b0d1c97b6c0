//! A fused model as the daemon serves it: the plan, the lease it was built under (so the
//! experts it read stay pinned), the engine's [`FusedModel`], and whether the library has
//! moved on from an expert it uses. The methods here are blocking: callers run them on a
//! compute thread.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use moerge_engine::{inference, routing, FusedModel, StreamDecoder, TextTokenizer};
use moerge_library::Adapter;
use moerge_sdk::plan::{ModulePlan, Plan};

use super::error::ServeError;
use crate::service::{ExpertChange, Lease, LibraryEvent, PinnedAdapter};

pub struct LoadedModel {
    pub id: u64,
    /// The client that fused it.
    pub owner: String,
    plan: Plan,
    plan_json: String,
    lease: Lease,
    _pins: Vec<Arc<PinnedAdapter>>,
    adapters: Vec<Adapter>,
    fused: FusedModel,
    /// The base model's context in tokens (`max_position_embeddings`), when its config says.
    context: Option<usize>,
    stale: AtomicBool,
}

/// What fusing produced, before it is a served model.
pub(crate) struct BuiltModel {
    pub(crate) plan: Plan,
    pub(crate) plan_json: String,
    pub(crate) lease: Lease,
    pub(crate) pins: Vec<Arc<PinnedAdapter>>,
    pub(crate) adapters: Vec<Adapter>,
    pub(crate) fused: FusedModel,
}

/// `Score`'s answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreOutput {
    pub tokens: Vec<String>,
    pub ids: Vec<u32>,
    pub nll: Vec<f32>,
}

/// How to generate (already checked against the limits).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

/// One routed module's weights over the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleRouting {
    pub module: String,
    pub units: Vec<String>,
    pub weights: Vec<Vec<f32>>,
}

/// `Explain`'s answer.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingExplanation {
    pub tokens: Vec<String>,
    pub modules: Vec<ModuleRouting>,
}

fn tokenizer_error(argument: &str, e: moerge_engine::EngineError) -> ServeError {
    ServeError::invalid(argument, e.to_string())
}

/// No tokenizer we know has a token longer than this many bytes: a text with more than
/// `context × MAX_TOKEN_BYTES` bytes cannot fit the context, and is refused before the
/// tokenizer spends time and memory on it.
pub const MAX_TOKEN_BYTES: usize = 1024;

impl GenerateRequest {
    /// Checks the sampling settings; errors name the option (`options.temperature`).
    pub fn check(&self) -> Result<(), ServeError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(ServeError::invalid(
                "options.temperature",
                format!(
                    "must be 0 (greedy) or a positive number, got {}",
                    self.temperature
                ),
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ServeError::invalid(
                    "options.top_p",
                    format!("must be in (0, 1], got {p}"),
                ));
            }
        }
        Ok(())
    }
}

impl LoadedModel {
    pub(crate) fn new(id: u64, owner: String, built: BuiltModel) -> LoadedModel {
        let context = built
            .fused
            .base()
            .info()
            .config_json()
            .get("max_position_embeddings")
            .and_then(|v| v.as_u64())
            .map(|n| n as usize);
        LoadedModel {
            id,
            owner,
            context,
            plan: built.plan,
            plan_json: built.plan_json,
            lease: built.lease,
            _pins: built.pins,
            adapters: built.adapters,
            fused: built.fused,
            stale: AtomicBool::new(false),
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The plan as the caller sent it.
    pub fn plan_json(&self) -> &str {
        &self.plan_json
    }

    /// The library generation this model leased.
    pub fn generation(&self) -> u64 {
        self.lease.generation()
    }

    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::SeqCst)
    }

    pub fn is_ensemble(&self) -> bool {
        self.plan.ensemble.is_some()
    }

    /// Marks the model stale if `event` changed or removed an expert it uses; true if this
    /// event is what made it stale.
    pub(crate) fn note_library_event(&self, event: &LibraryEvent) -> bool {
        let touches = event.changes.iter().any(|c| {
            let name = match c {
                ExpertChange::Updated { name, .. } | ExpertChange::Removed { name, .. } => name,
                ExpertChange::Renamed { from, .. } => from,
                ExpertChange::Added { .. } => return false,
            };
            self.plan.experts.iter().any(|e| &e.name == name)
        });
        touches && !self.stale.swap(true, Ordering::SeqCst)
    }

    /// The model's context in tokens, when the base's config says.
    pub fn context(&self) -> Option<usize> {
        self.context
    }

    /// Tokenizes `text` (the argument `argument`), refusing a text that cannot fit the
    /// context before and after tokenizing it.
    fn encode(
        &self,
        tok: &TextTokenizer,
        argument: &str,
        text: &str,
    ) -> Result<Vec<u32>, ServeError> {
        let Some(context) = self.context else {
            return tok.encode(text).map_err(|e| tokenizer_error(argument, e));
        };
        let too_long = |what: String| {
            ServeError::invalid(
                argument,
                format!("{what} exceed the model's context of {context} tokens"),
            )
        };
        if text.len() > context.saturating_mul(MAX_TOKEN_BYTES) {
            return Err(too_long(format!(
                "{} bytes (more than {MAX_TOKEN_BYTES} bytes per token)",
                text.len()
            )));
        }
        let ids = tok.encode(text).map_err(|e| tokenizer_error(argument, e))?;
        if ids.len() > context {
            return Err(too_long(format!("{} tokens", ids.len())));
        }
        Ok(ids)
    }

    pub(crate) fn score(
        &self,
        tok: &TextTokenizer,
        prompt: &str,
        completion: &str,
    ) -> Result<ScoreOutput, ServeError> {
        let p = self.encode(tok, "prompt", prompt)?;
        let c = self.encode(tok, "completion", completion)?;
        if let Some(context) = self.context {
            if p.len() + c.len() > context {
                return Err(ServeError::invalid(
                    "completion",
                    format!(
                        "the prompt ({} tokens) and the completion ({} tokens) together exceed the model's context of {context} tokens",
                        p.len(),
                        c.len()
                    ),
                ));
            }
        }
        let score = inference::score(&self.fused, &p, &c)
            .map_err(|e| ServeError::from_engine(e, "plan"))?;
        Ok(ScoreOutput {
            tokens: token_texts(tok, &score.completion_ids),
            ids: score.completion_ids,
            nll: score.token_nll,
        })
    }

    pub(crate) fn top_tokens(
        &self,
        tok: &TextTokenizer,
        prompt: &str,
        k: usize,
    ) -> Result<Vec<(u32, String, f32)>, ServeError> {
        let p = self.encode(tok, "prompt", prompt)?;
        let top = inference::top_tokens(&self.fused, &p, k)
            .map_err(|e| ServeError::from_engine(e, "plan"))?;
        Ok(top
            .into_iter()
            .map(|(id, prob)| (id, token_texts(tok, &[id]).remove(0), prob))
            .collect())
    }

    /// Generates, calling `on_text` with each piece of text as soon as it is certain (a piece
    /// that might begin a stop string is held back until it is known not to). Returns the
    /// whole text, cut before the first stop string.
    pub(crate) fn generate(
        &self,
        tok: &TextTokenizer,
        prompt: &str,
        request: &GenerateRequest,
        mut on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<String, ServeError> {
        let p = self.encode(tok, "prompt", prompt)?;
        request.check()?;
        let mut max_tokens = request.max_tokens;
        if let Some(context) = self.context {
            // Generation ends where the context does: prompt and new tokens fit it.
            if p.len() >= context {
                return Err(ServeError::invalid(
                    "prompt",
                    format!(
                        "{} tokens leave no room to generate in the model's context of {context} tokens",
                        p.len()
                    ),
                ));
            }
            max_tokens = max_tokens.min(context - p.len());
        }
        let defaults = inference::GenerateOptions::default();
        let opts = inference::GenerateOptions {
            max_tokens,
            temperature: request.temperature,
            top_p: request.top_p,
            seed: request.seed.unwrap_or(defaults.seed),
            stop_ids: self.fused.eos_token_ids(),
        };
        let mut decoder = StreamDecoder::new(tok);
        let mut text = String::new();
        let mut sent = 0;
        let mut failure = None;
        let mut stopped = false;
        let on_token = |id: u32| {
            let piece = match decoder.push(id) {
                Ok(Some(piece)) => piece,
                Ok(None) => return ControlFlow::Continue(()),
                Err(e) => {
                    failure = Some(e);
                    return ControlFlow::Break(());
                }
            };
            text.push_str(&piece);
            if let Some(cut) = first_stop(&text, &request.stop) {
                text.truncate(cut);
                stopped = true;
            }
            let safe = if stopped {
                text.len()
            } else {
                text.len() - held_back(&text, &request.stop)
            };
            if safe > sent {
                let flow = on_text(&text[sent..safe]);
                sent = safe;
                if flow.is_break() {
                    return flow;
                }
            }
            if stopped {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        inference::generate(&self.fused, &p, &opts, on_token)
            .map_err(|e| ServeError::from_engine(e, "plan"))?;
        if let Some(e) = failure {
            return Err(ServeError::Internal(format!(
                "decoding the generated tokens: {e}"
            )));
        }
        if text.len() > sent {
            let _ = on_text(&text[sent..]);
        }
        Ok(text)
    }

    pub(crate) fn explain(
        &self,
        tok: &TextTokenizer,
        prompt: &str,
    ) -> Result<RoutingExplanation, ServeError> {
        let p = self.encode(tok, "prompt", prompt)?;
        let modules = routing::explain(&self.fused, &p)
            .map_err(|e| ServeError::from_engine(e, "plan"))?
            .into_iter()
            .map(|m| ModuleRouting {
                module: m.module,
                units: m.units,
                weights: m.weights,
            })
            .collect();
        Ok(RoutingExplanation {
            tokens: token_texts(tok, &p),
            modules,
        })
    }

    /// Writes a static plan's merge as a PEFT folder.
    pub(crate) fn export_peft(&self, dir: &Path) -> Result<String, ServeError> {
        if let Some(why) = not_static(&self.plan) {
            return Err(ServeError::NotSupported(format!(
                "ExportPeft: only merge (static) plans can be exported as one adapter; {why}"
            )));
        }
        if dir.exists() {
            return Err(ServeError::invalid(
                "dir",
                format!("{} already exists; give a new folder", dir.display()),
            ));
        }
        moerge_engine::merge::export_peft(&self.plan, &self.adapters, &Default::default(), dir)
            .map(|hash| hash.to_string())
            .map_err(|e| ServeError::from_engine(e, "plan"))
    }
}

/// Why `plan` is not a pure merge, if it is not.
fn not_static(plan: &Plan) -> Option<String> {
    if plan.ensemble.is_some() {
        return Some("this plan is an output ensemble".into());
    }
    let modules = std::iter::once(("default".to_string(), &plan.default)).chain(
        plan.modules
            .iter()
            .map(|(m, p)| (format!("modules[{m:?}]"), p)),
    );
    for (at, p) in modules {
        if let ModulePlan::Routed { .. } = p {
            return Some(format!("{at} is routed"));
        }
    }
    None
}

fn token_texts(tok: &TextTokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter()
        .map(|&id| tok.decode(&[id]).unwrap_or_else(|_| format!("<{id}>")))
        .collect()
}

/// Byte offset of the earliest stop string in `text`.
fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// How many trailing bytes of `text` could be the start of a stop string (to hold back).
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut longest = 0;
    for stop in stops {
        for (i, _) in stop.char_indices().skip(1) {
            if text.ends_with(&stop[..i]) {
                longest = longest.max(i);
            }
        }
    }
    longest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_cut_and_hold_back() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(first_stop("abc\n\ndef", &stops), Some(3));
        assert_eq!(first_stop("abENDc\n\n", &stops), Some(2));
        assert_eq!(first_stop("abc", &stops), None);
        assert_eq!(held_back("abc\n", &stops), 1);
        assert_eq!(held_back("abcEN", &stops), 2);
        assert_eq!(held_back("abcE", &stops), 1);
        assert_eq!(held_back("abc", &stops), 0);
    }
}
