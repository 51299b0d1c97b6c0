//! Printing a report, and checking the paper's orderings on its rows.

use super::{Finding, Report, RowResult};
use crate::remote::output;

/// The paper's orderings among the rows present (a claim whose rows are missing is left out).
pub fn findings(rows: &[RowResult]) -> Vec<Finding> {
    let loss = |key: &str| rows.iter().find(|r| r.key == key).map(|r| r.mean_loss);
    let mut out = Vec::new();
    let mut less = |a: &str, b: &str, strict: bool, claim: &str| {
        if let (Some(x), Some(y)) = (loss(a), loss(b)) {
            out.push(Finding {
                claim: claim.to_string(),
                holds: if strict { x < y } else { x <= y },
            });
        }
    };
    less("oracle", "sgd-router", true, "oracle < SGD router");
    less(
        "sgd-router",
        "learned-ensemble",
        true,
        "SGD router < learned ensemble",
    );
    less(
        "learned-ensemble",
        "uniform-ensemble",
        false,
        "learned ensemble ≤ uniform ensemble",
    );
    less(
        "uniform-ensemble",
        "uniform-ensemble-logit",
        true,
        "probability ensembling < logit ensembling",
    );
    less(
        "learned-ensemble",
        "distilled",
        false,
        "learned ensemble ≤ distilled ensemble",
    );
    less(
        "distilled",
        "uniform-ensemble",
        false,
        "distilled ensemble ≤ uniform ensemble",
    );
    less(
        "learned-merge-per-layer",
        "learned-merge",
        false,
        "learned merge per layer ≤ global learned merge",
    );
    less(
        "uniform-ensemble",
        "lp-ensemble",
        true,
        "uniform ensemble < LP ensemble",
    );
    let row = |key: &str| rows.iter().find(|r| r.key == key);
    if let (Some(lp), Some(uniform)) = (row("lp-ensemble"), row("uniform-ensemble")) {
        out.push(Finding {
            claim: "LP ensemble is sparser than the uniform ensemble".into(),
            holds: lp.passes_per_token < uniform.passes_per_token,
        });
    }
    let fusions: Vec<&RowResult> = rows
        .iter()
        .filter(|r| {
            !matches!(
                r.key.as_str(),
                "base" | "shared" | "oracle" | "oracle-cluster"
            )
        })
        .collect();
    let merges: Vec<&RowResult> = fusions
        .iter()
        .copied()
        .filter(|r| r.key.starts_with("uniform-merge"))
        .collect();
    if !merges.is_empty() && fusions.len() > merges.len() {
        let worst_merge = merges.iter().map(|r| r.mean_loss).fold(f64::MIN, f64::max);
        let others = fusions
            .iter()
            .filter(|r| !r.key.starts_with("uniform-merge"))
            .map(|r| r.mean_loss)
            .fold(f64::MIN, f64::max);
        out.push(Finding {
            claim: "uniform merge is the worst fusion".into(),
            holds: worst_merge >= others,
        });
    }
    out
}

pub fn print(report: &Report) {
    println!(
        "moerge eval: {} tasks, {} {} records, {} experts fused{}\n",
        report.tasks.len(),
        report.records,
        report.split,
        report.fused_experts.len(),
        if report.rows.iter().any(|r| r.fit.is_some()) {
            format!("; learned rows fitted for {} steps", report.fit_steps)
        } else {
            String::new()
        }
    );
    let rows: Vec<Vec<String>> = report
        .rows
        .iter()
        .map(|r| {
            vec![
                r.label.clone(),
                format!("{:.3} ± {:.3}", r.mean_loss, r.standard_error),
                format!("{}", r.passes_per_token),
                r.time_vs_one_expert
                    .map(|t| format!("{t:.2}×"))
                    .unwrap_or_else(|| "-".into()),
                r.fit
                    .as_ref()
                    .map(|f| format!("{:.0} s", f.seconds))
                    .unwrap_or_default(),
            ]
        })
        .collect();
    output::table(
        &[
            "row",
            &format!("{} loss (nats/token)", report.split),
            "passes/token",
            "time/token vs one adapter",
            "fit",
        ],
        &rows,
    );
    println!("\nloss: mean over tasks ± standard error. The paper's orderings on this table:");
    for f in &report.findings {
        println!(
            "  {} {}",
            if f.holds { "holds: " } else { "FAILS: " },
            f.claim
        );
    }
    if let Some(g) = &report.greedy {
        println!(
            "\ngreedy selection (validation losses): {} of {} experts come within {}% of the \
             full library ({:.3}; oracle {}, base {})",
            g.active,
            g.order.len(),
            g.tolerance * 100.0,
            g.full,
            g.oracle.map(|v| format!("{v:.3}")).unwrap_or("-".into()),
            g.base.map(|v| format!("{v:.3}")).unwrap_or("-".into()),
        );
        println!("  active set: {}", g.order[..g.active].join(", "));
    }
    if let Some(s) = &report.similarity {
        let k = s.clusters.iter().max().map_or(0, |m| m + 1);
        println!("\nclusters of the fused experts' updates ({k}):");
        for c in 0..k {
            let members: Vec<&str> = s
                .experts
                .iter()
                .zip(&s.clusters)
                .filter(|(_, &l)| l == c)
                .map(|(e, _)| e.as_str())
                .collect();
            println!("  {}", members.join(", "));
        }
    }
    println!("\ntook {:.0} s", report.seconds);
}
