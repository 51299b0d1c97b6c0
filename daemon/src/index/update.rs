//! The index's write operations, each one transaction: a library change (experts, their
//! derived data, plan staleness, the library generation), plans, clusterings, evaluation
//! rows, selections, and garbage collection.

use std::collections::{BTreeSet, HashSet};

use moerge_library::{AdapterState, ContentHash};

use super::batch::Batch;
use super::error::IndexError;
use super::records::*;
use super::schema::{self, meta, TreeId};
use super::{Index, INLINE_LIMIT};

/// One library change to apply at once.
#[derive(Debug, Default, Clone)]
pub struct LibraryUpdate {
    /// New or changed experts (a record whose hash and state are unchanged only refreshes its
    /// stamps).
    pub upserts: Vec<ExpertRecord>,
    /// Names that left the library.
    pub removals: Vec<String>,
    /// Newly derived data: content hash, kind (e.g. `sketch/v1`), and the value prepared by
    /// [`Index::stage_derived`].
    pub derived: Vec<(ContentHash, String, DerivedValue)>,
    /// The base model identity the states were computed against, when it is to be recorded.
    pub base: Option<String>,
    /// Whether the change is visible to clients (then the library generation is bumped and
    /// clusterings and selections are marked stale).
    pub visible: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedChange {
    pub library_generation: u64,
    /// Plans this change made stale (or stale for a new reason).
    pub stale_plans: Vec<String>,
    /// Plans this change made current again (an expert came back with the same content).
    pub refreshed_plans: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    pub derived_removed: usize,
    pub eval_rows_removed: usize,
    pub blobs_removed: usize,
}

impl Index {
    pub fn apply_library_update(
        &self,
        update: &LibraryUpdate,
    ) -> Result<AppliedChange, IndexError> {
        let mut batch = Batch::new(self);
        let mut touched = BTreeSet::new();
        for name in &update.removals {
            let key = name.as_bytes().to_vec();
            if let Some(old) = batch.get(TreeId::Experts, &key)? {
                if let Some(hash) = schema::decode_expert(&key, &old)?.hash {
                    batch.delete(TreeId::ExpertHashes, schema::hash_name_key(&hash, name));
                }
                batch.delete(TreeId::Experts, key);
                touched.insert(name.clone());
            }
        }
        for record in &update.upserts {
            let key = record.name.as_bytes().to_vec();
            if let Some(old) = batch.get(TreeId::Experts, &key)? {
                if let Some(hash) = schema::decode_expert(&key, &old)?.hash {
                    batch.delete(
                        TreeId::ExpertHashes,
                        schema::hash_name_key(&hash, &record.name),
                    );
                }
            }
            if let Some(hash) = &record.hash {
                batch.put(
                    TreeId::ExpertHashes,
                    schema::hash_name_key(hash, &record.name),
                    b"",
                );
            }
            batch.put(TreeId::Experts, key, &schema::encode_expert(record));
            touched.insert(record.name.clone());
        }
        let mut staged = Vec::new();
        for (hash, kind, value) in &update.derived {
            if let DerivedValue::Blob(id) = value {
                staged.push(*id);
            }
            let key = schema::hash_name_key(hash, kind);
            batch.put(TreeId::Derived, key, &schema::encode_derived(value));
        }
        // Blobs become durable before the commit that names them; see blobs.rs.
        self.blobs.sync()?;
        if let Some(base) = &update.base {
            batch.put(TreeId::Meta, meta::BASE.to_vec(), base.as_bytes());
        }
        let (stale_plans, refreshed_plans) = restale_plans(&mut batch, &touched)?;
        let mut generation = self.library_generation()?;
        if update.visible {
            generation += 1;
            batch.put_u64(meta::LIBRARY_GENERATION, generation);
            mark_library_products_stale(&mut batch)?;
        }
        batch.commit()?;
        self.blobs.unstage(&staged);
        Ok(AppliedChange {
            library_generation: generation,
            stale_plans,
            refreshed_plans,
        })
    }

