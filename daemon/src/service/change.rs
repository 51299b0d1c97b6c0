//! Change events: what the service publishes on its channel after each library change, for
//! the bus layer to forward as D-Bus signals.

use moerge_library::{AdapterState, ContentHash};

/// One change to one expert name.
#[derive(Debug, Clone, PartialEq)]
pub enum ExpertChange {
    Added {
        name: String,
        hash: Option<ContentHash>,
        state: AdapterState,
    },
    /// New content or a new state under the same name (a new generation of that name).
    Updated {
        name: String,
        old_hash: Option<ContentHash>,
        new_hash: Option<ContentHash>,
        state: AdapterState,
    },
    Removed {
        name: String,
        hash: Option<ContentHash>,
    },
    /// The same content left one name and appeared under another; its derived data is kept.
    Renamed {
        from: String,
        to: String,
        hash: ContentHash,
    },
}

impl ExpertChange {
    /// The name the expert has after the change (or had, when removed).
    pub fn name(&self) -> &str {
        match self {
            ExpertChange::Added { name, .. }
            | ExpertChange::Updated { name, .. }
            | ExpertChange::Removed { name, .. } => name,
            ExpertChange::Renamed { to, .. } => to,
        }
    }
}

/// Why the service looked at the library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeCause {
    /// The reconcile at start.
    Startup,
    /// The watcher reported these folders.
    Watch,
    /// A full reconcile after a watcher overflow or error, or on request.
    Rescan,
}

/// One library change, as published. Subscribers that lag behind the channel's capacity
/// miss events and should re-list the library (the generation number tells them).
#[derive(Debug, Clone, PartialEq)]
pub struct LibraryEvent {
    /// The library generation this change produced.
    pub generation: u64,
    pub cause: ChangeCause,
    pub changes: Vec<ExpertChange>,
    /// Stored plans this change made stale.
    pub stale_plans: Vec<String>,
    /// Stored plans this change made current again.
    pub refreshed_plans: Vec<String>,
}
