//! The events loop: one thread that owns the library state and is the only writer of
//! experts to the index. It turns watcher reports (and timers for unsettled folders) into
//! index updates, then publishes the new generation and the change event, in that order, so
//! a subscriber that reacts to an event and takes a lease sees at least that generation.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Instant;

use super::change::{ChangeCause, LibraryEvent};
use super::reconcile::LibraryState;
use super::Shared;
use crate::watch::WatchBatch;

pub(crate) enum Msg {
    Watch(WatchBatch),
    Rescan,
    Shutdown,
}

pub(crate) fn run(
    mut state: LibraryState,
    rx: Receiver<Msg>,
    shared: Arc<Shared>,
    background: Sender<LibraryEvent>,
) {
    loop {
        let first = match state.next_deadline() {
            Some(deadline) => {
                match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(msg) => Some(msg),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            None => match rx.recv() {
                Ok(msg) => Some(msg),
                Err(_) => return,
            },
        };
        // Coalesce a burst: everything already queued is handled as one change.
        let mut names = state.take_due(Instant::now());
        let mut rescan = None;
        for msg in first.into_iter().chain(rx.try_iter()) {
            match msg {
                Msg::Shutdown => return,
                Msg::Watch(WatchBatch::Changed(changed)) => names.extend(changed),
                Msg::Watch(WatchBatch::Rescan(why)) => rescan = Some(why),
                Msg::Rescan => rescan = Some("requested".into()),
            }
        }
        let result = match rescan {
            Some(why) => {
                tracing::info!(%why, "reconciling the whole library");
                state.full(ChangeCause::Rescan).map(|(event, _)| event)
            }
            None if names.is_empty() => continue,
            None => state.partial(names.clone()),
        };
        match result {
            Ok(Some(event)) => {
                shared
                    .generations
                    .publish(event.generation, state.records().clone());
                for change in &event.changes {
                    tracing::info!(generation = event.generation, ?change, "library changed");
                }
                // No subscriber is not an error: the bus may not be up yet.
                let _ = shared.events.send(event.clone());
                let _ = background.send(event);
            }
            Ok(None) => {}
            Err(e) => {
                // The folder is still the truth: look at everything again a little later.
                tracing::error!("could not update the index: {e}");
                state.defer(names);
            }
        }
    }
}
