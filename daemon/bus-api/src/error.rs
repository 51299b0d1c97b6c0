//! The daemon's named D-Bus errors (`org.moerge.Error.*`). Messages name the argument at
//! fault, e.g. `plan_json: experts[1].hash: ...`.

use zbus::DBusError;

/// Every error a moerge method can reply with. Proxies return it too: a reply named
/// `org.moerge.Error.NoSuchExpert` arrives as [`MoergeError::NoSuchExpert`], anything else
/// (a transport failure, a standard D-Bus error) as [`MoergeError::ZBus`].
#[derive(Debug, DBusError)]
#[zbus(prefix = "org.moerge.Error")]
#[non_exhaustive]
pub enum MoergeError {
    /// Not a moerge error: the connection or the bus failed, or a standard error came back.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// No expert has that name in the library.
    NoSuchExpert(String),
    /// An argument is malformed or does not fit; the message names it.
    InvalidArgument(String),
    /// The caller may not do this (changing the library, fitting and selecting are for the
    /// daemon's own user and root).
    AccessDenied(String),
    /// A per-client limit was reached; the message names the limit and its value.
    LimitExceeded(String),
    /// A fusion policy plugin failed.
    PluginFailed(String),
    /// The model or job object does not exist (any more).
    NoSuchObject(String),
    /// This daemon cannot do that (no policy host, a routed plan cannot be exported...).
    NotSupported(String),
    /// A bug or an I/O failure inside the daemon.
    Internal(String),
}

/// The kind of a [`MoergeError`], without its message: what tests and clients match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    ZBus,
    NoSuchExpert,
    InvalidArgument,
    AccessDenied,
    LimitExceeded,
    PluginFailed,
    NoSuchObject,
    NotSupported,
    Internal,
}

impl MoergeError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            MoergeError::ZBus(_) => ErrorKind::ZBus,
            MoergeError::NoSuchExpert(_) => ErrorKind::NoSuchExpert,
            MoergeError::InvalidArgument(_) => ErrorKind::InvalidArgument,
            MoergeError::AccessDenied(_) => ErrorKind::AccessDenied,
            MoergeError::LimitExceeded(_) => ErrorKind::LimitExceeded,
            MoergeError::PluginFailed(_) => ErrorKind::PluginFailed,
            MoergeError::NoSuchObject(_) => ErrorKind::NoSuchObject,
            MoergeError::NotSupported(_) => ErrorKind::NotSupported,
            MoergeError::Internal(_) => ErrorKind::Internal,
        }
    }

    /// The human-readable message (for [`MoergeError::ZBus`], the transport error's text).
    pub fn message(&self) -> String {
        match self {
            MoergeError::ZBus(e) => e.to_string(),
            MoergeError::NoSuchExpert(m)
            | MoergeError::InvalidArgument(m)
            | MoergeError::AccessDenied(m)
            | MoergeError::LimitExceeded(m)
            | MoergeError::PluginFailed(m)
            | MoergeError::NoSuchObject(m)
            | MoergeError::NotSupported(m)
            | MoergeError::Internal(m) => m.clone(),
        }
    }
}
