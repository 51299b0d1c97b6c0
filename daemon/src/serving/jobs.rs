//! Jobs: fits and selections that outlive the call that started them. Each runs on its own
//! named thread (a fit can take minutes; it must not hold a compute thread that scoring
//! needs), reports progress through a [`JobReporter`], and publishes every change of its
//! status on a watch channel that the bus turns into `PropertiesChanged`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use super::error::ServeError;
use super::hooks::HookError;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobPhase {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobPhase {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobPhase::Succeeded | JobPhase::Failed | JobPhase::Cancelled
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Fit,
    Select,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Fit => "fit",
            JobKind::Select => "select",
        }
    }
}

/// A job's observable state.
#[derive(Debug, Clone, PartialEq)]
pub struct JobStatus {
    pub phase: JobPhase,
    /// 0 to 1.
    pub progress: f64,
    pub message: String,
    /// JSON, once succeeded.
    pub result: String,
    /// For a selection that succeeded: the experts it selected.
    pub selected: Vec<String>,
}

/// One job.
pub struct Job {
    pub id: u64,
    /// The client that started it.
    pub owner: String,
    pub kind: JobKind,
    cancel: AtomicBool,
    status: watch::Sender<JobStatus>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("status", &*self.status.borrow())
            .finish()
    }
}

impl Job {
    pub(crate) fn new(id: u64, owner: String, kind: JobKind) -> Arc<Job> {
        let status = JobStatus {
            phase: JobPhase::Queued,
            progress: 0.0,
            message: String::new(),
            result: String::new(),
            selected: Vec::new(),
        };
        Arc::new(Job {
            id,
            owner,
            kind,
            cancel: AtomicBool::new(false),
            status: watch::channel(status).0,
        })
    }

    pub fn status(&self) -> JobStatus {
        self.status.borrow().clone()
    }

    /// Every status change from now on.
    pub fn watch(&self) -> watch::Receiver<JobStatus> {
        self.status.subscribe()
    }

    /// Asks the job to stop at its next check. A job already finished stays as it is.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.status.send_modify(|s| {
            if s.phase == JobPhase::Queued {
                s.phase = JobPhase::Cancelled;
                s.message = "cancelled before it started".into();
            }
        });
    }

    fn update(&self, f: impl FnOnce(&mut JobStatus)) {
        self.status.send_modify(f);
    }
}

/// What a hook uses to report progress and to see cancellation.
pub struct JobReporter {
    job: Option<Arc<Job>>,
}

impl JobReporter {
    /// A reporter that goes nowhere and is never cancelled (for `Fuse`, which has no job).
    pub fn detached() -> JobReporter {
        JobReporter { job: None }
    }

    /// Reports `fraction` (clamped to 0..1) done, doing `message`.
    pub fn progress(&self, fraction: f64, message: &str) {
        if let Some(job) = &self.job {
            let fraction = if fraction.is_finite() {
                fraction.clamp(0.0, 1.0)
            } else {
                0.0
            };
            job.update(|s| {
                s.progress = fraction;
                s.message = message.to_string();
            });
        }
    }

    /// Whether the job was asked to stop; a hook checks this between steps.
    pub fn is_cancelled(&self) -> bool {
        self.job
            .as_ref()
            .is_some_and(|j| j.cancel.load(Ordering::SeqCst))
    }
}

/// What a job's work returns on success: its result JSON, and the selected experts for a
/// selection.
pub(crate) type JobOutput = (String, Vec<String>);

/// Runs `work` for `job` on a thread of its own.
pub(crate) fn spawn<F>(job: Arc<Job>, work: F) -> Result<(), ServeError>
where
    F: FnOnce(&JobReporter) -> Result<JobOutput, HookError> + Send + 'static,
{
    let name = format!("moerge-job-{}", job.id);
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            if job.cancel.load(Ordering::SeqCst) {
                return;
            }
            job.update(|s| s.phase = JobPhase::Running);
            let reporter = JobReporter {
                job: Some(job.clone()),
            };
            let outcome = catch_unwind(AssertUnwindSafe(|| work(&reporter)));
            job.update(|s| match outcome {
                Ok(Ok((result, selected))) => {
                    s.phase = JobPhase::Succeeded;
                    s.progress = 1.0;
                    s.message = "done".into();
                    s.result = result;
                    s.selected = selected;
                }
                Ok(Err(HookError::Cancelled)) => {
                    s.phase = JobPhase::Cancelled;
                    s.message = "cancelled".into();
                }
                Ok(Err(e)) => {
                    s.phase = JobPhase::Failed;
                    s.message = e.to_string();
                }
                Err(_) => {
                    s.phase = JobPhase::Failed;
                    s.message = "the job panicked (a bug in the policy or the daemon)".into();
                }
            });
        })
        .map(|_| ())
        .map_err(|e| ServeError::Internal(format!("cannot start a job thread: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(job: &Job) -> JobStatus {
        let mut rx = job.watch();
        loop {
            let status = rx.borrow_and_update().clone();
            if status.phase.is_final() {
                return status;
            }
            // Only a hang guard: the job thread is already running.
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    #[test]
    fn outcomes_become_final_states() {
        let ok = Job::new(1, "c".into(), JobKind::Fit);
        spawn(ok.clone(), |r| {
            r.progress(0.5, "half");
            Ok(("{}".into(), vec![]))
        })
        .unwrap();
        let s = finished(&ok);
        assert_eq!(
            (s.phase, s.progress, s.result.as_str()),
            (JobPhase::Succeeded, 1.0, "{}")
        );

        let failing = Job::new(2, "c".into(), JobKind::Fit);
        spawn(failing.clone(), |_| {
            Err(HookError::Failed("plugin said no".into()))
        })
        .unwrap();
        let s = finished(&failing);
        assert_eq!(
            (s.phase, s.message.as_str()),
            (JobPhase::Failed, "plugin said no")
        );

        let panicking = Job::new(3, "c".into(), JobKind::Select);
        spawn(panicking.clone(), |_| panic!("boom")).unwrap();
        assert_eq!(finished(&panicking).phase, JobPhase::Failed);
    }

    #[test]
    fn cancel_is_seen_by_the_hook() {
        let job = Job::new(4, "c".into(), JobKind::Fit);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        spawn(job.clone(), move |r| {
            started_tx.send(()).unwrap();
            while !r.is_cancelled() {
                std::thread::yield_now();
            }
            Err(HookError::Cancelled)
        })
        .unwrap();
        started_rx.recv().unwrap();
        job.cancel();
        assert_eq!(finished(&job).phase, JobPhase::Cancelled);
    }
}
