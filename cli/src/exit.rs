//! The exit codes `moerge` documents, and the error types that carry them through `anyhow`.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | ok |
//! | 1 | failure (anything else) |
//! | 2 | usage (clap) |
//! | 3 | the daemon is unreachable |
//! | 4 | access denied |
//! | 5 | no such expert, plan or object |
//! | 6 | invalid argument |
//! | 7 | a limit was exceeded |
//! | 8 | a policy plugin failed |
//! | 130 | cancelled (Ctrl-C) |

use std::fmt;

use moerge_bus::{ErrorKind, MoergeError};

pub const FAILURE: u8 = 1;
pub const UNREACHABLE: u8 = 3;
pub const ACCESS_DENIED: u8 = 4;
pub const NOT_FOUND: u8 = 5;
pub const INVALID_ARGUMENT: u8 = 6;
pub const LIMIT_EXCEEDED: u8 = 7;
pub const PLUGIN_FAILED: u8 = 8;
pub const CANCELLED: u8 = 130;

/// A flag the first Ctrl-C sets (long offline jobs check it and stop cleanly); a second
/// Ctrl-C exits at once with 130.
pub fn cancel_on_ctrl_c() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let cancelled = std::sync::Arc::new(AtomicBool::new(false));
    let flag = cancelled.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(CANCELLED.into());
        }
        eprintln!("\ncancelling (Ctrl-C again to quit now)");
    })
    .ok();
    cancelled
}

/// An error the daemon replied with, its message as the daemon wrote it (it names the
/// argument at fault).
#[derive(Debug)]
pub struct DaemonError {
    pub kind: ErrorKind,
    pub message: String,
}

impl From<MoergeError> for DaemonError {
    fn from(e: MoergeError) -> DaemonError {
        DaemonError {
            kind: e.kind(),
            message: e.message(),
        }
    }
}

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ErrorKind::ZBus
                if self
                    .message
                    .contains("org.freedesktop.DBus.Error.UnknownMethod") =>
            {
                write!(
                    f,
                    "this moerged does not have that method (is it older than this moerge?): {}",
                    self.message
                )
            }
            ErrorKind::ZBus => write!(f, "D-Bus: {}", self.message),
            ErrorKind::NotSupported => write!(f, "not supported by this daemon: {}", self.message),
            ErrorKind::Internal => write!(f, "the daemon failed: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for DaemonError {}

/// No daemon answered at the address; the message says how to start one.
#[derive(Debug)]
pub struct Unreachable(pub String);

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// The user stopped the command (Ctrl-C).
#[derive(Debug)]
pub struct Cancelled(pub String);

impl fmt::Display for Cancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Cancelled {}

/// An argument the CLI itself refused; the message names it.
#[derive(Debug)]
pub struct InvalidArgument(pub String);

impl fmt::Display for InvalidArgument {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidArgument {}

/// `bail!`-like: an [`InvalidArgument`] error.
macro_rules! invalid {
    ($($arg:tt)*) => {
        return Err(anyhow::Error::new($crate::exit::InvalidArgument(format!($($arg)*))))
    };
}
pub(crate) use invalid;

/// The exit code for an error: the first cause in its chain that has one, else 1.
pub fn code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<DaemonError>() {
            return kind_code(e.kind);
        }
        if let Some(e) = cause.downcast_ref::<MoergeError>() {
            return kind_code(e.kind());
        }
        if cause.is::<Unreachable>() {
            return UNREACHABLE;
        }
        if cause.is::<Cancelled>() {
            return CANCELLED;
        }
        if cause.is::<InvalidArgument>() {
            return INVALID_ARGUMENT;
        }
    }
    FAILURE
}

fn kind_code(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::AccessDenied => ACCESS_DENIED,
        ErrorKind::NoSuchExpert | ErrorKind::NoSuchObject => NOT_FOUND,
        ErrorKind::InvalidArgument => INVALID_ARGUMENT,
        ErrorKind::LimitExceeded => LIMIT_EXCEEDED,
        ErrorKind::PluginFailed => PLUGIN_FAILED,
        ErrorKind::ZBus | ErrorKind::NotSupported | ErrorKind::Internal => FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn codes_come_from_the_first_cause_that_has_one() {
        let daemon = |kind| {
            anyhow::Error::new(DaemonError {
                kind,
                message: "m".into(),
            })
        };
        assert_eq!(code(&daemon(ErrorKind::NoSuchExpert)), NOT_FOUND);
        assert_eq!(code(&daemon(ErrorKind::NoSuchObject)), NOT_FOUND);
        assert_eq!(code(&daemon(ErrorKind::AccessDenied)), ACCESS_DENIED);
        assert_eq!(code(&daemon(ErrorKind::InvalidArgument)), INVALID_ARGUMENT);
        assert_eq!(code(&daemon(ErrorKind::LimitExceeded)), LIMIT_EXCEEDED);
        assert_eq!(code(&daemon(ErrorKind::PluginFailed)), PLUGIN_FAILED);
        assert_eq!(code(&daemon(ErrorKind::NotSupported)), FAILURE);
        let wrapped = Err::<(), _>(daemon(ErrorKind::LimitExceeded))
            .context("--policy arrow")
            .unwrap_err();
        assert_eq!(code(&wrapped), LIMIT_EXCEEDED);
        assert_eq!(
            code(&anyhow::Error::new(Unreachable("x".into()))),
            UNREACHABLE
        );
        assert_eq!(code(&anyhow::Error::new(Cancelled("x".into()))), CANCELLED);
        assert_eq!(code(&anyhow::anyhow!("plain")), FAILURE);
        let bad = (|| -> anyhow::Result<()> { invalid!("--param x: expected KEY=VALUE") })();
        assert_eq!(code(&bad.unwrap_err()), INVALID_ARGUMENT);
    }
}
