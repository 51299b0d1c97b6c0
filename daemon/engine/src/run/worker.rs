//! Dedicated compute threads fed by a channel: heavy tensor work never runs on an async
//! runtime's threads, so a daemon's bus stays responsive during a long forward pass.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::error::{EngineError, Result};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A small pool of named OS threads that run compute jobs in submission order.
pub struct ComputeWorker {
    sender: Option<mpsc::Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

/// The eventual result of a submitted job.
pub struct Pending<T> {
    receiver: mpsc::Receiver<Result<T>>,
}

impl<T> Pending<T> {
    /// Blocks until the job finished. A job that panicked yields an error instead of
    /// taking the caller down with it.
    pub fn wait(self) -> Result<T> {
        self.receiver
            .recv()
            .unwrap_or_else(|_| Err(EngineError::WorkerGone("the job was dropped".into())))
    }
}

impl ComputeWorker {
    /// Starts `threads` compute threads (at least one).
    pub fn spawn(threads: usize) -> std::io::Result<Self> {
        let (sender, receiver) = mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        let threads = (0..threads.max(1))
            .map(|i| {
                let receiver = Arc::clone(&receiver);
                std::thread::Builder::new()
                    .name(format!("moerge-compute-{i}"))
                    .spawn(move || loop {
                        // The lock is held only while taking a job, never while running it.
                        let job = match receiver.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return, // every sender is gone: shut down
                        }
                    })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            sender: Some(sender),
            threads,
        })
    }

    /// Runs `job` on a compute thread; `reply` receives its result (or the panic as an
    /// error) on that thread. Callbacks suit async callers that forward to their own channel.
    pub fn execute<T, F, R>(&self, job: F, reply: R) -> Result<()>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
        R: FnOnce(Result<T>) + Send + 'static,
    {
        let wrapped: Job = Box::new(move || {
            let result = catch_unwind(AssertUnwindSafe(job)).unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(EngineError::WorkerGone(format!(
                    "a compute job panicked: {what}"
                )))
            });
            reply(result);
        });
        self.sender
            .as_ref()
            .ok_or_else(|| EngineError::WorkerGone("shut down".into()))?
            .send(wrapped)
            .map_err(|_| EngineError::WorkerGone("every compute thread has exited".into()))
    }

    /// Runs `job` on a compute thread and returns a handle to wait on.
    pub fn submit<T, F>(&self, job: F) -> Pending<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        let tx2 = tx.clone();
        if let Err(e) = self.execute(job, move |r| {
            let _ = tx.send(r);
        }) {
            let _ = tx2.send(Err(e));
        }
        Pending { receiver: rx }
    }
}

impl Drop for ComputeWorker {
    fn drop(&mut self) {
        // Closing the channel lets each thread finish its current job and exit.
        self.sender.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_jobs_off_the_calling_thread() {
        let worker = ComputeWorker::spawn(2).unwrap();
        let caller = std::thread::current().id();
        let ran_on = worker
            .submit(move || Ok(std::thread::current().name().map(str::to_string)))
            .wait()
            .unwrap();
        assert!(ran_on.unwrap().starts_with("moerge-compute-"));
        let other = worker
            .submit(move || Ok(std::thread::current().id()))
            .wait()
            .unwrap();
        assert_ne!(other, caller);
    }

    #[test]
    fn a_panicking_job_fails_alone() {
        let worker = ComputeWorker::spawn(1).unwrap();
        let err = worker
            .submit(|| -> Result<()> { panic!("boom in the job") })
            .wait()
            .unwrap_err();
        assert!(err.to_string().contains("boom in the job"), "{err}");
        // The same single thread still serves the next job.
        assert_eq!(worker.submit(|| Ok(41 + 1)).wait().unwrap(), 42);
    }
}
