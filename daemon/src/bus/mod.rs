//! The D-Bus layer: the only module that knows zbus. It serves `org.moerge.Daemon1` at
//! `/org/moerge/Daemon1`, creates `org.moerge.Model1` and `org.moerge.Job1` objects for the
//! clients that fuse and fit, forwards library changes as signals, and releases a client's
//! objects when it leaves the bus (or closes its peer-to-peer connection).
//!
//! Three ways to be reached ([`BusTarget`]): the session bus, the system bus (a policy file
//! ships in `dist/`), or a private socket where every client gets its own peer-to-peer
//! connection. Callers are identified by the bus's credentials of their connection
//! (`GetConnectionUnixUser`), or the socket's peer credentials; never by arguments.

mod caller;
mod convert;
mod daemon1;
mod events;
mod job1;
mod model1;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use moerge_bus::{DAEMON_PATH, WELL_KNOWN_NAME};
use tokio::task::JoinHandle;
use zbus::Connection;

use crate::serving::Serving;
pub use daemon1::Daemon1;
pub use job1::Job1;
pub use model1::Model1;

/// Where the daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusTarget {
    Session,
    System,
    /// A bus daemon at this address (`unix:path=...`), e.g. a private one in tests.
    Bus(String),
    /// A private socket at this path: no bus daemon, one peer-to-peer connection per client.
    Listen(PathBuf),
}

#[derive(Debug, Clone)]
pub struct BusConfig {
    pub target: BusTarget,
    /// The well-known name to own on a bus ([`WELL_KNOWN_NAME`] by default).
    pub name: String,
}

impl BusConfig {
    pub fn new(target: BusTarget) -> BusConfig {
        BusConfig {
            target,
            name: WELL_KNOWN_NAME.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    #[error("cannot connect to the {what}: {source}")]
    Connect {
        what: String,
        #[source]
        source: zbus::Error,
    },
    #[error("cannot own the name {name} (another moerged is running there?): {source}")]
    Name {
        name: String,
        #[source]
        source: zbus::Error,
    },
    #[error("cannot listen on {}: {source}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the interfaces share.
pub(crate) struct BusState {
    pub(crate) serving: Arc<Serving>,
    /// Every connection signals go out on: the bus connection, or each peer's.
    connections: Mutex<Vec<Connection>>,
    /// The connection each client's objects live on.
    client_connections: Mutex<HashMap<String, Connection>>,
    /// Uids of bus clients, asked of the bus once per unique name.
    uids: Mutex<HashMap<String, u32>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BusState {
    fn connections(&self) -> Vec<Connection> {
        let mut all = lock(&self.connections);
        all.retain(|c| !c.is_closed());
        all.clone()
    }

    pub(crate) fn note_client(&self, client: &str, conn: &Connection) {
        lock(&self.client_connections).insert(client.to_string(), conn.clone());
    }

    /// Frees what `client` owns and removes its objects from the bus.
    pub(crate) async fn release_client(&self, client: &str) {
        let (models, jobs) = self.serving.release_client(client);
        lock(&self.uids).remove(client);
        let conn = lock(&self.client_connections).remove(client);
        if !models.is_empty() || !jobs.is_empty() {
            tracing::info!(
                client,
                models = models.len(),
                jobs = jobs.len(),
                "client left; released its objects"
            );
        }
        let Some(conn) = conn else { return };
        for id in models {
            let _ = conn
                .object_server()
                .remove::<Model1, _>(moerge_bus::model_path(id))
                .await;
        }
        for id in jobs {
            let _ = conn
                .object_server()
                .remove::<Job1, _>(moerge_bus::job_path(id))
                .await;
        }
    }
}

/// The running bus layer. Dropping it stops serving.
pub struct BusHandle {
    connection: Option<Connection>,
    tasks: Vec<JoinHandle<()>>,
}

impl BusHandle {
    /// The bus connection (`None` when serving a private socket).
    pub fn connection(&self) -> Option<&Connection> {
        self.connection.as_ref()
    }
}

impl Drop for BusHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts serving `serving` as `config` says. Must run inside a Tokio runtime (a multi-thread
/// one in the daemon: method calls run as tasks).
pub async fn serve(serving: Arc<Serving>, config: BusConfig) -> Result<BusHandle, BusError> {
    let state = Arc::new(BusState {
        serving,
        connections: Mutex::default(),
        client_connections: Mutex::default(),
        uids: Mutex::default(),
    });
    let events = tokio::spawn(events::forward_library_events(state.clone()));
    let selections = tokio::spawn(events::forward_selection_changes(state.clone()));
    let builder = match &config.target {
        BusTarget::Listen(path) => {
            let listener = caller::listen(path, state.clone()).await?;
            return Ok(BusHandle {
                connection: None,
                tasks: vec![events, selections, listener],
            });
        }
        BusTarget::Session => zbus::connection::Builder::session(),
        BusTarget::System => zbus::connection::Builder::system(),
        BusTarget::Bus(address) => zbus::connection::Builder::address(address.as_str()),
    };
    let what = match &config.target {
        BusTarget::Session => "session bus".to_string(),
        BusTarget::System => "system bus".to_string(),
        other => format!("bus {other:?}"),
    };
    // The object and the departure watch are in place before the name is claimed: a client
    // that sees the name can call at once.
    let connection = builder
        .serve_at(DAEMON_PATH, Daemon1::new(state.clone(), None))
        .build()
        .await
        .map_err(|source| BusError::Connect {
            what: what.clone(),
            source,
        })?;
    lock(&state.connections).push(connection.clone());
    let departures = caller::watch_departures(state.clone(), connection.clone())
        .await
        .map_err(|source| BusError::Connect { what, source })?;
    connection
        .request_name(config.name.as_str())
        .await
        .map_err(|source| BusError::Name {
            name: config.name.clone(),
            source,
        })?;
    Ok(BusHandle {
        connection: Some(connection),
        tasks: vec![events, selections, departures],
    })
}
