//! Background work after library changes: the plug point for re-clustering and greedy
//! selection (later issues). Hooks run on their own thread, never on the events loop's or
//! an async runtime's, and get every event that piled up while they were busy at once.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::change::LibraryEvent;
use crate::index::Index;

/// Work to run after library changes (e.g. re-cluster, re-select, refresh evaluation rows).
pub trait BackgroundWork: Send + 'static {
    /// Called with the changes since the last call, oldest first.
    fn library_changed(&mut self, events: &[LibraryEvent], index: &Index);
}

pub(crate) fn spawn(
    mut hooks: Vec<Box<dyn BackgroundWork>>,
    index: Arc<Index>,
) -> std::io::Result<(Sender<LibraryEvent>, JoinHandle<()>)> {
    let (tx, rx): (Sender<LibraryEvent>, Receiver<LibraryEvent>) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("moerge-background".into())
        .spawn(move || {
            // Ends when the service drops its sender.
            while let Ok(first) = rx.recv() {
                let mut events = vec![first];
                events.extend(rx.try_iter());
                for hook in &mut hooks {
                    hook.library_changed(&events, &index);
                }
            }
        })?;
    Ok((tx, thread))
}
