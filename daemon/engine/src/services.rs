//! The engine behind a policy's host services (`moerge_sdk::policy::HostServices`):
//! `evaluate` scores a plan on the caller's data, `optimize` fits a template with the `fit`
//! layer. The CLI and the daemon hand it to the plugin host; it runs on the compute thread
//! the fit was submitted to.

use std::sync::atomic::{AtomicBool, Ordering};

use moerge_library::{Adapter, F32Tensor, TensorMap};
use moerge_sdk::optimize::{split_teacher_tensors, OptimizeOptions, RouterInit as SdkRouterInit};
use moerge_sdk::policy::{Fitted, HostServices, Record, ServiceError, Split, TensorData};

use crate::fit::distill::Teacher;
use crate::fit::plan_fit::{self, PlanFitOptions, RouterInit};
use crate::models::BaseModel;
use crate::run::examples::{tokenize_records, Example};
use crate::run::TextTokenizer;

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

/// What a fit's host services run on: the base, the fit's experts, and the records it may
/// train and validate on (tokenized once, when the services are built).
pub struct ServicesInput<'a> {
    pub base: &'a BaseModel,
    pub experts: &'a [Adapter],
    pub tokenizer: &'a TextTokenizer,
    pub train: &'a [Record],
    pub valid: &'a [Record],
    /// Setting it stops a running optimisation at its next step.
    pub cancelled: &'a AtomicBool,
}

impl<'a> EngineServices<'a> {
    /// Tokenizes the records once; `progress` receives the policy's reports and the
    /// optimiser's steps.
    pub fn new(
        input: ServicesInput<'a>,
        progress: impl Fn(f64, &str) + Send + Sync + 'a,
    ) -> crate::Result<EngineServices<'a>> {
        Ok(EngineServices {
            base: input.base,
            experts: input.experts,
            train: tokenize_records(input.train, input.tokenizer)?,
            valid: tokenize_records(input.valid, input.tokenizer)?,
            progress: Box::new(progress),
            cancelled: input.cancelled,
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use moerge_sdk::optimize::TEACHER_TENSOR_PREFIX;
    use moerge_sdk::plan::{MergeSpace, ModulePlan};

    use super::*;
    use crate::fit::distill::tests::student;
    use crate::fit::plan_fit::tests::setup;

    #[test]
    fn the_host_service_keeps_the_teachers_tensors_apart_and_out_of_the_result() {
        let (base, experts, _) = setup();
        let tokenizer = TextTokenizer::from_dir(base.info().dir()).unwrap();
        let records: Vec<Record> = ["abc>ABC", "xy>XY", "hello>HELLO"]
            .iter()
            .map(|s| {
                let (p, c) = s.split_once('>').unwrap();
                Record {
                    task: None,
                    prompt: format!("{p}>"),
                    completion: format!("{c}\n"),
                }
            })
            .collect();
        let messages = Mutex::new(Vec::new());
        let cancelled = AtomicBool::new(false);
        let input = ServicesInput {
            base: &base,
            experts: &experts,
            tokenizer: &tokenizer,
            train: &records,
            valid: &[],
            cancelled: &cancelled,
        };
        let services =
            EngineServices::new(input, |_, m| messages.lock().unwrap().push(m.to_string()))
                .unwrap();
        // The teacher is a fixed plan too, whose factors have the student's tensor names.
        let (plan, student_tensors) = student(&experts, 2, 0.0, 5);
        let (teacher_plan, teacher_tensors) = student(&experts, 3, 0.1, 6);
        let mut template = Fitted {
            plan,
            tensors: sdk_tensors(&student_tensors),
        };
        for (k, t) in sdk_tensors(&teacher_tensors) {
            template
                .tensors
                .insert(format!("{TEACHER_TENSOR_PREFIX}{k}"), t);
        }
        let options = OptimizeOptions {
            steps: 3,
            batch_size: 2,
            train_fixed: true,
            teacher: Some(Box::new(teacher_plan.clone())),
            ..Default::default()
        };
        let fitted = services.optimize(&template, &options).unwrap();
        assert_eq!(fitted.tensors.len(), student_tensors.len());
        for (name, t) in &fitted.tensors {
            assert_eq!(t.shape, student_tensors[name].shape, "{name}");
        }
        let messages = messages.lock().unwrap();
        assert!(messages.iter().any(|m| m.contains("KL")), "{messages:?}");
        // A teacher that is not a valid plan is refused, naming it.
        let mut broken = teacher_plan;
        broken.default = ModulePlan::one_hot(0, 2, MergeSpace::Exact);
        let options = OptimizeOptions {
            teacher: Some(Box::new(broken)),
            ..options
        };
        let err = services
            .optimize(&template, &options)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("teacher") && err.contains("default.static.weights"),
            "{err}"
        );
    }
}