    /// Prepares a derived value for a later [`LibraryUpdate`]. A big one is written to the
    /// blob folder now, so callers can write many in parallel and off the write lock; it is
    /// kept from garbage collection until an update commits it.
    pub fn stage_derived(&self, bytes: &[u8]) -> Result<DerivedValue, IndexError> {
        if bytes.len() <= INLINE_LIMIT {
            return Ok(DerivedValue::Inline(bytes.to_vec()));
        }
        Ok(DerivedValue::Blob(self.blobs.put_staged(bytes)?))
    }

    /// Stores a plan and its tensors (in blobs). Its staleness is computed against the
    /// experts as they are now.
    pub fn put_plan(
        &self,
        name: &str,
        experts: &[PlanExpert],
        body: &str,
        tensors: &[(&str, &[u8])],
    ) -> Result<PlanRecord, IndexError> {
        let mut batch = Batch::new(self);
        if let Some(old) = batch.get(TreeId::Plans, name.as_bytes())? {
            for e in schema::decode_plan(name.as_bytes(), &old)?.experts {
                batch.delete(TreeId::PlanExperts, schema::plan_expert_key(&e.name, name));
            }
        }
        let mut plan = PlanRecord {
            name: name.to_owned(),
            experts: experts.to_vec(),
            body: body.to_owned(),
            tensors: Default::default(),
            stale: None,
        };
        for (tensor, bytes) in tensors {
            plan.tensors
                .insert((*tensor).to_owned(), self.blobs.put(bytes)?);
        }
        plan.stale = staleness(&batch, &plan)?;
        for e in experts {
            batch.put(
                TreeId::PlanExperts,
                schema::plan_expert_key(&e.name, name),
                b"",
            );
        }
        batch.put(
            TreeId::Plans,
            name.as_bytes().to_vec(),
            &schema::encode_plan(&plan),
        );
        batch.commit()?;
        Ok(plan)
    }

    /// Removes a plan; its blobs go at the next garbage collection. Returns whether it existed.
    pub fn remove_plan(&self, name: &str) -> Result<bool, IndexError> {
        let mut batch = Batch::new(self);
        let Some(old) = batch.get(TreeId::Plans, name.as_bytes())? else {
            return Ok(false);
        };
        for e in schema::decode_plan(name.as_bytes(), &old)?.experts {
            batch.delete(TreeId::PlanExperts, schema::plan_expert_key(&e.name, name));
        }
        batch.delete(TreeId::Plans, name.as_bytes().to_vec());
        batch.commit()?;
        Ok(true)
    }

    pub fn put_clusters(&self, record: &ClusterRecord) -> Result<(), IndexError> {
        let mut batch = Batch::new(self);
        batch.put(
            TreeId::Clusters,
            record.name.as_bytes().to_vec(),
            &schema::encode_clusters(record),
        );
        batch.commit().map(drop)
    }

    pub fn put_eval_row(&self, row: &EvalRow) -> Result<(), IndexError> {
        let mut batch = Batch::new(self);
        batch.put(
            TreeId::EvalRows,
            schema::eval_key(&row.dataset, &row.expert),
            &schema::encode_eval_row(row),
        );
        batch.commit().map(drop)
    }

    pub fn put_selection(&self, record: &SelectionRecord) -> Result<(), IndexError> {
        let mut batch = Batch::new(self);
        batch.put(
            TreeId::Selections,
            record.name.as_bytes().to_vec(),
            &schema::encode_selection(record),
        );
        batch.commit().map(drop)
    }

