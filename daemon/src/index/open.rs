//! Opening the index: schema version and migrations, the full verification that turns bad
//! bytes into [`Corrupt`], the seal, and moving a damaged index aside to rebuild it.
//!
//! The seal is a small file beside the database holding the number of the last commit that
//! was flushed. sled replays its log only up to the first damaged entry and keeps quiet
//! about the rest, so a database whose commit counter is behind its seal has lost records
//! and is treated as corrupt; so is one whose per-tree digests do not match its records.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::batch::Batch;
use super::blobs::{self, BlobStore};
use super::error::{Corrupt, IndexError};
use super::records::*;
use super::schema::{self, meta, Digest, TreeId, MIGRATIONS, SCHEMA_VERSION};
use super::Index;

const SEAL: &str = "seal";
const SEAL_HEADER: &str = "moerge index seal v1";

/// What [`Index::open_or_rebuild`] did with a damaged index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Why the old index was not used.
    pub reason: String,
    /// Where the old index (database and blobs) now is.
    pub moved_to: PathBuf,
    /// Plans in the old index, which cannot be rebuilt from the library folder; `None` when
    /// the old database could not be read at all.
    pub lost_plans: Option<Vec<String>>,
}

/// What [`Index::check`] verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckReport {
    pub records: usize,
    pub blobs: usize,
}

impl Index {
    /// Opens (or creates) the index in `dir` and verifies every record. A damaged index is an
    /// error here; [`Index::open_or_rebuild`] is what the daemon calls.
    pub fn open(dir: &Path) -> Result<Index, IndexError> {
        fs::create_dir_all(dir).map_err(|e| IndexError::io(dir, e))?;
        let sealed = read_seal(dir)?;
        let db_path = dir.join("db");
        let db = open_sled(&db_path).map_err(|e| IndexError::Open {
            path: db_path.clone(),
            damaged: !matches!(e, sled::Error::Io(_)),
            message: e.to_string(),
        })?;
        let mut trees = Vec::new();
        for t in schema::ALL_TREES {
            trees.push(db.open_tree(t.name()).map_err(|e| IndexError::Open {
                path: db_path.clone(),
                damaged: true,
                message: e.to_string(),
            })?);
        }
        let index = Index {
            blobs: BlobStore::open(&dir.join("blobs"))?,
            dir: dir.to_owned(),
            db,
            trees,
            write_lock: Mutex::new(()),
        };
        index.init_or_migrate(sealed)?;
        index.verify(sealed, false)?;
        Ok(index)
    }

    /// Opens the index; if it is damaged (does not open, wrong schema, corrupt record), moves
    /// it aside as `<dir>.damaged-<unix seconds>` and starts an empty one, which the caller
    /// fills again from the library folder.
    pub fn open_or_rebuild(dir: &Path) -> Result<(Index, Option<Recovery>), IndexError> {
        let err = match Index::open(dir) {
            Ok(index) => return Ok((index, None)),
            Err(e) if e.is_damage() => e,
            Err(e) => return Err(e),
        };
        let lost_plans = salvage_plan_names(&dir.join("db"));
        let moved_to = aside_path(dir);
        fs::rename(dir, &moved_to).map_err(|e| IndexError::io(dir, e))?;
        tracing::warn!(
            reason = %err,
            moved_to = %moved_to.display(),
            "index damaged: moved aside, rebuilding from the library folder"
        );
        match &lost_plans {
            Some(plans) if !plans.is_empty() => {
                tracing::warn!(plans = ?plans, "these plans cannot be rebuilt; they remain in the moved-aside index")
            }
            None => tracing::warn!("the damaged index could not be read; any plans it held are only in the moved-aside copy"),
            _ => {}
        }
        let index = Index::open(dir)?;
        Ok((
            index,
            Some(Recovery {
                reason: err.to_string(),
                moved_to,
                lost_plans,
            }),
        ))
    }

    /// Verifies everything [`Index::open`] does, and also that every blob's bytes still hash
    /// to its id.
    pub fn check(&self) -> Result<CheckReport, IndexError> {
        self.verify(read_seal(&self.dir)?, true)
    }

