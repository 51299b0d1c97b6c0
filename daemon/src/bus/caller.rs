//! Who is calling, and noticing when they leave: bus clients through the bus daemon
//! (`GetConnectionUnixUser`, `NameOwnerChanged`), peer-to-peer clients through their socket
//! (peer credentials, the connection closing).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::StreamExt;
use moerge_bus::{MoergeError, DAEMON_PATH};
use tokio::task::JoinHandle;
use zbus::message::Header;
use zbus::names::BusName;
use zbus::Connection;

use super::{lock, BusError, BusState, Daemon1};
use crate::serving::Caller;

/// The caller of the method whose header this is. `p2p` is the client id of a peer-to-peer
/// connection (its objects carry it), `None` on a bus.
pub(crate) async fn identify(
    state: &BusState,
    header: &Header<'_>,
    conn: &Connection,
    p2p: &Option<String>,
) -> Result<Caller, MoergeError> {
    if let Some(client) = p2p {
        let uid = match conn.peer_creds().await {
            Ok(creds) => creds.unix_user_id(),
            Err(_) => None,
        };
        return Ok(Caller {
            client: client.clone(),
            uid,
        });
    }
    let sender = header
        .sender()
        .ok_or_else(|| MoergeError::AccessDenied("the call carries no sender".into()))?
        .to_string();
    if let Some(uid) = lock(&state.uids).get(&sender) {
        return Ok(Caller {
            client: sender,
            uid: Some(*uid),
        });
    }
    let dbus = zbus::fdo::DBusProxy::new(conn).await?;
    let name = BusName::try_from(sender.as_str())?;
    // A bus that will not say leaves the uid unknown: the caller can still use models.
    let uid = dbus.get_connection_unix_user(name).await.ok();
    if let Some(uid) = uid {
        lock(&state.uids).insert(sender.clone(), uid);
    }
    Ok(Caller {
        client: sender,
        uid,
    })
}

/// Releases a bus client's objects when its unique name goes away.
pub(crate) async fn watch_departures(
    state: Arc<BusState>,
    conn: Connection,
) -> zbus::Result<JoinHandle<()>> {
    let dbus = zbus::fdo::DBusProxy::new(&conn).await?;
    let mut changes = dbus.receive_name_owner_changed().await?;
    Ok(tokio::spawn(async move {
        while let Some(signal) = changes.next().await {
            let Ok(args) = signal.args() else { continue };
            let name = args.name().to_string();
            if name.starts_with(':') && args.new_owner().is_none() {
                state.release_client(&name).await;
            }
        }
    }))
}

/// Serves a private socket: each client that connects gets its own peer-to-peer
/// connection with its own daemon object, and leaving closes it.
pub(crate) async fn listen(path: &Path, state: Arc<BusState>) -> Result<JoinHandle<()>, BusError> {
    let fail = |source| BusError::Listen {
        path: path.to_owned(),
        source,
    };
    // A socket file left by a daemon that died is in the way; anything else is not ours.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            std::fs::remove_file(path).map_err(fail)?;
        }
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(fail)?;
    // Any local peer may connect (and use models), as on a bus; rights come from the peer's
    // credentials. To keep others out, put the socket in a folder they cannot enter.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(fail)?;
    }
    let counter = AtomicU64::new(1);
    Ok(tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("accepting a peer connection: {e}");
                    continue;
                }
            };
            let client = format!("p2p:{}", counter.fetch_add(1, Ordering::Relaxed));
            let state = state.clone();
            tokio::spawn(async move {
                if let Err(e) = accept(stream, client.clone(), state.clone()).await {
                    tracing::warn!(client, "peer connection failed: {e}");
                }
            });
        }
    }))
}

async fn accept(
    stream: tokio::net::UnixStream,
    client: String,
    state: Arc<BusState>,
) -> zbus::Result<()> {
    let stream = stream.into_std()?;
    let conn = zbus::connection::Builder::unix_stream(stream)
        .server(zbus::Guid::generate())
        .p2p()
        .serve_at(
            DAEMON_PATH,
            Daemon1::new(state.clone(), Some(client.clone())),
        )
        .build()
        .await?;
    lock(&state.connections).push(conn.clone());
    state.note_client(&client, &conn);
    conn.closed().await;
    state.release_client(&client).await;
    Ok(())
}
