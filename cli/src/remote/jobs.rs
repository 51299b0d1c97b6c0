//! `moerge fit` and `moerge select` over the daemon: start a job, follow it (a progress bar
//! fed by the job's PropertiesChanged), cancel it on Ctrl-C, print its result.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use moerge_bus::{Job1Proxy, JobState, JOB_INTERFACE, WELL_KNOWN_NAME};
use tokio::signal::unix::{signal, SignalKind};
use zbus::{OwnedObjectPath, OwnedVariant, Variant};

use super::connect::{connect, Session};
use super::output::json;
use super::{absolute, params_json};
use crate::args::{FitArgs, SelectArgs};
use crate::exit::{invalid, Cancelled, DaemonError};

/// How a job ended well: its result (JSON).
pub(crate) struct Finished {
    pub result: String,
}

/// What the job's properties say now.
#[derive(Default)]
struct Seen {
    state: Option<JobState>,
    progress: f64,
    message: String,
    result: String,
}

impl Seen {
    fn update<'a>(&mut self, changed: impl IntoIterator<Item = (&'a str, &'a Variant<'a>)>) {
        for (name, value) in changed {
            match (name, value) {
                ("State", Variant::Str(s)) => self.state = JobState::parse(s.as_str()),
                ("Progress", Variant::F64(p)) => self.progress = *p,
                ("Message", Variant::Str(m)) => self.message = m.to_string(),
                ("Result", Variant::Str(r)) => self.result = r.to_string(),
                _ => {}
            }
        }
    }

    fn update_all(&mut self, all: &HashMap<String, OwnedVariant>) {
        self.update(all.iter().map(|(k, v)| (k.as_str(), &**v)));
    }
}