    fn init_or_migrate(&self, sealed: Option<u64>) -> Result<(), IndexError> {
        let version = self.read_meta(meta::SCHEMA_VERSION)?;
        let version = version
            .map(|b| schema::decode_u32(meta::SCHEMA_VERSION, &b))
            .transpose()?;
        match version {
            None => {
                let empty = self.trees.iter().all(|t| t.is_empty());
                if !empty {
                    return Err(Corrupt::new(
                        "meta",
                        meta::SCHEMA_VERSION,
                        "records but no schema version",
                    )
                    .into());
                }
                if let Some(commit) = sealed.filter(|c| *c > 0) {
                    let why = format!("the database is empty but commit {commit} was sealed: its records were lost");
                    return Err(Corrupt::new("meta", meta::COMMIT, why).into());
                }
                let mut batch = Batch::new(self);
                batch.put(
                    TreeId::Meta,
                    meta::SCHEMA_VERSION.to_vec(),
                    &SCHEMA_VERSION.to_be_bytes(),
                );
                batch.commit().map(drop)
            }
            Some(v) if v == SCHEMA_VERSION => Ok(()),
            // Empty while SCHEMA_VERSION is 1; kept so the first migration only adds a step.
            #[allow(clippy::impossible_comparisons)]
            Some(v) if v >= 1 && v < SCHEMA_VERSION => {
                for (step, migrate) in MIGRATIONS.iter().enumerate().skip(v as usize - 1) {
                    migrate(&self.db).map_err(|e| self.store_error(e))?;
                    let mut batch = Batch::new(self);
                    let to = step as u32 + 2;
                    batch.put(
                        TreeId::Meta,
                        meta::SCHEMA_VERSION.to_vec(),
                        &to.to_be_bytes(),
                    );
                    batch.commit()?;
                }
                Ok(())
            }
            Some(found) => Err(IndexError::WrongSchema {
                path: self.dir.clone(),
                found,
                supported: SCHEMA_VERSION,
            }),
        }
    }

    /// Decodes every record, recomputes every tree's digest, checks the trees against each
    /// other and every referenced blob against the blob folder.
    fn verify(&self, sealed: Option<u64>, hash_blobs: bool) -> Result<CheckReport, IndexError> {
        let commit = self.read_u64(meta::COMMIT)?.unwrap_or(0);
        if let Some(s) = sealed.filter(|s| *s > commit) {
            let why = format!(
                "the database is at commit {commit} but commit {s} was sealed: records were lost"
            );
            return Err(Corrupt::new("meta", meta::COMMIT, why).into());
        }
        for (key, value) in self.raw_scan(TreeId::Meta, b"")? {
            schema::unframe(TreeId::Meta, &key, &value)?;
        }
        let mut records = 0;
        for tree in self.all_trees().filter(|t| *t != TreeId::Meta) {
            let mut digest = Digest::default();
            for (key, value) in self.raw_scan(tree, b"")? {
                // Check the frame first, so damage inside a record names that record.
                schema::unframe(tree, &key, &value)?;
                digest.toggle(schema::entry_hash(&key, &value), true);
                records += 1;
            }
            if digest != self.read_digest(tree)? {
                let why = format!("{} records do not match the recorded digest", digest.count);
                return Err(Corrupt::new(tree.name(), b"", why).into());
            }
        }
        let mut blobs = self.check_cross_references()?;
        let mut blob_count = 0;
        for (owner, id) in blobs.drain() {
            if !self.blobs.exists(&id) || (hash_blobs && !self.blobs.verify(&id)?) {
                return Err(IndexError::MissingBlob {
                    blob: id.to_string(),
                    owner,
                    path: self.blobs.path(&id),
                });
            }
            blob_count += 1;
        }
        Ok(CheckReport {
            records,
            blobs: blob_count,
        })
    }

