//! Keeping the selection and the clustering current: a thread that recomputes both at start
//! and after every library change (bursts coalesced), evaluating only the rows the change
//! made missing, and publishes each result on a watch channel (the bus turns a new active
//! set into `SelectionChanged`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use tokio::sync::{broadcast, watch};

use super::{run, EvalData, RowEvaluator, SelectionReport};
use crate::clustering::{cluster_library, ClusterOptions, Clustering};
use crate::service::Service;

/// One refresh: what it found (each part may have failed on its own).
#[derive(Debug, Clone)]
pub struct Refresh {
    pub generation: u64,
    pub selection: Result<SelectionReport, String>,
    pub clustering: Result<Clustering, String>,
}

impl Refresh {
    /// The active set, when the selection succeeded.
    pub fn active_set(&self) -> Option<&[String]> {
        self.selection
            .as_ref()
            .ok()
            .map(|r| r.selection.active_set())
    }
}

/// The refresher thread. Stops when dropped (after its current refresh) or when the service
/// stops.
pub struct AutoRefresh {
    latest: watch::Receiver<Option<Arc<Refresh>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AutoRefresh {
    /// Starts refreshing on `data` with `evaluator` (built for that data).
    pub fn start(
        service: Arc<Service>,
        data: EvalData,
        evaluator: Box<dyn RowEvaluator + Send>,
        tolerance: f64,
        clustering: ClusterOptions,
    ) -> std::io::Result<AutoRefresh> {
        let (tx, latest) = watch::channel(None);
        let stop = Arc::new(AtomicBool::new(false));
        let mut events = service.subscribe();
        // Only a weak reference between refreshes: the service's owner can still take it back
        // (and shut it down cleanly) while this thread waits for the next change.
        let service: Weak<Service> = Arc::downgrade(&service);
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("moerge-selection".into())
                .spawn(move || loop {
                    let Some(live) = service.upgrade() else {
                        return;
                    };
                    let refresh =
                        refresh_once(&live, &data, &*evaluator, tolerance, &clustering, &stop);
                    drop(live);
                    if let Some(refresh) = refresh {
                        log(&refresh);
                        tx.send_replace(Some(Arc::new(refresh)));
                    }
                    // Wait for the next change, then take every change that piled up.
                    match events.blocking_recv() {
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                            while !matches!(
                                events.try_recv(),
                                Err(broadcast::error::TryRecvError::Empty
                                    | broadcast::error::TryRecvError::Closed)
                            ) {}
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                })?
        };
        Ok(AutoRefresh {
            latest,
            stop,
            thread: Some(thread),
        })
    }

    /// Every refresh from now on (and the latest, already there).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Refresh>>> {
        self.latest.clone()
    }

    pub fn latest(&self) -> Option<Arc<Refresh>> {
        self.latest.borrow().clone()
    }
}

impl Drop for AutoRefresh {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The thread may be waiting for a library event; it sees the flag at the next one,
        // or ends with the service. Joining here could wait for that, so it is detached.
        drop(self.thread.take());
    }
}

fn refresh_once(
    service: &Service,
    data: &EvalData,
    evaluator: &dyn RowEvaluator,
    tolerance: f64,
    clustering: &ClusterOptions,
    stop: &AtomicBool,
) -> Option<Refresh> {
    let lease = service.lease();
    let cancelled = || stop.load(Ordering::SeqCst);
    let selection = run(
        service.index(),
        &lease,
        data,
        evaluator,
        tolerance,
        &mut |done, total, expert| {
            tracing::debug!(done, total, expert, "evaluating an expert for selection")
        },
        &cancelled,
    );
    if cancelled() {
        return None;
    }
    let clustering = cluster_library(service.index(), &lease, clustering);
    Some(Refresh {
        generation: lease.generation(),
        selection: selection.map_err(|e| e.to_string()),
        clustering: clustering.map_err(|e| e.to_string()),
    })
}

fn log(refresh: &Refresh) {
    match &refresh.selection {
        Ok(r) => tracing::info!(
            generation = refresh.generation,
            active = r.selection.active,
            experts = r.selection.order.len(),
            evaluated = r.evaluated.len(),
            "selection refreshed"
        ),
        Err(e) => tracing::warn!(generation = refresh.generation, error = %e, "selection failed"),
    }
    match &refresh.clustering {
        Ok(c) => tracing::info!(
            generation = refresh.generation,
            clusters = c.clusters().len(),
            "clustering refreshed"
        ),
        Err(e) => tracing::warn!(generation = refresh.generation, error = %e, "clustering failed"),
    }
}
