//! An in-process harness (cargo feature `testing`) to test a policy without the daemon: make
//! experts in memory, give host services as closures, and run the policy **through the same C
//! ABI path the daemon uses** (its declaration's function table, the same checks).
//!
//! ```
//! use moerge_sdk::testing::{random_expert, FitRequest, Harness, TestServices};
//! # use moerge_sdk::{params::*, policy::*, plan::*};
//! # #[derive(Default)] struct One;
//! # impl Policy for One {
//! #     fn name(&self) -> &str { "one" }
//! #     fn version(&self) -> &str { "0.1.0" }
//! #     fn parameters(&self) -> Vec<ParamSpec> { vec![] }
//! #     fn fit(&self, ctx: &FitContext<'_>, _: &Params) -> Result<Fitted, PolicyError> {
//! #         let n = ctx.experts().len();
//! #         Ok(Fitted::plan(Plan { version: PLAN_VERSION, experts: ctx.expert_refs(),
//! #             default: ModulePlan::Static { weights: vec![1.0 / n as f64; n], space: MergeSpace::Exact, svd_rank: None },
//! #             modules: Default::default(), ensemble: None, tensors: None }))
//! #     }
//! # }
//! # moerge_sdk::export_policy!(One);
//! let harness = Harness::new(moerge_policy_declaration);
//! let modules = [("model.layers.0.mlp.fc1", 8, 16)];
//! let experts = [random_expert("a", &modules, 2, 1), random_expert("b", &modules, 2, 2)];
//! let services = TestServices::new();
//! let fitted = harness.fit(&FitRequest::new(&experts), &services).unwrap();
//! assert_eq!(fitted.plan.experts.len(), 2);
//! assert!(services.calls().is_empty());
//! ```

use std::cell::RefCell;

use crate::abi::{DeclarationError, DeclaredPolicy, FitCallError, PolicyDeclaration};
use crate::optimize::OptimizeOptions;
use crate::params::{ParamError, Params};
use crate::plan::{router_weight_name, ModulePlan, Router};
use crate::policy::{
    ExpertView, FitInputs, Fitted, HostServices, ModuleFactors, Record, ServiceError, Split,
    TensorData,
};

/// A policy under test, reached through its declaration like the daemon does.
#[derive(Debug)]
pub struct Harness {
    policy: DeclaredPolicy,
}

/// Why a harness fit failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HarnessError {
    #[error(transparent)]
    Params(#[from] ParamError),
    #[error(transparent)]
    Fit(#[from] FitCallError),
}

impl Harness {
    /// Checks the declaration of `entry`: pass your crate's `moerge_policy_declaration`, the
    /// function [`crate::export_policy!`] defines.
    ///
    /// # Panics
    /// If the host would refuse the declaration, with the reason.
    pub fn new(entry: extern "C" fn() -> *const PolicyDeclaration) -> Harness {
        Self::try_new(entry).unwrap_or_else(|e| panic!("declaration refused: {e}"))
    }

    /// Like [`Harness::new`], returning the refusal.
    pub fn try_new(
        entry: extern "C" fn() -> *const PolicyDeclaration,
    ) -> Result<Harness, DeclarationError> {
        // SAFETY: an entry made by `export_policy!` returns null or a declaration of this
        // process that lives forever.
        let policy = unsafe { DeclaredPolicy::from_raw(entry()) }?;
        Ok(Harness { policy })
    }

    pub fn policy(&self) -> &DeclaredPolicy {
        &self.policy
    }

    /// Parses the parameters against the declared schema and runs `fit` through the ABI.
    pub fn fit(
        &self,
        request: &FitRequest<'_>,
        services: &dyn HostServices,
    ) -> Result<Fitted, HarnessError> {
        let given: Vec<(String, String)> = request
            .params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let params = Params::parse(self.policy.parameters(), &given)?;
        let views: Vec<ExpertView<'_>> = request.experts.iter().map(TestExpert::view).collect();
        let inputs = FitInputs {
            experts: &views,
            train: request.train,
            valid: request.valid,
        };
        Ok(self.policy.fit(inputs, &params, services)?)
    }
}

/// What to fit on.
#[derive(Debug, Clone, Copy)]
pub struct FitRequest<'a> {
    pub experts: &'a [TestExpert],
    pub train: &'a [Record],
    pub valid: &'a [Record],
    /// `key=value` pairs as a user would type them.
    pub params: &'a [(&'a str, &'a str)],
}

