//! `org.moerge.Job1` at `/org/moerge/Job/<n>`: a fit or a selection. Every status change
//! goes out as `PropertiesChanged`.

use std::sync::Arc;

use moerge_bus::{job_path, JobState, MoergeError, DAEMON_PATH};
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{interface, Connection, ObjectServer, OwnedObjectPath};

use super::caller::identify;
use super::convert::error;
use super::{BusState, Daemon1};
use crate::serving::{Caller, Job, JobKind, JobPhase, JobStatus};

pub struct Job1 {
    state: Arc<BusState>,
    job: Arc<Job>,
    p2p: Option<String>,
    /// The status the properties show: one snapshot, replaced as a whole before its changes
    /// are announced, so a client never sees a final state with an older progress or result.
    shown: std::sync::Mutex<JobStatus>,
}

impl Job1 {
    fn shown(&self) -> JobStatus {
        self.shown.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

type Result<T> = std::result::Result<T, MoergeError>;

fn wire_state(phase: JobPhase) -> JobState {
    match phase {
        JobPhase::Queued => JobState::Queued,
        JobPhase::Running => JobState::Running,
        JobPhase::Succeeded => JobState::Succeeded,
        JobPhase::Failed => JobState::Failed,
        JobPhase::Cancelled => JobState::Cancelled,
    }
}

/// Puts a new job on `conn`, forwards its changes, and returns its path.
pub(crate) async fn publish(
    state: &Arc<BusState>,
    conn: &Connection,
    caller: &Caller,
    job: Arc<Job>,
    p2p: Option<String>,
) -> Result<OwnedObjectPath> {
    let path = OwnedObjectPath::try_from(job_path(job.id))?;
    state.note_client(&caller.client, conn);
    let mut changes = job.watch();
    let iface = Job1 {
        state: state.clone(),
        job: job.clone(),
        p2p,
        shown: std::sync::Mutex::new(job.status()),
    };
    conn.object_server().at(path.clone(), iface).await?;
    let conn = conn.clone();
    let at = path.clone();
    tokio::spawn(async move {
        loop {
            let status = changes.borrow_and_update().clone();
            let Ok(iface) = conn.object_server().interface::<_, Job1>(&at).await else {
                return; // released
            };
            let emitter = iface.signal_emitter();
            let job1 = iface.get().await;
            *job1.shown.lock().unwrap_or_else(|p| p.into_inner()) = status.clone();
            // State last: a client that sees the final state has already been sent the
            // progress, message and result of the same snapshot (signals keep their order).
            let _ = job1.progress_changed(emitter).await;
            let _ = job1.message_changed(emitter).await;
            let _ = job1.result_changed(emitter).await;
            let _ = job1.state_changed(emitter).await;
            drop(job1);
            if status.phase.is_final() {
                if job.kind == JobKind::Select && status.phase == JobPhase::Succeeded {
                    if let Ok(daemon) = SignalEmitter::new(&conn, DAEMON_PATH) {
                        let _ = Daemon1::selection_changed(&daemon, status.selected).await;
                    }
                }
                return;
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    });
    Ok(path)
}

#[interface(name = "org.moerge.Job1")]
impl Job1 {
    /// Asks the job to stop; it ends `cancelled` at its next check.
    async fn cancel(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<()> {
        let caller = identify(&self.state, &header, conn, &self.p2p).await?;
        self.state
            .serving
            .cancel_job(&caller, self.job.id)
            .map_err(error)
    }

    /// Forgets the job (cancelling it if it still runs).
    async fn release(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<()> {
        let caller = identify(&self.state, &header, conn, &self.p2p).await?;
        self.state
            .serving
            .release_job(&caller, self.job.id)
            .map_err(error)?;
        server.remove::<Job1, _>(job_path(self.job.id)).await?;
        Ok(())
    }

    /// 0 to 1.
    #[zbus(property)]
    async fn progress(&self) -> f64 {
        self.shown().progress
    }

    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    #[zbus(property)]
    async fn state(&self) -> String {
        wire_state(self.shown().phase).as_str().into()
    }

    /// What the job is doing, or why it failed.
    #[zbus(property)]
    async fn message(&self) -> String {
        self.shown().message
    }

    /// The result (JSON) once succeeded; empty before.
    #[zbus(property)]
    async fn result(&self) -> String {
        self.shown().result
    }

    /// `fit` or `select`.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn kind(&self) -> String {
        self.job.kind.as_str().into()
    }
}
