//! The model commands over the daemon: `score`, `generate`, `explain`, `eval`, `export` and
//! `fuse`. Each fuses its model, uses it, and releases it (also on error).

use std::io::Write;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use moerge_bus::GenerateOptions;
use moerge_engine::routing::ModuleRouting;
use serde::Serialize;

use super::absolute;
use super::connect::{connect, Session};
use super::model::{fuse, summarize_plan, RemoteModel, Source};
use super::output::json;
use crate::args::{
    ConnectArgs, EvalArgs, ExplainArgs, ExportArgs, FuseArgs, GenerateArgs, ScoreArgs,
};
use crate::commands::{explain, train};
use crate::exit::{invalid, Cancelled, DaemonError};

/// Connects, fuses `source`, runs `body` with the model, and releases it whatever happened.
async fn with_model<T>(
    connect_args: &ConnectArgs,
    source: &Source,
    body: impl AsyncFnOnce(&Session, &RemoteModel) -> Result<T>,
) -> Result<T> {
    let session = connect(connect_args).await?;
    let model = fuse(&session, source).await?;
    let result = body(&session, &model).await;
    model.release().await;
    result
}

#[derive(Serialize)]
struct ScoreReport {
    mean_nll: f64,
    total_nll: f64,
    completion_tokens: usize,
    tokens: Vec<TokenScore>,
}

#[derive(Serialize)]
struct TokenScore {
    id: u32,
    text: String,
    nll: f64,
}

pub async fn score(args: &ScoreArgs) -> Result<()> {
    let source = Source::from_args(args.model.plan.as_deref(), &args.model.remote)?;
    let s = with_model(&args.model.connect, &source, async |_, model| {
        Ok(model
            .proxy
            .score(&args.prompt, &args.completion)
            .await
            .map_err(DaemonError::from)?)
    })
    .await?;
    let report = ScoreReport {
        mean_nll: s.mean_nll,
        total_nll: s.total_nll,
        completion_tokens: s.token_ids.len(),
        tokens: s
            .token_ids
            .iter()
            .zip(s.tokens)
            .zip(&s.token_nll)
            .map(|((&id, text), &nll)| TokenScore { id, text, nll })
            .collect(),
    };
    if args.json {
        return json(&report);
    }
    println!(
        "mean NLL {:.4} nats/token over {} completion tokens",
        report.mean_nll, report.completion_tokens
    );
    Ok(())
}

fn generate_options(args: &GenerateArgs) -> Result<GenerateOptions> {
    let Ok(max_tokens) = u32::try_from(args.max_tokens) else {
        invalid!("--max-tokens {}: too large", args.max_tokens);
    };
    Ok(GenerateOptions {
        max_tokens: Some(max_tokens),
        temperature: Some(args.temperature),
        top_p: args.top_p,
        seed: Some(args.seed),
        stop: args.stop.clone(),
    })
}

/// Streams a generation: Token signals are printed as they come, Done ends it (its text is
/// the whole answer, so nothing is lost if a Token is still queued). Ctrl-C stops it.
pub async fn generate(args: &GenerateArgs) -> Result<()> {
    let source = Source::from_args(args.model.plan.as_deref(), &args.model.remote)?;
    let options = generate_options(args)?;
    let text = with_model(&args.model.connect, &source, async |_, model| {
        // Subscribe before asking, so no signal can come before we listen.
        let mut signals = model.proxy.inner().receive_all_signals().await?;
        let request = model
            .proxy
            .generate_stream(&args.prompt, options.to_dict())
            .await
            .map_err(DaemonError::from)
            .context("--prompt")?;
        let mut shown = String::new();
        let mut stdout = std::io::stdout();
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            let message = tokio::select! {
                m = signals.next() => m.context("the daemon closed the connection mid-generation")?,
                _ = &mut ctrl_c => {
                    if !args.json {
                        writeln!(stdout)?;
                    }
                    return Err(anyhow::Error::new(Cancelled("generation stopped".into())));
                }
            };
            let header = message.header();
            match header.member().map(|m| m.as_str()) {
                Some("Token") => {
                    let (id, piece): (u64, String) = message.body().deserialize()?;
                    if id == request && !args.json {
                        stdout.write_all(piece.as_bytes())?;
                        stdout.flush()?;
                        shown.push_str(&piece);
                    }
                }
                Some("Done") => {
                    let (id, text, error): (u64, String, String) = message.body().deserialize()?;
                    if id != request {
                        continue;
                    }
                    if !error.is_empty() {
                        anyhow::bail!("generation failed: {error}");
                    }
                    if !args.json {
                        let rest = text.strip_prefix(shown.as_str()).unwrap_or(&text);
                        stdout.write_all(rest.as_bytes())?;
                        stdout.flush()?;
                    }
                    return Ok(text);
                }
                _ => {}
            }
        }
    })
    .await?;
    if args.json {
        println!("{}", serde_json::json!({ "text": text }));
    } else {
        println!();
    }
    Ok(())
}