impl<'a> FitRequest<'a> {
    pub fn new(experts: &'a [TestExpert]) -> FitRequest<'a> {
        FitRequest {
            experts,
            train: &[],
            valid: &[],
            params: &[],
        }
    }

    pub fn params(mut self, params: &'a [(&'a str, &'a str)]) -> FitRequest<'a> {
        self.params = params;
        self
    }

    pub fn data(mut self, train: &'a [Record], valid: &'a [Record]) -> FitRequest<'a> {
        self.train = train;
        self.valid = valid;
        self
    }
}

/// An expert held in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct TestExpert {
    pub name: String,
    pub hash: String,
    pub tasks: Vec<String>,
    pub modules: Vec<TestModule>,
}

/// One module's factors: `a` is `[rank, in]`, `b` is `[out, rank]`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct TestModule {
    pub module: String,
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub scale: f64,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

impl TestExpert {
    /// The borrowed view a policy sees (modules sorted by path, as the host gives them).
    pub fn view(&self) -> ExpertView<'_> {
        let mut modules: Vec<ModuleFactors<'_>> = self
            .modules
            .iter()
            .map(|m| ModuleFactors {
                module: &m.module,
                rank: m.rank,
                in_features: m.in_features,
                out_features: m.out_features,
                scale: m.scale,
                a: &m.a,
                b: &m.b,
            })
            .collect();
        modules.sort_by(|x, y| x.module.cmp(y.module));
        ExpertView {
            name: self.name.clone(),
            hash: self.hash.clone(),
            tasks: self.tasks.clone(),
            modules,
        }
    }
}

/// A fake content hash for `name` (64 lowercase hex digits, distinct per name).
pub fn fake_hash(name: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    let mut rng = Rng(h);
    (0..4).map(|_| format!("{:016x}", rng.next_u64())).collect()
}

/// An expert with Gaussian-ish random factors (uniform in [-1, 1), scale 1) of `rank` on each
/// `(module, in_features, out_features)`, reproducible from `seed`.
pub fn random_expert(
    name: &str,
    modules: &[(&str, usize, usize)],
    rank: usize,
    seed: u64,
) -> TestExpert {
    let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
    let modules = modules
        .iter()
        .map(|&(module, in_features, out_features)| TestModule {
            module: module.to_owned(),
            rank,
            in_features,
            out_features,
            scale: 1.0,
            a: (0..rank * in_features).map(|_| rng.uniform()).collect(),
            b: (0..out_features * rank).map(|_| rng.uniform()).collect(),
        })
        .collect();
    TestExpert {
        name: name.to_owned(),
        hash: fake_hash(name),
        tasks: vec![name.to_owned()],
        modules,
    }
}

/// A small seeded generator (splitmix64) for reproducible test data.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// A call a [`TestServices`] received.
#[derive(Debug, Clone, PartialEq)]
pub enum ServiceCall {
    Evaluate(Fitted, Split),
    Optimize(Fitted, OptimizeOptions),
    Progress(f64, String),
}

type EvaluateFn = Box<dyn Fn(&Fitted, Split) -> Result<Vec<f64>, ServiceError>>;
type OptimizeFn = Box<dyn Fn(&Fitted, &OptimizeOptions) -> Result<Fitted, ServiceError>>;

