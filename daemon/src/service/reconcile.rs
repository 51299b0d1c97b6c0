//! Bringing the index in line with the library folder, the source of truth: for a whole
//! folder (at start, after a watcher overflow) or for the folders the watcher named.
//!
//! Identity is the content hash. A folder whose file stamps match a trusted stamp in the
//! index is taken as unchanged without being read (the warm path); anything else is read,
//! hashed and compared. A change that leaves hash and state alone is no change. Data derived
//! from an expert is cached by hash, so a renamed folder (same hash, new name) reuses it.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moerge_library::BaseModelInfo;

use super::change::{ChangeCause, ExpertChange, LibraryEvent};
use super::examine::{examine, unchanged_since, Examined, Found};
use super::sketch::{parameter_sketch, SKETCH_KIND};
use super::ServiceError;
use crate::index::{DerivedValue, ExpertRecord, GcReport, Index, LibraryUpdate};

/// What one reconcile did; the startup one is kept in the service's startup report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Folders looked at (present in the folder or in the index).
    pub folders: usize,
    /// Taken as unchanged from their stamps, without reading them.
    pub unchanged: usize,
    /// Read, hashed and parsed.
    pub loaded: usize,
    /// Parameter sketches computed (the others were found in the cache).
    pub sketches_computed: usize,
    /// Folders not settled yet, to look at again.
    pub pending: usize,
    pub gc: GcReport,
    pub elapsed: Duration,
}

pub(crate) struct LibraryState {
    library: PathBuf,
    base: BaseModelInfo,
    base_id: String,
    settle: Duration,
    index: Arc<Index>,
    records: BTreeMap<String, ExpertRecord>,
    pending: BTreeMap<String, Instant>,
    /// Set when the base model changed: states must be recomputed, so no stamp is trusted.
    cold: bool,
}

struct Examination {
    name: String,
    examined: Examined,
    sketch: Option<DerivedValue>,
}

impl LibraryState {
    pub(crate) fn new(
        library: PathBuf,
        base: BaseModelInfo,
        settle: Duration,
        index: Arc<Index>,
    ) -> Result<Self, ServiceError> {
        let base_id = base_identity(&base);
        let records = index
            .experts()?
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        let cold = index.base()?.as_deref() != Some(base_id.as_str());
        Ok(LibraryState {
            library,
            base,
            base_id,
            settle,
            index,
            records,
            pending: BTreeMap::new(),
            cold,
        })
    }

    pub(crate) fn records(&self) -> &BTreeMap<String, ExpertRecord> {
        &self.records
    }