pub async fn explain(args: &ExplainArgs) -> Result<()> {
    let source = Source::from_args(args.model.plan.as_deref(), &args.model.remote)?;
    let e = with_model(&args.model.connect, &source, async |_, model| {
        model
            .proxy
            .explain(&args.prompt)
            .await
            .map_err(DaemonError::from)
            .context("--prompt")
    })
    .await?;
    let modules = e
        .records
        .into_iter()
        .map(|r| ModuleRouting {
            module: r.module,
            units: r.units,
            // The daemon widened the engine's f32 weights; narrowing gives them back exactly.
            weights: r
                .weights
                .into_iter()
                .map(|row| row.into_iter().map(|w| w as f32).collect())
                .collect(),
        })
        .collect();
    explain::print(args, e.tokens, modules)
}

/// Scores every record (several calls in flight) and reports per-task means as the offline
/// `eval` does.
pub async fn eval(args: &EvalArgs) -> Result<()> {
    let source = Source::from_args(args.model.plan.as_deref(), &args.model.remote)?;
    let data = args.data_file()?;
    let records = train::read_eval_records(data)?;
    if args.concurrency == 0 {
        invalid!("--concurrency 0: at least one call must be in flight");
    }
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(records.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} records  {per_sec}  eta {eta}")
            .expect("a valid template"),
    );
    let losses = with_model(&args.model.connect, &source, async |_, model| {
        let scores = futures_util::stream::iter(records.iter().enumerate())
            .map(|(i, r)| {
                let bar = &bar;
                async move {
                    let s = model
                        .proxy
                        .score(&r.prompt, &r.completion)
                        .await
                        .map_err(DaemonError::from)
                        .with_context(|| format!("--data {} record {}", data.display(), i + 1))?;
                    bar.inc(1);
                    Ok::<_, anyhow::Error>((r.task.clone().unwrap_or_default(), s.mean_nll))
                }
            })
            .buffered(args.concurrency);
        scores.collect::<Vec<_>>().await.into_iter().collect()
    })
    .await;
    bar.finish_and_clear();
    let losses: Vec<(String, f64)> = losses?;
    train::print_eval(&train::eval_report(losses), args.json)
}

pub async fn export(args: &ExportArgs) -> Result<()> {
    let source = Source::from_args(args.plan.as_deref(), &args.remote)?;
    if args.out.exists() {
        invalid!(
            "--out {}: already exists; choose a new folder",
            args.out.display()
        );
    }
    let out = absolute(&args.out, "--out")?;
    let hash = with_model(&args.connect, &source, async |_, model| {
        model
            .proxy
            .export_peft(&out)
            .await
            .map_err(DaemonError::from)
            .with_context(|| format!("--out {out}"))
    })
    .await?;
    if args.json {
        return json(&serde_json::json!({ "out": out, "hash": hash }));
    }
    println!(
        "wrote {out} ({}); load it with PEFT, or add it with `moerge experts add {out}`",
        hash.chars().take(12).collect::<String>()
    );
    Ok(())
}

#[derive(Serialize)]
struct FuseReport {
    model: String,
    summary: String,
    generation: u64,
    fuse_seconds: f64,
    plan: serde_json::Value,
}

/// Fuses, describes the model, releases it.
pub async fn fuse_check(args: &FuseArgs) -> Result<()> {
    let source = Source::from_args(args.plan.as_deref(), &args.remote)?;
    let report = with_model(&args.common.connect, &source, async |_, model| {
        let plan = model.proxy.plan().await?;
        Ok(FuseReport {
            model: model.path.to_string(),
            summary: summarize_plan(&plan),
            generation: model.proxy.generation().await?,
            fuse_seconds: model.fuse_seconds,
            plan: serde_json::from_str(&plan).unwrap_or(serde_json::Value::String(plan)),
        })
    })
    .await?;
    if args.common.json {
        return json(&report);
    }
    println!(
        "fused {} in {:.2} s",
        source.describe(),
        report.fuse_seconds
    );
    println!("  plan        {}", report.summary);
    println!(
        "  generation  {} (the library generation it leased)",
        report.generation
    );
    println!(
        "released {}; use the same flags with score, generate, eval or explain",
        report.model
    );
    Ok(())
}