    /// Drops derived data and evaluation rows of contents no expert has any more, then blobs
    /// no record names and leftover temporary files. Run after a full reconcile, when every
    /// rename has been seen, so a renamed folder keeps its cached data.
    pub fn collect_garbage(&self) -> Result<GcReport, IndexError> {
        let mut report = GcReport::default();
        let mut batch = Batch::new(self);
        let live: HashSet<ContentHash> = batch
            .scan(TreeId::ExpertHashes, b"")?
            .iter()
            .map(|(k, _)| schema::split_hash_key(TreeId::ExpertHashes, k).map(|(h, _)| h))
            .collect::<Result<_, _>>()?;
        let mut referenced = HashSet::new();
        for (key, payload) in batch.scan(TreeId::Derived, b"")? {
            let (hash, _) = schema::split_hash_key(TreeId::Derived, &key)?;
            if !live.contains(&hash) {
                batch.delete(TreeId::Derived, key);
                report.derived_removed += 1;
            } else if let DerivedValue::Blob(id) = schema::decode_derived(&key, &payload)? {
                referenced.insert(id);
            }
        }
        for (key, _) in batch.scan(TreeId::EvalRows, b"")? {
            if key.len() == 64 && !live.contains(&ContentHash(key[32..].try_into().expect("32"))) {
                batch.delete(TreeId::EvalRows, key);
                report.eval_rows_removed += 1;
            }
        }
        for (key, payload) in batch.scan(TreeId::Plans, b"")? {
            referenced.extend(schema::decode_plan(&key, &payload)?.tensors.into_values());
        }
        // The batch still holds the write lock, so no blob is in flight.
        report.blobs_removed = self.blobs.collect_garbage(&referenced)?;
        if report.derived_removed + report.eval_rows_removed > 0 {
            batch.commit()?;
        }
        Ok(report)
    }
}

/// Recomputes the staleness of every plan that names one of `touched`.
fn restale_plans(
    batch: &mut Batch<'_>,
    touched: &BTreeSet<String>,
) -> Result<(Vec<String>, Vec<String>), IndexError> {
    let mut plans = BTreeSet::new();
    for name in touched {
        for (key, _) in batch.scan(TreeId::PlanExperts, &schema::plan_expert_prefix(name))? {
            plans.insert(schema::split_plan_expert_key(&key)?.1.to_owned());
        }
    }
    let (mut stale, mut refreshed) = (Vec::new(), Vec::new());
    for name in plans {
        let key = name.as_bytes().to_vec();
        let Some(payload) = batch.get(TreeId::Plans, &key)? else {
            continue;
        };
        let mut plan = schema::decode_plan(&key, &payload)?;
        let now = staleness(batch, &plan)?;
        if now == plan.stale {
            continue;
        }
        match &now {
            Some(_) => stale.push(name.clone()),
            None => refreshed.push(name.clone()),
        }
        plan.stale = now;
        batch.put(TreeId::Plans, key, &schema::encode_plan(&plan));
    }
    Ok((stale, refreshed))
}

/// Why a plan no longer matches the library, or `None` when every expert it names is
/// there, ready, with the content the plan was made from.
fn staleness(batch: &Batch<'_>, plan: &PlanRecord) -> Result<Option<String>, IndexError> {
    let mut reasons = Vec::new();
    for e in &plan.experts {
        let key = e.name.as_bytes();
        let Some(payload) = batch.get(TreeId::Experts, key)? else {
            reasons.push(format!("expert {} was removed", e.name));
            continue;
        };
        let now = schema::decode_expert(key, &payload)?;
        if now.hash != Some(e.hash) {
            let was = e.hash.short();
            let is = now
                .hash
                .map(|h| h.short())
                .unwrap_or_else(|| "unreadable".into());
            reasons.push(format!("expert {} changed ({was} → {is})", e.name));
        } else if let AdapterState::Rejected { .. } | AdapterState::Incompatible { .. } = now.state
        {
            reasons.push(format!("expert {} is not ready", e.name));
        }
    }
    Ok((!reasons.is_empty()).then(|| reasons.join("; ")))
}

/// Clusterings and selections describe the whole library, so any change outdates them.
fn mark_library_products_stale(batch: &mut Batch<'_>) -> Result<(), IndexError> {
    for (key, payload) in batch.scan(TreeId::Clusters, b"")? {
        let mut c = schema::decode_clusters(&key, &payload)?;
        if !c.stale {
            c.stale = true;
            batch.put(TreeId::Clusters, key, &schema::encode_clusters(&c));
        }
    }
    for (key, payload) in batch.scan(TreeId::Selections, b"")? {
        let mut s = schema::decode_selection(&key, &payload)?;
        if !s.stale {
            s.stale = true;
            batch.put(TreeId::Selections, key, &schema::encode_selection(&s));
        }
    }
    Ok(())
}
