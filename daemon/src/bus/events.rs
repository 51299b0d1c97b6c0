//! Library changes out to the bus: a `LibraryChanged` signal per change, the daemon's
//! changed properties, and `Stale` on every model the change made stale.

use std::sync::Arc;

use moerge_bus::{model_path, DAEMON_PATH};
use tokio::sync::broadcast::error::RecvError;
use zbus::object_server::SignalEmitter;

use super::{lock, BusState, Daemon1, Model1};
use crate::service::{ExpertChange, LibraryEvent};

/// Names added, removed and changed by `event` (a rename is a removal and an addition).
pub(crate) fn summarize(event: &LibraryEvent) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (mut added, mut removed, mut changed) = (Vec::new(), Vec::new(), Vec::new());
    for c in &event.changes {
        match c {
            ExpertChange::Added { name, .. } => added.push(name.clone()),
            ExpertChange::Removed { name, .. } => removed.push(name.clone()),
            ExpertChange::Updated { name, .. } => changed.push(name.clone()),
            ExpertChange::Renamed { from, to, .. } => {
                removed.push(from.clone());
                added.push(to.clone());
            }
        }
    }
    (added, removed, changed)
}

pub(crate) async fn forward_library_events(state: Arc<BusState>) {
    let mut events = state.serving.subscribe();
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "the bus fell behind the library's change events"
                );
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let stale = state.serving.note_library_event(&event);
        let (added, removed, changed) = summarize(&event);
        for conn in state.connections() {
            if let Ok(emitter) = SignalEmitter::new(&conn, DAEMON_PATH) {
                let _ = Daemon1::library_changed(
                    &emitter,
                    added.clone(),
                    removed.clone(),
                    changed.clone(),
                    event.generation,
                )
                .await;
            }
            if let Ok(daemon) = conn
                .object_server()
                .interface::<_, Daemon1>(DAEMON_PATH)
                .await
            {
                let iface = daemon.get().await;
                let _ = iface.expert_count_changed(daemon.signal_emitter()).await;
                let _ = iface.generation_changed(daemon.signal_emitter()).await;
            }
        }
        for model in stale {
            let conn = lock(&state.client_connections).get(&model.owner).cloned();
            let Some(conn) = conn else { continue };
            let Ok(iface) = conn
                .object_server()
                .interface::<_, Model1>(model_path(model.id))
                .await
            else {
                continue;
            };
            let _ = iface
                .get()
                .await
                .stale_changed(iface.signal_emitter())
                .await;
        }
    }
}

/// Emits `SelectionChanged` on every connection each time the active set changes.
pub(crate) async fn forward_selection_changes(state: Arc<BusState>) {
    let mut active = state.serving.watch_active_set();
    while active.changed().await.is_ok() {
        let Some(experts) = active.borrow_and_update().clone() else {
            continue;
        };
        for conn in state.connections() {
            if let Ok(emitter) = SignalEmitter::new(&conn, DAEMON_PATH) {
                let _ = Daemon1::selection_changed(&emitter, experts.clone()).await;
            }
        }
    }
}