    /// When the earliest unsettled folder is due for another look.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().min().copied()
    }

    pub(crate) fn take_due(&mut self, now: Instant) -> BTreeSet<String> {
        let due: BTreeSet<String> = self
            .pending
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(n, _)| n.clone())
            .collect();
        self.pending.retain(|n, _| !due.contains(n));
        due
    }

    /// Looks at these folders again after the settle time (after a failed update).
    pub(crate) fn defer(&mut self, names: BTreeSet<String>) {
        let due = Instant::now() + self.settle;
        self.pending.extend(names.into_iter().map(|n| (n, due)));
    }

    /// Reconciles the whole folder, then collects garbage (every rename has been seen).
    pub(crate) fn full(
        &mut self,
        cause: ChangeCause,
    ) -> Result<(Option<LibraryEvent>, ReconcileReport), ServiceError> {
        let started = Instant::now();
        let mut names = list_folders(&self.library)?;
        names.extend(self.records.keys().cloned());
        let mut report = ReconcileReport {
            folders: names.len(),
            ..Default::default()
        };
        let use_stamps = !self.cold;
        let event = self.process(names, use_stamps, cause, &mut report)?;
        self.cold = false;
        report.gc = self.index.collect_garbage()?;
        report.pending = self.pending.len();
        report.elapsed = started.elapsed();
        Ok((event, report))
    }

    /// Looks at the named folders only (the watcher's report, or unsettled ones now due).
    pub(crate) fn partial(
        &mut self,
        names: BTreeSet<String>,
    ) -> Result<Option<LibraryEvent>, ServiceError> {
        let mut report = ReconcileReport::default();
        self.process(names, false, ChangeCause::Watch, &mut report)
    }

    fn process(
        &mut self,
        names: BTreeSet<String>,
        use_stamps: bool,
        cause: ChangeCause,
        report: &mut ReconcileReport,
    ) -> Result<Option<LibraryEvent>, ServiceError> {
        let to_examine: Vec<String> = names
            .into_iter()
            .filter(|name| {
                let unchanged = use_stamps
                    && self
                        .records
                        .get(name)
                        .is_some_and(|r| unchanged_since(&self.library.join(name), &r.stamp));
                report.unchanged += usize::from(unchanged);
                !unchanged
            })
            .collect();
        let mut update = LibraryUpdate {
            base: Some(self.base_id.clone()),
            ..Default::default()
        };
        let (mut added, mut removed, mut updated) = (Vec::new(), Vec::new(), Vec::new());
        let mut sketched = HashSet::new();
        for Examination {
            name,
            examined,
            sketch,
        } in self.examine_all(&to_examine)
        {
            self.pending.remove(&name);
            let old = self.records.get(&name);
            let found = match examined {
                Examined::Absent => {
                    if let Some(old) = old {
                        removed.push((name.clone(), old.hash));
                        update.removals.push(name);
                    }
                    continue;
                }
                Examined::Unsettled(wait) => {
                    self.pending.insert(name, Instant::now() + wait);
                    continue;
                }
                Examined::Found(found) => found,
            };
            report.loaded += 1;
            let Found {
                hash,
                state,
                size_bytes,
                stamp,
                ..
            } = *found;
            if let (Some(hash), Some(sketch)) = (hash, sketch) {
                if sketched.insert(hash) {
                    update.derived.push((hash, SKETCH_KIND.to_owned(), sketch));
                }
            }
            let same = old.is_some_and(|o| o.hash == hash && o.state == state);
            let generation = match old {
                Some(o) if same => o.generation,
                Some(o) => o.generation + 1,
                None => 1,
            };
            let record = ExpertRecord {
                name: name.clone(),
                hash,
                generation,
                state: state.clone(),
                size_bytes,
                stamp,
            };
            match old {
                Some(o) if same && o.stamp == stamp => continue,
                Some(_) if same => {}
                Some(o) => updated.push(ExpertChange::Updated {
                    name,
                    old_hash: o.hash,
                    new_hash: hash,
                    state,
                }),
                None => added.push(ExpertChange::Added { name, hash, state }),
            }
            update.upserts.push(record);
        }
        report.sketches_computed += update.derived.len();
        let changes = pair_renames(added, removed, updated);
        update.visible = !changes.is_empty();
        if update.upserts.is_empty()
            && update.removals.is_empty()
            && update.derived.is_empty()
            && !self.cold
        {
            return Ok(None);
        }
        let applied = self.index.apply_library_update(&update)?;
        for name in &update.removals {
            self.records.remove(name);
        }
        for record in update.upserts {
            self.records.insert(record.name.clone(), record);
        }
        Ok(update.visible.then_some(LibraryEvent {
            generation: applied.library_generation,
            cause,
            changes,
            stale_plans: applied.stale_plans,
            refreshed_plans: applied.refreshed_plans,
        }))
    }

    /// Examines folders on all cores: reading and hashing dominate a cold start.
    fn examine_all(&self, names: &[String]) -> Vec<Examination> {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(names.len())
            .max(1);
        let chunk = names.len().div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            let workers: Vec<_> = names
                .chunks(chunk)
                .map(|part| {
                    scope
                        .spawn(move || part.iter().map(|n| self.examine_one(n)).collect::<Vec<_>>())
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("examining a folder does not panic"))
                .collect()
        })
    }

    fn examine_one(&self, name: &str) -> Examination {
        let examined = examine(&self.library.join(name), &self.base, self.settle);
        let ready = match &examined {
            Examined::Found(found) => found.hash.zip(found.adapter.as_ref()),
            _ => None,
        };
        let sketch = ready.and_then(|(hash, adapter)| {
            // A lookup error here only costs a recomputation; the commit reports real ones.
            let cached = self.index.derived_entry(&hash, SKETCH_KIND);
            let cached = cached.ok().flatten().is_some();
            (!cached).then(|| parameter_sketch(adapter))
        });
        // Written here, on the examining threads: a cold start writes one per expert.
        let sketch = sketch.and_then(|bytes| match self.index.stage_derived(&bytes) {
            Ok(value) => Some(value),
            Err(e) => {
                tracing::warn!(
                    name,
                    "could not store a sketch (computed again next time): {e}"
                );
                None
            }
        });
        Examination {
            name: name.to_owned(),
            examined,
            sketch,
        }
    }
}

/// A removal and an addition with the same content in one change are a rename.
fn pair_renames(
    added: Vec<ExpertChange>,
    removed: Vec<(String, Option<moerge_library::ContentHash>)>,
    mut changes: Vec<ExpertChange>,
) -> Vec<ExpertChange> {
    let mut removed: Vec<Option<(String, Option<moerge_library::ContentHash>)>> =
        removed.into_iter().map(Some).collect();
    for change in added {
        let ExpertChange::Added {
            name,
            hash: Some(hash),
            ..
        } = &change
        else {
            changes.push(change);
            continue;
        };
        let gone = removed
            .iter_mut()
            .find(|r| matches!(r, Some((_, Some(h))) if h == hash));
        match gone.and_then(Option::take) {
            Some((from, _)) => changes.push(ExpertChange::Renamed {
                from,
                to: name.clone(),
                hash: *hash,
            }),
            None => changes.push(change),
        }
    }
    changes.extend(
        removed
            .into_iter()
            .flatten()
            .map(|(name, hash)| ExpertChange::Removed { name, hash }),
    );
    changes.sort_by(|a, b| a.name().cmp(b.name()));
    changes
}

/// The adapter folders in the library: visible (no leading dot), UTF-8 named folders.
fn list_folders(library: &Path) -> Result<BTreeSet<String>, ServiceError> {
    let io = |source| ServiceError::Io {
        path: library.to_owned(),
        source,
    };
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(library).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if let Some(name) = crate::watch::folder_name(library, &path) {
            if path.is_dir() {
                names.insert(name);
            }
        }
    }
    Ok(names)
}

/// What the expert states depend on: the base's linear modules and their shapes.
fn base_identity(base: &BaseModelInfo) -> String {
    let mut h = blake3::Hasher::new();
    for (module, shape) in base.linear_modules() {
        h.update(format!("{module} {} {}\n", shape.out_features, shape.in_features).as_bytes());
    }
    format!(
        "{} {} {}",
        base.name(),
        base.model_type(),
        &h.finalize().to_hex()[..16]
    )
}
