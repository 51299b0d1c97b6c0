//! Watches the library folder (notify, debounced by notify-debouncer-full) and turns file
//! events into the names of the adapter folders that may have changed.
//!
//! The watcher decides nothing: it reports *which* folders to look at, or that everything
//! must be looked at again (the kernel queue overflowed, the watcher failed, or the library
//! folder itself moved). Whether a folder holds a complete adapter is the service's call.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{new_debouncer, DebounceEventResult, Debouncer, RecommendedCache};

/// What the library watcher saw in one debounced burst.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchBatch {
    /// These adapter folders (by name) may have been added, changed, removed or renamed.
    Changed(BTreeSet<String>),
    /// Events may have been lost: reconcile the whole folder. The string says why.
    Rescan(String),
}

#[derive(Debug, thiserror::Error)]
#[error("cannot watch the library folder {path}: {source}")]
pub struct WatchError {
    pub path: PathBuf,
    #[source]
    pub source: notify::Error,
}

/// A running watcher; dropping it (or [`LibraryWatcher::stop`]) stops it.
pub struct LibraryWatcher {
    debouncer: Debouncer<RecommendedWatcher, RecommendedCache>,
}

impl std::fmt::Debug for LibraryWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibraryWatcher").finish_non_exhaustive()
    }
}

impl LibraryWatcher {
    /// Watches `library` recursively. `sink` is called on the debouncer's thread once per
    /// burst, after `debounce` without new events on the paths involved.
    pub fn start(
        library: &Path,
        debounce: Duration,
        mut sink: impl FnMut(WatchBatch) + Send + 'static,
    ) -> Result<LibraryWatcher, WatchError> {
        let err = |source| WatchError {
            path: library.to_owned(),
            source,
        };
        let root = library.to_owned();
        let handler = move |result: DebounceEventResult| {
            if let Some(batch) = classify(&root, result) {
                sink(batch);
            }
        };
        let mut debouncer = new_debouncer(debounce, None, handler).map_err(err)?;
        debouncer
            .watch(library, RecursiveMode::Recursive)
            .map_err(err)?;
        Ok(LibraryWatcher { debouncer })
    }

    /// Stops the watcher and waits for its thread, so `sink` is not called afterwards.
    pub fn stop(self) {
        self.debouncer.stop();
    }
}

fn classify(root: &Path, result: DebounceEventResult) -> Option<WatchBatch> {
    let events = match result {
        Ok(events) => events,
        Err(errors) => {
            let why = errors.iter().map(|e| e.to_string()).collect::<Vec<_>>();
            return Some(WatchBatch::Rescan(format!(
                "watcher error: {}",
                why.join("; ")
            )));
        }
    };
    let mut names = BTreeSet::new();
    for event in events {
        if event.need_rescan() {
            return Some(WatchBatch::Rescan("the event queue overflowed".into()));
        }
        // Reading a file (ours included: loading an adapter opens it) changes nothing.
        if matches!(event.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write)) {
            continue;
        }
        for path in &event.paths {
            match folder_name(root, path) {
                Some(name) => {
                    names.insert(name);
                }
                None if path == root => {
                    return Some(WatchBatch::Rescan(
                        "the library folder itself changed".into(),
                    ))
                }
                None => {}
            }
        }
    }
    (!names.is_empty()).then_some(WatchBatch::Changed(names))
}

/// The adapter folder a path belongs to: the first component under the library root.
/// Hidden names (a leading `.`) are skipped, so copying into `.name` and renaming is the
/// way to add an adapter atomically.
pub fn folder_name(root: &Path, path: &Path) -> Option<String> {
    match path.strip_prefix(root).ok()?.components().next()? {
        Component::Normal(name) => {
            let name = name.to_str()?;
            (!name.starts_with('.')).then(|| name.to_owned())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, Flag, ModifyKind, RenameMode};
    use notify::Event;
    use notify_debouncer_full::DebouncedEvent;

    fn event(kind: EventKind, paths: &[&str]) -> DebouncedEvent {
        let event = paths
            .iter()
            .fold(Event::new(kind), |e, p| e.add_path(p.into()));
        DebouncedEvent::new(event, std::time::Instant::now())
    }

    fn names(list: &[&str]) -> Option<WatchBatch> {
        Some(WatchBatch::Changed(
            list.iter().map(|s| s.to_string()).collect(),
        ))
    }

    #[test]
    fn bursts_become_folder_names_or_a_rescan() {
        let check = |events: Vec<DebouncedEvent>, expected: Option<WatchBatch>| {
            let got = classify(Path::new("/lib"), Ok(events.clone()));
            assert_eq!(got, expected, "{events:?}");
        };
        let write = EventKind::Access(AccessKind::Close(AccessMode::Write));
        let open = EventKind::Access(AccessKind::Open(AccessMode::Any));
        let create = EventKind::Create(CreateKind::Folder);
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        check(
            vec![event(write, &["/lib/a/adapter_config.json"])],
            names(&["a"]),
        );
        check(vec![event(open, &["/lib/a/adapter_config.json"])], None);
        check(
            vec![event(create, &["/lib/a"]), event(write, &["/lib/b/x"])],
            names(&["a", "b"]),
        );
        check(
            vec![event(rename, &["/lib/a", "/lib/b"])],
            names(&["a", "b"]),
        );
        check(vec![event(create, &["/lib/.staging"])], None);
        let overflow = DebouncedEvent::new(
            Event::new(EventKind::Other).set_flag(Flag::Rescan),
            std::time::Instant::now(),
        );
        assert!(matches!(
            classify(Path::new("/lib"), Ok(vec![overflow])),
            Some(WatchBatch::Rescan(_))
        ));
        let root = event(
            EventKind::Remove(notify::event::RemoveKind::Folder),
            &["/lib"],
        );
        assert!(matches!(
            classify(Path::new("/lib"), Ok(vec![root])),
            Some(WatchBatch::Rescan(_))
        ));
        let error = classify(
            Path::new("/lib"),
            Err(vec![notify::Error::generic("queue lost")]),
        );
        assert!(matches!(error, Some(WatchBatch::Rescan(why)) if why.contains("queue lost")));
    }

    #[test]
    fn paths_map_to_their_adapter_folder() {
        let check = |path: &str, expected: Option<&str>| {
            let got = folder_name(Path::new("/lib"), Path::new(path));
            assert_eq!(got.as_deref(), expected, "{path}");
        };
        check("/lib/rot13/adapter_config.json", Some("rot13"));
        check("/lib/rot13", Some("rot13"));
        check("/lib/a/b/c", Some("a"));
        check("/lib/.partial/adapter_config.json", None);
        check("/lib", None);
        check("/elsewhere/x", None);
    }
}