/// Host services for tests: records every call; `evaluate` and `optimize` run the closures
/// given, and fail with a message saying how to give one otherwise.
#[derive(Default)]
pub struct TestServices {
    evaluate: Option<EvaluateFn>,
    optimize: Option<OptimizeFn>,
    cancelled: bool,
    calls: RefCell<Vec<ServiceCall>>,
}

impl TestServices {
    pub fn new() -> TestServices {
        TestServices::default()
    }

    pub fn with_evaluate(
        mut self,
        f: impl Fn(&Fitted, Split) -> Result<Vec<f64>, ServiceError> + 'static,
    ) -> TestServices {
        self.evaluate = Some(Box::new(f));
        self
    }

    pub fn with_optimize(
        mut self,
        f: impl Fn(&Fitted, &OptimizeOptions) -> Result<Fitted, ServiceError> + 'static,
    ) -> TestServices {
        self.optimize = Some(Box::new(f));
        self
    }

    /// `optimize` returns the template unchanged, with zero weights added for learned routers
    /// that have none (shapes from `experts`): a stand-in trainer that trains nothing.
    pub fn echo_optimize(self, experts: &[TestExpert]) -> TestServices {
        let shapes: Vec<(String, usize)> = experts
            .iter()
            .flat_map(|e| e.modules.iter().map(|m| (m.module.clone(), m.in_features)))
            .collect();
        self.with_optimize(move |template, _| Ok(fill_routers(template, &shapes)))
    }

    /// `cancelled()` answers `true`.
    pub fn cancelled(mut self) -> TestServices {
        self.cancelled = true;
        self
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<ServiceCall> {
        self.calls.borrow().clone()
    }

    /// The options of every `optimize` call so far.
    pub fn optimize_calls(&self) -> Vec<(Fitted, OptimizeOptions)> {
        let calls = self.calls.borrow();
        let it = calls.iter().filter_map(|c| match c {
            ServiceCall::Optimize(t, o) => Some((t.clone(), o.clone())),
            _ => None,
        });
        it.collect()
    }
}

fn fill_routers(template: &Fitted, shapes: &[(String, usize)]) -> Fitted {
    let mut out = template.clone();
    for (_, pass) in template.plan.passes() {
        for (module, inputs) in shapes {
            if let ModulePlan::Routed {
                router: Router::Learned,
                groups,
                ..
            } = pass.module(module)
            {
                let units = if groups.is_empty() {
                    pass.experts.len()
                } else {
                    groups.len()
                };
                let name = router_weight_name(module);
                out.tensors
                    .entry(name)
                    .or_insert_with(|| TensorData::zeros(&[units, *inputs]));
            }
        }
    }
    out
}

impl HostServices for TestServices {
    fn evaluate(&self, fitted: &Fitted, split: Split) -> Result<Vec<f64>, ServiceError> {
        let call = ServiceCall::Evaluate(fitted.clone(), split);
        self.calls.borrow_mut().push(call);
        match &self.evaluate {
            Some(f) => f(fitted, split),
            None => Err(ServiceError::Failed(
                "evaluate is not available in the testing harness; pass one with \
                 TestServices::with_evaluate"
                    .into(),
            )),
        }
    }

    fn optimize(
        &self,
        template: &Fitted,
        options: &OptimizeOptions,
    ) -> Result<Fitted, ServiceError> {
        let call = ServiceCall::Optimize(template.clone(), options.clone());
        self.calls.borrow_mut().push(call);
        match &self.optimize {
            Some(f) => f(template, options),
            None => Err(ServiceError::Failed(
                "optimize is not available in the testing harness; pass one with \
                 TestServices::with_optimize or TestServices::echo_optimize"
                    .into(),
            )),
        }
    }

    fn progress(&self, fraction: f64, message: &str) {
        let call = ServiceCall::Progress(fraction, message.to_owned());
        self.calls.borrow_mut().push(call);
    }

    fn cancelled(&self) -> bool {
        self.cancelled
    }
}
