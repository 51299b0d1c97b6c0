//! `moerge explain`: which experts a routed plan gave each token, per layer.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Result;
use moerge_engine::routing::{self, ModuleRouting};
use serde::Serialize;

use crate::args::{ExplainArgs, LocalModelArgs};
use crate::commands::model::{load, Loaded};

#[derive(Serialize)]
struct Explanation {
    tokens: Vec<String>,
    modules: Vec<ModuleRouting>,
}

pub fn explain(args: &ExplainArgs, local: &LocalModelArgs) -> Result<ExitCode> {
    let Loaded {
        model,
        tokenizer,
        worker,
    } = load(local)?;
    let ids = tokenizer.encode(&args.prompt)?;
    let tokens = ids
        .iter()
        .map(|&id| tokenizer.decode(&[id]))
        .collect::<Result<Vec<_>, _>>()?;
    let modules = worker
        .submit(move || routing::explain(&model, &ids))
        .wait()?;
    print(args, tokens, modules)?;
    Ok(ExitCode::SUCCESS)
}

/// Prints routing decisions as `explain` does: JSON, or a table per token and layer.
pub(crate) fn print(
    args: &ExplainArgs,
    tokens: Vec<String>,
    mut modules: Vec<ModuleRouting>,
) -> Result<()> {
    if let Some(wanted) = &args.module {
        modules.retain(|m| &m.module == wanted);
        if modules.is_empty() {
            anyhow::bail!("--module {wanted}: the plan routes no module of that name");
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&Explanation { tokens, modules })?
        );
        return Ok(());
    }
    if modules.is_empty() {
        println!("the plan routes no module: every token uses the same static weights");
        return Ok(());
    }
    print_table(&tokens, &modules, args.top);
    Ok(())
}

/// The layer a module path belongs to (`model.layers.3.mlp.fc1` → `layer 3`), or the path.
pub(crate) fn layer_of(module: &str) -> String {
    let mut parts = module.split('.');
    while let Some(p) = parts.next() {
        if p == "layers" {
            if let Some(n) = parts.next() {
                return format!("layer {n}");
            }
        }
    }
    module.to_string()
}

/// One row per token; per layer, the `top` units by weight averaged over the layer's routed
/// modules.
fn print_table(tokens: &[String], modules: &[ModuleRouting], top: usize) {
    let mut layers: BTreeMap<(usize, String), Vec<&ModuleRouting>> = BTreeMap::new();
    for (i, m) in modules.iter().enumerate() {
        let layer = layer_of(&m.module);
        let first = layers
            .keys()
            .find(|(_, l)| *l == layer)
            .map_or(i, |(k, _)| *k);
        layers.entry((first, layer)).or_default().push(m);
    }
    let header: Vec<String> = layers.keys().map(|(_, l)| l.clone()).collect();
    println!("{:<10} {}", "token", header.join(" | "));
    for (t, token) in tokens.iter().enumerate() {
        let cells: Vec<String> = layers
            .values()
            .map(|mods| {
                let mut totals: BTreeMap<&str, f32> = BTreeMap::new();
                for m in mods {
                    for (unit, w) in m.units.iter().zip(&m.weights[t]) {
                        *totals.entry(unit).or_default() += w / mods.len() as f32;
                    }
                }
                let mut ranked: Vec<(&str, f32)> = totals.into_iter().collect();
                ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
                ranked
                    .iter()
                    .take(top)
                    .filter(|(_, w)| *w > 0.0)
                    .map(|(u, w)| format!("{u} {w:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .collect();
        println!("{:<10} {}", format!("{token:?}"), cells.join(" | "));
    }
}
