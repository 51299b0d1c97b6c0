//! `moerge inspect`: what an adapter folder holds and whether moerge accepts it, offline.

use std::process::ExitCode;

use anyhow::{Context, Result};
use moerge_library::config::TargetModules;
use moerge_library::source::{self, HubSettings, ModelKind};
use moerge_library::{inspect_adapter, AdapterReport, AdapterState, BaseModelInfo};

use crate::args::InspectArgs;

/// Prints the report; exits 1 when the adapter is rejected or incompatible, so scripts can
/// test it.
pub fn run(args: &InspectArgs) -> Result<ExitCode> {
    let hub = HubSettings::from_env();
    let dir = source::resolve(&args.adapter, ModelKind::Adapter, &hub)
        .with_context(|| format!("adapter {}", args.adapter))?;
    let base = match &args.base {
        Some(spec) => {
            let base_dir = source::resolve(spec, ModelKind::Base, &hub)
                .with_context(|| format!("--base {spec}"))?;
            Some(BaseModelInfo::from_dir(&base_dir).with_context(|| format!("--base {spec}"))?)
        }
        None => None,
    };
    let report = inspect_adapter(&dir, base.as_ref());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report, base.as_ref()));
    }
    Ok(match report.state {
        AdapterState::Ready => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

fn render(r: &AdapterReport, base: Option<&BaseModelInfo>) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<9} {v}\n"));
    line("adapter", format!("{}  ({})", r.name, r.dir.display()));
    match &r.state {
        AdapterState::Ready => line("state", "ready".into()),
        AdapterState::Rejected { reason } => line("state", format!("rejected: {reason}")),
        AdapterState::Incompatible { reason } => line("state", format!("incompatible: {reason}")),
    }
    if let Some(b) = base {
        let verdict = match r.state {
            AdapterState::Ready => "compatible",
            AdapterState::Incompatible { .. } => "incompatible",
            AdapterState::Rejected { .. } => "not checked (adapter rejected)",
        };
        line(
            "base",
            format!("{} ({}): {verdict}", b.name(), b.model_type()),
        );
    }
    if let Some(h) = &r.hash {
        line("hash", h.to_string());
    }
    if let Some(s) = r.size_bytes {
        line("size", human_bytes(s));
    }
    if let Some(p) = &r.peft_type {
        let trained_on = r
            .base_model_name_or_path
            .as_deref()
            .unwrap_or("unknown base");
        line("type", format!("{p}, trained on {trained_on}"));
    }
    if let (Some(rank), Some(alpha), Some(scale)) = (r.rank, r.alpha, r.scale) {
        let rs = if r.use_rslora == Some(true) {
            "  (rsLoRA: alpha/sqrt(r))"
        } else {
            ""
        };
        line(
            "lora",
            format!("r {rank}  alpha {alpha}  scale {scale}{rs}"),
        );
    }
    if let Some(t) = &r.target_modules {
        let targets = match t {
            TargetModules::Names(names) => names.join(", "),
            TargetModules::Regex(re) => format!("regex {re}"),
            TargetModules::AllLinear => "all-linear".into(),
            other => format!("{other:?}"),
        };
        line("targets", targets);
    }
    if !r.modules.is_empty() {
        line("modules", r.modules.len().to_string());
        let width = r
            .modules
            .iter()
            .map(|m| m.module.len())
            .max()
            .unwrap_or(6)
            .max(6);
        out.push_str(&format!(
            "\n{:<width$}  {:>4}  {:>6}  {:>8}  {:<12} {:<12} {}\n",
            "module", "rank", "alpha", "scale", "A", "B", "dtype"
        ));
        for m in &r.modules {
            out.push_str(&format!(
                "{:<width$}  {:>4}  {:>6}  {:>8.4}  {:<12} {:<12} {}\n",
                m.module,
                m.rank,
                m.alpha,
                m.scale,
                format!("{:?}", m.a_shape),
                format!("{:?}", m.b_shape),
                m.a_dtype
            ));
        }
    }
    out
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {} ({n} bytes)", UNITS[unit])
    }
}
