//! Bus names, object paths and interface names. Versioned: an incompatible change gets a new
//! suffix (`Daemon2`), never an edit of these.

/// The daemon's well-known bus name.
pub const WELL_KNOWN_NAME: &str = "org.moerge.Daemon1";
/// The daemon object.
pub const DAEMON_PATH: &str = "/org/moerge/Daemon1";
/// The daemon object's interface.
pub const DAEMON_INTERFACE: &str = "org.moerge.Daemon1";
/// A fused model's interface.
pub const MODEL_INTERFACE: &str = "org.moerge.Model1";
/// A job's interface (fits and selections).
pub const JOB_INTERFACE: &str = "org.moerge.Job1";
/// Model objects live under this path: `/org/moerge/Model/<n>`.
pub const MODEL_PATH_PREFIX: &str = "/org/moerge/Model";
/// Job objects live under this path: `/org/moerge/Job/<n>`.
pub const JOB_PATH_PREFIX: &str = "/org/moerge/Job";
/// The prefix of every error name the daemon replies with.
pub const ERROR_PREFIX: &str = "org.moerge.Error";

/// The object path of model number `n`.
pub fn model_path(n: u64) -> String {
    format!("{MODEL_PATH_PREFIX}/{n}")
}

/// The object path of job number `n`.
pub fn job_path(n: u64) -> String {
    format!("{JOB_PATH_PREFIX}/{n}")
}