    /// Decodes every record and checks that the secondary trees match the primary ones.
    /// Returns the referenced blobs with the record that names each.
    fn check_cross_references(&self) -> Result<HashSet<(String, BlobId)>, IndexError> {
        let experts = self.experts()?;
        let mut expected: HashSet<Vec<u8>> = experts
            .iter()
            .filter_map(|e| e.hash.map(|h| schema::hash_name_key(&h, &e.name)))
            .collect();
        for (key, _) in self.raw_scan(TreeId::ExpertHashes, b"")? {
            schema::split_hash_key(TreeId::ExpertHashes, &key)?;
            if !expected.remove(&key) {
                return Err(Corrupt::new(
                    "expert_hashes",
                    &key,
                    "no expert has this name and hash",
                )
                .into());
            }
        }
        if let Some(key) = expected.into_iter().next() {
            return Err(Corrupt::new("expert_hashes", &key, "entry missing for an expert").into());
        }
        let mut blobs = HashSet::new();
        let plans = self.plans()?;
        let mut expected: HashSet<Vec<u8>> = HashSet::new();
        for p in &plans {
            expected.extend(
                p.experts
                    .iter()
                    .map(|e| schema::plan_expert_key(&e.name, &p.name)),
            );
            blobs.extend(
                p.tensors
                    .values()
                    .map(|id| (format!("plan {}", p.name), *id)),
            );
        }
        for (key, _) in self.raw_scan(TreeId::PlanExperts, b"")? {
            schema::split_plan_expert_key(&key)?;
            if !expected.remove(&key) {
                return Err(Corrupt::new("plan_experts", &key, "no plan names this expert").into());
            }
        }
        if let Some(key) = expected.into_iter().next() {
            return Err(Corrupt::new("plan_experts", &key, "entry missing for a plan").into());
        }
        let derived = self.decode_all(TreeId::Derived, b"", |k, v| {
            let (hash, _) = schema::split_hash_key(TreeId::Derived, k)?;
            Ok((hash, schema::decode_derived(k, v)?))
        })?;
        for (hash, value) in derived {
            if let DerivedValue::Blob(id) = value {
                blobs.insert((format!("derived data of {}", hash.short()), id));
            }
        }
        self.clusters()?;
        self.selections()?;
        self.decode_all(TreeId::EvalRows, b"", schema::decode_eval_row)?;
        Ok(blobs)
    }
}

/// How long [`open_sled`] waits for a lock this process's last handle still holds.
const RELEASE_WAIT: Duration = Duration::from_secs(3);

/// Opens the sled database. Dropping a `sled::Db` does not release its file lock at once:
/// its background threads let go a moment later (sled issue 1289), so an open straight
/// after a close in the same process can find the lock taken. Only one moerged uses a
/// state folder (`service::lock`), so a taken lock is our own last handle and worth a
/// short wait; anything else fails at once.
fn open_sled(path: &Path) -> sled::Result<sled::Db> {
    let start = Instant::now();
    loop {
        match sled::Config::new().path(path).open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && start.elapsed() < RELEASE_WAIT =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

pub(crate) fn write_seal(dir: &Path, commit: u64) -> Result<(), IndexError> {
    let tmp = dir.join("seal.tmp");
    let body = format!("{SEAL_HEADER}\ncommit {commit}\n");
    let io = |p: &Path| {
        let p = p.to_owned();
        move |e| IndexError::io(p, e)
    };
    let file = fs::File::create(&tmp).map_err(io(&tmp))?;
    std::io::Write::write_all(&mut &file, body.as_bytes()).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, dir.join(SEAL)).map_err(io(dir))?;
    blobs::sync_dir(dir)
}

fn read_seal(dir: &Path) -> Result<Option<u64>, IndexError> {
    let path = dir.join(SEAL);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => String::new(),
        Err(e) => return Err(IndexError::io(path, e)),
    };
    let commit = text
        .strip_prefix(SEAL_HEADER)
        .and_then(|rest| rest.strip_prefix("\ncommit "))
        .and_then(|rest| rest.strip_suffix('\n'))
        .and_then(|n| n.parse().ok());
    match commit {
        Some(c) => Ok(Some(c)),
        None => Err(Corrupt::new("seal", SEAL.as_bytes(), "unreadable seal file").into()),
    }
}

/// The names of the plans in a damaged database, read as leniently as possible.
fn salvage_plan_names(db_path: &Path) -> Option<Vec<String>> {
    let db = open_sled(db_path).ok()?;
    let plans = db.open_tree(TreeId::Plans.name()).ok()?;
    let names = plans
        .iter()
        .keys()
        .filter_map(|k| k.ok())
        .map(|k| String::from_utf8_lossy(&k).into_owned())
        .collect();
    Some(names)
}

fn aside_path(dir: &Path) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "index".into());
    let mut n = 0;
    loop {
        let suffix = if n == 0 {
            String::new()
        } else {
            format!("-{n}")
        };
        let candidate = dir.with_file_name(format!("{name}.damaged-{secs}{suffix}"));
        if !candidate.exists() {
            return candidate;
        }
        n += 1;
    }
}
