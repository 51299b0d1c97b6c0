//! The engine side of serving: the loaded base model, its tokenizer and the compute threads.
//! Every heavy call goes through [`Compute::run`], which hands the work to a
//! `ComputeWorker` thread and awaits the answer, so async tasks never run tensor code and a
//! panic fails that call only.

use std::path::Path;
use std::sync::Arc;

use moerge_engine::{BaseModel, ComputeWorker, Precision, TextTokenizer};

use super::error::ServeError;

pub(crate) struct Compute {
    pub(crate) base: Arc<BaseModel>,
    pub(crate) tokenizer: Arc<TextTokenizer>,
    worker: ComputeWorker,
}

impl Compute {
    pub(crate) fn load(
        base: &Path,
        threads: usize,
        precision: Option<Precision>,
    ) -> Result<Compute, ServeError> {
        let internal = |what: &str, e: &dyn std::fmt::Display| {
            ServeError::Internal(format!("{what} {}: {e}", base.display()))
        };
        let model = BaseModel::load_dir_in(base, precision)
            .map_err(|e| internal("cannot load the base model", &e))?;
        let tokenizer = TextTokenizer::from_dir(base)
            .map_err(|e| internal("cannot load the tokenizer of", &e))?;
        let worker = ComputeWorker::spawn(threads)
            .map_err(|e| internal("cannot start compute threads for", &e))?;
        Ok(Compute {
            base: Arc::new(model),
            tokenizer: Arc::new(tokenizer),
            worker,
        })
    }

    /// Runs `job` on a compute thread and awaits its result. A panic in `job` comes back as
    /// [`ServeError::Internal`].
    pub(crate) async fn run<T, F>(&self, job: F) -> Result<T, ServeError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, ServeError> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.worker
            .execute(
                move || Ok(job()),
                move |result| {
                    let _ = tx.send(result);
                },
            )
            .map_err(|e| ServeError::Internal(e.to_string()))?;
        match rx.await {
            Ok(Ok(result)) => result,
            Ok(Err(engine)) => Err(ServeError::Internal(engine.to_string())),
            Err(_) => Err(ServeError::Internal(
                "the compute thread dropped the job".into(),
            )),
        }
    }
}
