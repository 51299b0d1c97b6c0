//! Who may do what, and how much. Rights are decided from the caller's uid as the bus (or
//! the peer socket) reports it, never from arguments. Limits are per client: a bus unique
//! name, or one peer-to-peer connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::error::ServeError;

/// Who is calling, as the bus layer established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The client: a bus unique name (`:1.42`) or `p2p:<n>`.
    pub client: String,
    /// The caller's uid, from the bus's credentials of the connection; `None` when the bus
    /// would not say (then nothing privileged is allowed).
    pub uid: Option<u32>,
}

/// The privileged actions: changing the library, fitting, selecting, writing files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privileged {
    AddExpert,
    RemoveExpert,
    Fit,
    Select,
    ExportPeft,
    SavePlan,
    RemovePlan,
}

impl Privileged {
    fn method(self) -> &'static str {
        match self {
            Privileged::AddExpert => "AddExpert",
            Privileged::RemoveExpert => "RemoveExpert",
            Privileged::Fit => "Fit",
            Privileged::Select => "Select",
            Privileged::ExportPeft => "ExportPeft",
            Privileged::SavePlan => "SavePlan",
            Privileged::RemovePlan => "RemovePlan",
        }
    }
}

/// The rule: the daemon's own user and root may do privileged things; nobody else may.
pub fn may(caller_uid: Option<u32>, daemon_uid: u32) -> bool {
    matches!(caller_uid, Some(uid) if uid == 0 || uid == daemon_uid)
}

/// [`may`], as an error naming the method and both uids.
pub fn check(caller: &Caller, daemon_uid: u32, action: Privileged) -> Result<(), ServeError> {
    if may(caller.uid, daemon_uid) {
        return Ok(());
    }
    let who = match caller.uid {
        Some(uid) => format!("uid {uid}"),
        None => "a caller whose uid the bus would not tell".into(),
    };
    Err(ServeError::AccessDenied(format!(
        "{}: only the daemon's user (uid {daemon_uid}) and root may call it; you are {who}",
        action.method()
    )))
}

/// Per-client limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientLimits {
    /// Live model objects per client.
    pub models: usize,
    /// Live jobs per client (finished ones count until released or the client leaves).
    pub jobs: usize,
    /// Calls per client running at once (fusing, scoring, generating...).
    pub concurrent_calls: usize,
    /// The largest `max_tokens` a generation may ask for.
    pub max_tokens: u32,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            models: 8,
            jobs: 4,
            concurrent_calls: 4,
            max_tokens: 4096,
        }
    }
}

/// Calls in progress per client.
#[derive(Debug, Default)]
pub(crate) struct CallCounter {
    running: Arc<Mutex<HashMap<String, usize>>>,
}

/// One call in progress; dropping it ends the call.
#[derive(Debug)]
pub(crate) struct CallPermit {
    running: Arc<Mutex<HashMap<String, usize>>>,
    client: String,
}

impl CallCounter {
    pub(crate) fn begin(&self, client: &str, limit: usize) -> Result<CallPermit, ServeError> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let n = running.entry(client.to_string()).or_default();
        if *n >= limit {
            return Err(ServeError::LimitExceeded {
                limit: "concurrent_calls",
                value: limit as u64,
                message: format!("{client} already has {n} calls running; wait for one to end"),
            });
        }
        *n += 1;
        Ok(CallPermit {
            running: self.running.clone(),
            client: client.to_string(),
        })
    }
}

impl Drop for CallPermit {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = running.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                running.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_daemons_user_and_root_are_privileged() {
        let daemon = 1000;
        for (caller, allowed) in [
            (Some(1000), true),
            (Some(0), true),
            (Some(1001), false),
            (Some(65534), false),
            (None, false),
        ] {
            assert_eq!(may(caller, daemon), allowed, "caller {caller:?}");
        }
        // A daemon running as root: only root.
        assert!(may(Some(0), 0));
        assert!(!may(Some(1000), 0));
    }

    #[test]
    fn a_refusal_names_the_method_and_the_uids() {
        let caller = Caller {
            client: ":1.7".into(),
            uid: Some(1001),
        };
        let e = check(&caller, 1000, Privileged::RemoveExpert).unwrap_err();
        assert!(matches!(e, ServeError::AccessDenied(_)));
        let text = e.to_string();
        assert!(
            text.starts_with("RemoveExpert:")
                && text.contains("uid 1000")
                && text.contains("uid 1001"),
            "{text}"
        );
    }

    #[test]
    fn concurrent_calls_are_counted_per_client() {
        let counter = CallCounter::default();
        let a1 = counter.begin("a", 2).unwrap();
        let _a2 = counter.begin("a", 2).unwrap();
        let e = counter.begin("a", 2).unwrap_err();
        assert!(e.to_string().contains("concurrent_calls"), "{e}");
        // Another client is not affected, and ending a call frees a slot.
        let _b = counter.begin("b", 2).unwrap();
        drop(a1);
        counter.begin("a", 2).unwrap();
    }
}
