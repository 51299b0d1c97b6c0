//! The engine behind a policy's host services (`moerge_sdk::policy::HostServices`):
//! `evaluate` scores a plan on the caller's data, `optimize` fits a template with
//! [`crate::plan_fit`]. The CLI and the daemon hand it to the plugin host; it runs on the
//! compute thread the fit was submitted to.

use std::sync::atomic::{AtomicBool, Ordering};

use moerge_library::{Adapter, F32Tensor, TensorMap};
use moerge_sdk::optimize::{split_teacher_tensors, OptimizeOptions, RouterInit as SdkRouterInit};
use moerge_sdk::policy::{Fitted, HostServices, Record, ServiceError, Split, TensorData};

use crate::distill::Teacher;
use crate::model::BaseModel;
use crate::plan_fit::{self, PlanFitOptions, RouterInit};
use crate::tokenizer::TextTokenizer;
use crate::trainer::Example;

/// Where progress reports go: a fraction in `[0, 1]` and a message.
type ProgressSink<'a> = Box<dyn Fn(f64, &str) + Send + Sync + 'a>;

/// Host services backed by a base model and the fit's experts.
pub struct EngineServices<'a> {
    base: &'a BaseModel,
    experts: &'a [Adapter],
    train: Vec<Example>,
    valid: Vec<Example>,
    progress: ProgressSink<'a>,
    cancelled: &'a AtomicBool,
}

impl<'a> EngineServices<'a> {
    /// Tokenizes the records once; `progress` receives the policy's reports and the
    /// optimiser's steps; setting `cancelled` stops a running optimisation at its next step.
    pub fn new(
        base: &'a BaseModel,
        experts: &'a [Adapter],
        tokenizer: &TextTokenizer,
        train: &[Record],
        valid: &[Record],
        progress: impl Fn(f64, &str) + Send + Sync + 'a,
        cancelled: &'a AtomicBool,
    ) -> crate::Result<EngineServices<'a>> {
        let tokenize = |records: &[Record]| -> crate::Result<Vec<Example>> {
            records
                .iter()
                .map(|r| {
                    Ok(Example {
                        task: r.task.clone(),
                        prompt: tokenizer.encode(&r.prompt)?,
                        completion: tokenizer.encode(&r.completion)?,
                    })
                })
                .collect()
        };
        Ok(EngineServices {
            base,
            experts,
            train: tokenize(train)?,
            valid: tokenize(valid)?,
            progress: Box::new(progress),
            cancelled,
        })
    }

    fn data(&self, split: Split) -> Result<&[Example], ServiceError> {
        let (data, name) = match split {
            Split::Train => (&self.train, "training"),
            Split::Valid => (&self.valid, "validation"),
        };
        if data.is_empty() {
            return Err(ServiceError::Failed(format!(
                "no {name} records were given; pass --{} FILE.jsonl",
                if split == Split::Train {
                    "train"
                } else {
                    "valid"
                }
            )));
        }
        Ok(data)
    }
}

/// The SDK's tensors as the library's.
pub(crate) fn tensor_map(tensors: &std::collections::BTreeMap<String, TensorData>) -> TensorMap {
    tensors
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                F32Tensor {
                    shape: t.shape.clone(),
                    data: t.data.clone(),
                },
            )
        })
        .collect()
}

pub(crate) fn sdk_tensors(tensors: &TensorMap) -> std::collections::BTreeMap<String, TensorData> {
    tensors
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                TensorData {
                    shape: t.shape.clone(),
                    data: t.data.clone(),
                },
            )
        })
        .collect()
}

/// The options' teacher, checked as a plan the host could store (a placeholder stands for the
/// tensor file it would get).
fn checked_teacher(
    plan: &moerge_sdk::plan::Plan,
    tensors: &std::collections::BTreeMap<String, TensorData>,
) -> Result<Teacher, ServiceError> {
    let mut check = plan.clone();
    check.tensors = Some("0".repeat(64));
    check
        .validate()
        .map_err(|e| failed(format!("optimize options: teacher: {e}")))?;
    let mut plan = plan.clone();
    plan.tensors = None;
    Ok(Teacher {
        plan,
        tensors: tensor_map(tensors),
    })
}

fn failed(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::Failed(e.to_string())
}

impl HostServices for EngineServices<'_> {
    fn evaluate(&self, fitted: &Fitted, split: Split) -> Result<Vec<f64>, ServiceError> {
        let data = self.data(split)?;
        plan_fit::evaluate_plan(
            self.base,
            self.experts,
            &fitted.plan,
            &tensor_map(&fitted.tensors),
            data,
        )
        .map_err(failed)
    }

    fn optimize(
        &self,
        template: &Fitted,
        options: &OptimizeOptions,
    ) -> Result<Fitted, ServiceError> {
        let data = self.data(options.split)?;
        // A teacher's tensors travel with the template's under a prefix; they stay out of the
        // student and out of the result.
        let (own_tensors, teacher_tensors) = split_teacher_tensors(&template.tensors);
        let teacher = options
            .teacher
            .as_deref()
            .map(|plan| checked_teacher(plan, &teacher_tensors))
            .transpose()?;
        let opts = PlanFitOptions {
            steps: options.steps,
            learning_rate: options.learning_rate,
            batch_size: options.batch_size,
            seed: options.seed,
            merge_weights: options.train_merge_weights,
            group_weights: options.train_group_weights,
            routers: options.train_routers,
            router_init: match options.router_init {
                SdkRouterInit::Arrow => RouterInit::Arrow,
                _ => RouterInit::Zero,
            },
            ensemble_weights: options.train_ensemble_weights,
            fixed: options.train_fixed,
            teacher,
        };
        let what = if opts.teacher.is_some() { "KL" } else { "loss" };
        let mut plan = template.plan.clone();
        plan.tensors = None;
        let fitted = plan_fit::fit_plan(
            self.base,
            self.experts,
            &plan,
            &tensor_map(&own_tensors),
            data,
            &opts,
            |step| {
                (self.progress)(
                    step.step as f64 / step.steps.max(1) as f64,
                    &format!("step {}/{} {what} {:.4}", step.step, step.steps, step.loss),
                );
                if self.cancelled.load(Ordering::Relaxed) {
                    std::ops::ControlFlow::Break(())
                } else {
                    std::ops::ControlFlow::Continue(())
                }
            },
        )
        .map_err(failed)?;
        if self.cancelled.load(Ordering::Relaxed) {
            return Err(ServiceError::Cancelled);
        }
        Ok(Fitted {
            plan: fitted.plan,
            tensors: sdk_tensors(&fitted.tensors),
        })
    }

    fn progress(&self, fraction: f64, message: &str) {
        (self.progress)(fraction, message);
    }

    fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }
}
