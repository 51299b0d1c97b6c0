//! Reaching the daemon: a private socket (`--address unix:path=P`, or `$MOERGE_ADDRESS`),
//! another bus (`--bus-address`), the system bus (`--system`) or the session bus. A daemon
//! that is not there is an [`Unreachable`] error (exit 3) that says how to start one.

use std::path::PathBuf;

use anyhow::Result;
use moerge_bus::{Daemon1Proxy, WELL_KNOWN_NAME};
use zbus::Connection;

use crate::args::ConnectArgs;
use crate::exit::{InvalidArgument, Unreachable};

/// The environment variable that stands in for `--address` when no connection flag is given.
pub const ADDRESS_ENV: &str = "MOERGE_ADDRESS";

/// Where to look for the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A private socket served by `moerged --address unix:path=...`.
    Socket(PathBuf),
    /// A bus daemon at this address.
    Bus(String),
    System,
    Session,
}

impl Target {
    /// The target the flags (and `$MOERGE_ADDRESS`) name.
    pub fn from_args(args: &ConnectArgs) -> Result<Target> {
        let env = std::env::var(ADDRESS_ENV).ok().filter(|s| !s.is_empty());
        if let Some(address) = &args.address {
            return socket(address, "--address");
        }
        if let Some(address) = &args.bus_address {
            return Ok(Target::Bus(address.clone()));
        }
        if args.system {
            return Ok(Target::System);
        }
        match env {
            Some(address) => socket(&address, ADDRESS_ENV),
            None => Ok(Target::Session),
        }
    }

    fn describe(&self) -> String {
        match self {
            Target::Socket(p) => format!("at unix:path={}", p.display()),
            Target::Bus(a) => format!("on the bus at {a}"),
            Target::System => "on the system bus".into(),
            Target::Session => "on the session bus".into(),
        }
    }

    /// How to start a daemon this target would reach.
    fn how_to_start(&self) -> String {
        let flag = match self {
            Target::Socket(p) => format!(" --address unix:path={}", p.display()),
            Target::Bus(a) => format!(" --bus-address {a}"),
            Target::System => " --system".into(),
            Target::Session => String::new(),
        };
        format!(
            "start one with `moerged --library DIR --base DIR{flag}`, or try `moerge demo`; \
             point at another with --address, --bus-address or --system"
        )
    }

    fn unreachable(&self, why: impl std::fmt::Display) -> anyhow::Error {
        anyhow::Error::new(Unreachable(format!(
            "no moerged {} ({why}); {}",
            self.describe(),
            self.how_to_start()
        )))
    }
}

fn socket(address: &str, flag: &str) -> Result<Target> {
    match address.strip_prefix("unix:path=") {
        Some(path) if !path.is_empty() => Ok(Target::Socket(PathBuf::from(path))),
        _ => Err(anyhow::Error::new(InvalidArgument(format!(
            "{flag} {address}: expected unix:path=<socket path> (what `moerged --address` serves)"
        )))),
    }
}

/// A connection to the daemon and its `Daemon1` object.
pub struct Session {
    pub conn: Connection,
    pub daemon: Daemon1Proxy<'static>,
}

/// Connects to the daemon the flags name, checking that one is there.
pub async fn connect(args: &ConnectArgs) -> Result<Session> {
    let target = Target::from_args(args)?;
    let built = match &target {
        Target::Socket(path) => {
            let stream =
                std::os::unix::net::UnixStream::connect(path).map_err(|e| target.unreachable(e))?;
            zbus::connection::Builder::unix_stream(stream)
                .p2p()
                .build()
                .await
        }
        Target::Bus(address) => {
            zbus::connection::Builder::address(address.as_str())
                .build()
                .await
        }
        Target::System => Connection::system().await,
        Target::Session => Connection::session().await,
    };
    let conn = built.map_err(|e| target.unreachable(e))?;
    if !matches!(target, Target::Socket(_)) {
        let bus = zbus::fdo::DBusProxy::new(&conn)
            .await
            .map_err(|e| target.unreachable(e))?;
        let name = zbus::names::BusName::try_from(WELL_KNOWN_NAME).expect("a valid bus name");
        let owned = bus.name_has_owner(name.clone()).await.unwrap_or(false);
        let activatable = !owned
            && bus
                .list_activatable_names()
                .await
                .map(|names| names.iter().any(|n| n.as_str() == WELL_KNOWN_NAME))
                .unwrap_or(false);
        if !owned && !activatable {
            return Err(target.unreachable(format_args!("{WELL_KNOWN_NAME} has no owner")));
        }
    }
    let daemon = Daemon1Proxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .map_err(|e| target.unreachable(e))?;
    Ok(Session { conn, daemon })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_pick_the_target_and_bad_addresses_name_the_flag() {
        let args = |address: Option<&str>, bus: Option<&str>, system| ConnectArgs {
            address: address.map(str::to_string),
            bus_address: bus.map(str::to_string),
            system,
        };
        assert_eq!(
            Target::from_args(&args(Some("unix:path=/tmp/m.sock"), None, false)).unwrap(),
            Target::Socket("/tmp/m.sock".into())
        );
        assert_eq!(
            Target::from_args(&args(None, Some("unix:path=/b"), false)).unwrap(),
            Target::Bus("unix:path=/b".into())
        );
        assert_eq!(
            Target::from_args(&args(None, None, true)).unwrap(),
            Target::System
        );
        let e = Target::from_args(&args(Some("/tmp/m.sock"), None, false)).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("--address /tmp/m.sock: expected unix:path="));
    }
}
