//! `hierarchical`: cluster the experts by the similarity of their LoRA parameters (the MBC
//! recipe, see [`cluster`]), make each cluster a routed unit — a static merge of its members,
//! `1/|cluster|` each — and let the host's trainer learn jointly the in-cluster merge weights
//! and a router over the clusters (zero or Arrow initialised).
//!
//! Parameters: `k` (clusters; default chosen by silhouette over `2..=min(10, N-1)`),
//! `sparsity` (fraction of each expert's smallest-magnitude parameters zeroed before
//! comparing, default 0.5), `dims` (singular directions kept, default 16), `top_k`
//! (clusters mixed per token, default all), `init`, and the optimiser settings.

pub mod cluster;

use moerge_sdk::optimize::{OptimizeOptions, RouterInit};
use moerge_sdk::params::{ParamSpec, Params};
use moerge_sdk::plan::{Granularity, Group, ModulePlan, Router};
use moerge_sdk::policy::{FitContext, Fitted, Policy, PolicyError};

#[derive(Default)]
pub struct Hierarchical;

impl Policy for Hierarchical {
    fn name(&self) -> &str {
        "hierarchical"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn parameters(&self) -> Vec<ParamSpec> {
        let mut specs = vec![
            ParamSpec::optional_int("k", "number of clusters (default: best silhouette)").min(1.0),
            ParamSpec::float(
                "sparsity",
                0.5,
                "fraction of each expert's smallest parameters zeroed before comparing",
            )
            .min(0.0)
            .max(0.99),
            ParamSpec::int("dims", 16, "singular directions kept before the cosine").min(1.0),
            ParamSpec::optional_int("top_k", "clusters mixed per token (default: all)").min(1.0),
            ParamSpec::choice(
                "init",
                &["zero", "arrow"],
                "zero",
                "router start: zeros, or the clusters' Arrow prototypes",
            ),
        ];
        specs.extend(OptimizeOptions::param_specs());
        specs
    }

    fn fit(&self, ctx: &FitContext<'_>, params: &Params) -> Result<Fitted, PolicyError> {
        let experts = ctx.experts();
        let n = experts.len();
        if n == 0 {
            return Err(PolicyError::invalid(
                "hierarchical needs at least one expert",
            ));
        }
        let k = params.opt_int("k")?.map(|k| k as usize);
        if let Some(k) = k.filter(|&k| k > n) {
            return Err(PolicyError::invalid(format!(
                "parameter k is {k}, but there are only {n} experts"
            )));
        }
        ctx.progress(0.0, "comparing the experts' parameters");
        let sparsity = params.float("sparsity")?;
        let similarity =
            cluster::cosine_similarity(experts, sparsity, params.int("dims")? as usize);
        ctx.check_cancelled()?;
        ctx.progress(0.3, "clustering");
        let seed = params.int("seed")? as u64;
        let labels = cluster::cluster(&similarity, n, k, seed);
        let clusters = labels.iter().max().map_or(0, |m| m + 1);
        let groups = (0..clusters)
            .map(|c| {
                let size = labels.iter().filter(|&&l| l == c).count() as f64;
                let weights = labels
                    .iter()
                    .map(|&l| if l == c { 1.0 / size } else { 0.0 });
                let members: Vec<&str> = (experts.iter().zip(&labels))
                    .filter(|(_, &l)| l == c)
                    .map(|(e, _)| e.name.as_str())
                    .collect();
                ctx.progress(0.3, &format!("cluster {c}: {}", members.join(", ")));
                Group {
                    name: Some(format!("cluster-{c}")),
                    weights: weights.collect(),
                }
            })
            .collect::<Vec<_>>();
        let top_k = params
            .opt_int("top_k")?
            .map_or(clusters, |t| (t as usize).min(clusters));
        let template = ctx.plan(ModulePlan::Routed {
            router: Router::Learned,
            top_k,
            temperature: 1.0,
            granularity: Granularity::Token,
            groups,
            mix: Default::default(),
        });
        let options = OptimizeOptions {
            train_routers: true,
            train_group_weights: true,
            router_init: match params.str("init")? {
                "arrow" => RouterInit::Arrow,
                _ => RouterInit::Zero,
            },
            ..OptimizeOptions::from_params(params)?
        };
        ctx.check_cancelled()?;
        ctx.progress(0.4, "training the router and the in-cluster weights");
        ctx.optimize(&Fitted::plan(template), &options)
    }
}

moerge_sdk::export_policy!(Hierarchical);
