//! `moerge logits | score | generate`: load a base (and an adapter), run it on a compute
//! thread, print or write the result.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;

use anyhow::{Context, Result};
use moerge_engine::{
    inference, BaseModel, ComputeWorker, FusedModel, LanguageModel, Precision, StreamDecoder,
    TextTokenizer,
};
use moerge_library::source::{self, HubSettings, ModelKind};
use moerge_library::Adapter;
use serde::Serialize;

use crate::args::{GenerateArgs, LocalModelArgs, LogitsArgs, PrecisionArg, ScoreArgs};

/// A model ready to run, with its tokenizer and a compute thread.
pub(crate) struct Loaded {
    pub model: FusedModel,
    pub tokenizer: TextTokenizer,
    pub worker: ComputeWorker,
}

/// Resolves the folders (or hub ids), loads the base and attaches the adapter.
pub(crate) fn load(args: &LocalModelArgs) -> Result<Loaded> {
    let hub = HubSettings::from_env();
    let base_dir = source::resolve(&args.base, ModelKind::Base, &hub)
        .with_context(|| format!("--base {}", args.base))?;
    let precision = match args.precision {
        PrecisionArg::Auto => None,
        PrecisionArg::F32 => Some(Precision::F32),
        PrecisionArg::Bf16 => Some(Precision::Bf16),
    };
    let adapter = match &args.adapter {
        Some(spec) => {
            let dir = source::resolve(spec, ModelKind::Adapter, &hub)
                .with_context(|| format!("--adapter {spec}"))?;
            Some(Adapter::load(&dir).with_context(|| format!("--adapter {spec}"))?)
        }
        None => None,
    };
    let plan = match (&args.library, &args.plan) {
        (Some(library), Some(plan)) => {
            Some(crate::commands::plan::read_with_experts(library, plan)?)
        }
        _ => None,
    };
    let worker = ComputeWorker::spawn(1).context("cannot start a compute thread")?;
    let model = worker
        .submit(move || {
            let base = BaseModel::load_dir_in(&base_dir, precision)?;
            match (&adapter, &plan) {
                (Some(a), _) => Ok(FusedModel::Single(base.with_adapter(a)?)),
                (None, Some(p)) => base.fuse_with(&p.plan, &p.experts, &p.tensors),
                (None, None) => Ok(FusedModel::Single(base)),
            }
        })
        .wait()
        .with_context(|| format!("--base {}", args.base))?;
    let tokenizer = TextTokenizer::from_dir(model.base().info().dir())?;
    Ok(Loaded {
        model,
        tokenizer,
        worker,
    })
}

pub fn logits(args: &LogitsArgs) -> Result<ExitCode> {
    let Loaded {
        model,
        tokenizer,
        worker,
    } = load(&args.model)?;
    let ids = tokenizer.encode(&args.text)?;
    let out: PathBuf = args.out.clone();
    let (t, vocab) = worker
        .submit(move || {
            let logits = inference::logits(&model, &ids)?;
            inference::save_logits(&out, &ids, &logits)?;
            Ok((ids.len(), model.vocab_size()))
        })
        .wait()?;
    eprintln!(
        "wrote logits [{t}, {vocab}] and input_ids [{t}] to {}",
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct ScoreReport {
    mean_nll: f32,
    prompt_tokens: usize,
    completion_tokens: usize,
    tokens: Vec<TokenScore>,
}

#[derive(Serialize)]
struct TokenScore {
    id: u32,
    text: String,
    nll: f32,
}

pub fn score(args: &ScoreArgs, local: &LocalModelArgs) -> Result<ExitCode> {
    let Loaded {
        model,
        tokenizer,
        worker,
    } = load(local)?;
    let prompt = tokenizer.encode(&args.prompt)?;
    let completion = tokenizer.encode(&args.completion)?;
    let prompt_tokens = prompt.len();
    let score = worker
        .submit(move || inference::score(&model, &prompt, &completion))
        .wait()?;
    let tokens = score
        .completion_ids
        .iter()
        .zip(&score.token_nll)
        .map(|(&id, &nll)| {
            Ok(TokenScore {
                id,
                text: tokenizer.decode(&[id])?,
                nll,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let report = ScoreReport {
        mean_nll: score.mean_nll(),
        prompt_tokens,
        completion_tokens: tokens.len(),
        tokens,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "mean NLL {:.4} nats/token over {} completion tokens (prompt: {} tokens)",
            report.mean_nll, report.completion_tokens, report.prompt_tokens
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn generate(args: &GenerateArgs, local: &LocalModelArgs) -> Result<ExitCode> {
    let Loaded {
        model,
        tokenizer,
        worker,
    } = load(local)?;
    let prompt = tokenizer.encode(&args.prompt)?;
    let opts = inference::GenerateOptions {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        // A model that says it is done is done, whatever --max-tokens allows.
        stop_ids: model.eos_token_ids(),
    };
    // Tokens travel from the compute thread to this one as they are made, so the text
    // streams; dropping the receiver (stop text seen) tells the generator to stop.
    let (tx, rx) = mpsc::channel::<u32>();
    let done = worker.submit(move || {
        inference::generate(&model, &prompt, &opts, |id| match tx.send(id) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        })
    });
    let mut decoder = StreamDecoder::new(&tokenizer);
    let mut text = String::new();
    let mut shown = 0;
    let mut stdout = std::io::stdout().lock();
    for id in rx.iter() {
        if let Some(piece) = decoder.push(id)? {
            let before = text.len();
            text.push_str(&piece);
            // Cut at the earliest stop string that this piece completed.
            let stop = stop_end(&text, before, &args.stop);
            if let Some(end) = stop {
                text.truncate(end);
            }
            if !args.json {
                stdout.write_all(&text.as_bytes()[shown..])?;
                stdout.flush()?;
                shown = text.len();
            }
            if stop.is_some() {
                break;
            }
        }
    }
    drop(rx);
    done.wait()?;
    if args.json {
        writeln!(stdout, "{}", serde_json::json!({ "text": text }))?;
    } else {
        writeln!(stdout)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// End (in bytes) of the earliest stop string that ends after `new_from`, if any: only
/// matches that the newest piece completed count, so earlier text is never re-cut.
fn stop_end(text: &str, new_from: usize, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let mut from = new_from.saturating_sub(s.len() - 1);
            while !text.is_char_boundary(from) {
                from -= 1;
            }
            text[from..].find(s.as_str()).map(|i| from + i + s.len())
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::stop_end;

    fn check(text: &str, new_from: usize, stops: &[&str], expected: Option<usize>) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            stop_end(text, new_from, &stops),
            expected,
            "{text:?} from {new_from}"
        );
    }

    #[test]
    fn stops_only_on_new_text() {
        check("abc\ndef", 4, &["\n"], None);
        check("abc\ndef", 3, &["\n"], Some(4));
        check("abXYc", 3, &["XY"], Some(4));
        check("abXYc", 3, &["XY", "b"], Some(4));
        check("héllo wörld", 8, &["ö"], Some(10));
        check("abc", 0, &[""], None);
    }
}