/// A progress bar for a job (hidden when `quiet`), fed by [`follow`]'s reports.
fn job_bar(quiet: bool) -> ProgressBar {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(1000)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {percent:>3}% {msg}")
            .expect("a valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Follows the job at `path` to its end, reporting its progress (0 to 1) and message as
/// they change. Ctrl-C asks the daemon to cancel it (a second Ctrl-C leaves at once); the
/// job is released once it has ended.
pub(crate) async fn follow(
    session: &Session,
    path: OwnedObjectPath,
    what: &str,
    report: &dyn Fn(f64, &str),
    announce: bool,
) -> Result<Finished> {
    let job = Job1Proxy::builder(&session.conn)
        .path(path.clone())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    let properties = zbus::fdo::PropertiesProxy::builder(&session.conn)
        .destination(WELL_KNOWN_NAME)
        .path(path.clone())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    // Listen first, then read: no change can fall between the two.
    let mut changes = properties.receive_properties_changed().await?;
    let interface = zbus::names::InterfaceName::try_from(JOB_INTERFACE).expect("valid name");
    let mut seen = Seen::default();
    seen.update_all(&properties.get_all(interface.clone()).await?);

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut cancelling = false;
    // Registered now (not at the first poll), so a Ctrl-C from here on cancels the job.
    let mut interrupts = signal(SignalKind::interrupt()).context("cannot watch for Ctrl-C")?;
    if announce {
        eprintln!("{what} job {path} started; Ctrl-C cancels it");
    }
    loop {
        report(seen.progress, &seen.message);
        if seen.state.is_some_and(JobState::is_final) {
            break;
        }
        tokio::select! {
            change = changes.next() => {
                let Some(change) = change else { break };
                let args = change.args()?;
                seen.update(args.changed_properties().iter().map(|(k, v)| (*k, v)));
            }
            // A safety net: the whole state once a second, whatever the signals did.
            _ = tick.tick() => seen.update_all(&properties.get_all(interface.clone()).await?),
            _ = interrupts.recv() => {
                if cancelling {
                    return Err(anyhow::Error::new(Cancelled(format!(
                        "left the {what} at {path} (it ends with this connection)"
                    ))));
                }
                cancelling = true;
                eprintln!("\ncancelling the {what} (Ctrl-C again to leave now)");
                job.cancel().await.map_err(DaemonError::from)?;
            }
        }
    }
    // The final state may have come in a signal before the one with the result: read
    // everything once more now that the job will not change.
    seen.update_all(&properties.get_all(interface.clone()).await?);
    let state = seen.state;
    // A finished job's result has been read; forget it in the daemon.
    let _ = job.release().await;
    match state {
        Some(JobState::Succeeded) => Ok(Finished {
            result: seen.result,
        }),
        Some(JobState::Cancelled) => Err(anyhow::Error::new(Cancelled(format!(
            "the {what} was cancelled"
        )))),
        Some(JobState::Failed) => anyhow::bail!("the {what} failed: {}", seen.message),
        _ => anyhow::bail!("the daemon dropped the {what} job before it ended"),
    }
}

fn show(bar: &ProgressBar, progress: f64, message: &str) {
    bar.set_position((progress.clamp(0.0, 1.0) * 1000.0) as u64);
    bar.set_message(message.to_string());
}

pub async fn fit(args: &FitArgs) -> Result<()> {
    let Some(data) = &args.data else {
        invalid!(
            "--data PATH is needed to fit in the daemon (a JSONL file, or a folder with \
             train.jsonl and valid.jsonl, on the daemon's machine); or fit offline with \
             --base DIR --library DIR --out PLAN.json"
        );
    };
    let data = absolute(data, "--data")?;
    let params = params_json(&args.param)?;
    let session = connect(&args.connect).await?;
    let experts: Vec<&str> = args.experts.iter().flatten().map(String::as_str).collect();
    let name = args.name.as_deref().unwrap_or_default();
    let path = session
        .daemon
        .fit(&args.policy, &params, &experts, &data, name)
        .await
        .map_err(DaemonError::from)
        .with_context(|| format!("--policy {}", args.policy))?;
    let bar = job_bar(args.json);
    let finished = follow(&session, path, "fit", &|p, m| show(&bar, p, m), true).await;
    bar.finish_and_clear();
    let finished = finished?;
    let result: serde_json::Value = serde_json::from_str(&finished.result)
        .with_context(|| format!("the fit's result is not JSON: {}", finished.result))?;
    if args.json {
        return json(&result);
    }
    let plan = result["plan_name"].as_str().unwrap_or("?");
    match (result["summary"].as_str(), result["valid_loss"].as_f64()) {
        (Some(summary), _) if !summary.is_empty() => println!("stored plan {plan}: {summary}"),
        (_, Some(loss)) => println!("stored plan {plan} (validation loss {loss:.4})"),
        _ => println!("stored plan {plan}"),
    }
    println!(
        "use it with `moerge score --saved {plan} ...` or `moerge eval --saved {plan} --data FILE`"
    );
    Ok(())
}

pub async fn select(args: &SelectArgs) -> Result<()> {
    let data = absolute(&args.data, "--data")?;
    let params = params_json(&args.param)?;
    let session = connect(&args.common.connect).await?;
    let path = session
        .daemon
        .select(&params, &data)
        .await
        .map_err(DaemonError::from)
        .context("select")?;
    let bar = job_bar(args.common.json);
    let finished = follow(&session, path, "selection", &|p, m| show(&bar, p, m), true).await;
    bar.finish_and_clear();
    let finished = finished?;
    let result: serde_json::Value = serde_json::from_str(&finished.result)
        .unwrap_or(serde_json::Value::String(finished.result));
    if args.common.json {
        return json(&result);
    }
    let selection = &result["selection"];
    match (selection["order"].as_array(), selection["active"].as_u64()) {
        (Some(order), Some(active)) => {
            let names: Vec<&str> = order.iter().filter_map(|n| n.as_str()).collect();
            let active = (active as usize).min(names.len());
            println!(
                "selected {active} of {} experts: {}",
                names.len(),
                names[..active].join(", ")
            );
            if let Some(curve) = selection["curve"].as_array() {
                let points: Vec<String> = curve
                    .iter()
                    .filter_map(|c| c.as_f64())
                    .map(|c| format!("{c:.4}"))
                    .collect();
                println!("  loss with the first k experts: {}", points.join(", "));
            }
        }
        _ => json(&result)?,
    }
    Ok(())
}
