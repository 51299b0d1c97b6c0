//! moerge's plugin host, the only crate that knows `libloading`: finds policy plugins
//! ([`folders`]), refuses files it should not trust and libraries that are not plugins of
//! this ABI ([`load_policy`]), and runs a policy's `fit` on library adapters
//! ([`LoadedPolicy::fit`]).
//!
//! Loading is separate from the policy contract: the SDK's `Policy` trait and C ABI know
//! nothing about files, so a policy could later run out of process behind the same
//! [`LoadedPolicy`] surface.
//!
//! ```no_run
//! use moerge_policy_host::{standard_folders, PolicyRegistry};
//! let registry = PolicyRegistry::discover(&standard_folders(&[]));
//! for p in registry.policies() {
//!     println!("{} {} ({})", p.name(), p.version(), p.path().display());
//! }
//! for refusal in registry.refusals() {
//!     eprintln!("skipped: {refusal}");
//! }
//! ```

pub mod fit;
pub mod folders;
mod load;

use std::path::{Path, PathBuf};

use moerge_sdk::abi::DeclaredPolicy;
use moerge_sdk::params::ParamSpec;

pub use fit::{records_from_library, ExpertInput, FitError, FitRequest, FittedPlan};
pub use folders::{standard_folders, FileFilter, PolicyFolder};
pub use load::{load_policy, LoadError};

/// A checked, loaded policy plugin (its library stays loaded for the rest of the process).
#[derive(Debug)]
pub struct LoadedPolicy {
    declared: DeclaredPolicy,
    path: PathBuf,
}

impl LoadedPolicy {
    pub fn name(&self) -> &str {
        self.declared.name()
    }

    pub fn version(&self) -> &str {
        self.declared.version()
    }

    /// The moerge-sdk version the plugin was built with.
    pub fn sdk_version(&self) -> &str {
        self.declared.sdk_version()
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn parameters(&self) -> &[ParamSpec] {
        self.declared.parameters()
    }
}

/// Every policy found in some folders, and every file refused, with the reason.
#[derive(Debug, Default)]
pub struct PolicyRegistry {
    policies: Vec<LoadedPolicy>,
    refusals: Vec<LoadError>,
}

impl PolicyRegistry {
    /// Loads every candidate file of `folders`, in order; files within a folder by name.
    /// A folder that does not exist is skipped; one that cannot be read is a refusal.
    pub fn discover(folders: &[PolicyFolder]) -> PolicyRegistry {
        let mut registry = PolicyRegistry::default();
        for folder in folders {
            let entries = match std::fs::read_dir(&folder.path) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    registry.refusals.push(LoadError::Io {
                        path: folder.path.clone(),
                        source,
                    });
                    continue;
                }
            };
            let mut files: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .filter(|e| folder.filter.accepts(&e.file_name().to_string_lossy()))
                .map(|e| e.path())
                .collect();
            files.sort();
            for file in files {
                registry.add_file(&file);
            }
        }
        registry
    }

    /// Loads one file; a refusal is recorded, not returned.
    pub fn add_file(&mut self, path: &Path) {
        match load_policy(path) {
            Ok(policy) => match self.get(policy.name()) {
                Some(first) => self.refusals.push(LoadError::Duplicate {
                    path: path.to_path_buf(),
                    name: policy.name().to_owned(),
                    first: first.path().to_path_buf(),
                }),
                None => self.policies.push(policy),
            },
            Err(e) => self.refusals.push(e),
        }
    }

    /// The policy named `name`.
    pub fn get(&self, name: &str) -> Option<&LoadedPolicy> {
        self.policies.iter().find(|p| p.name() == name)
    }

    /// Loaded policies, in discovery order.
    pub fn policies(&self) -> &[LoadedPolicy] {
        &self.policies
    }

    /// Refused files, each error naming its file and the reason.
    pub fn refusals(&self) -> &[LoadError] {
        &self.refusals
    }
}
