//! Daemon methods the CLI calls by name, with the signatures the daemon's policy runner
//! adds (`Fit` with a plan name, `SavePlan`, `RemovePlan`, `FuseSaved`). Errors come back as
//! [`MoergeError`]s, like the proxies'.

use moerge_bus::{Daemon1Proxy, MoergeError, PlanInfo};
use zbus::OwnedObjectPath;

type Result<T> = std::result::Result<T, MoergeError>;

/// `FuseSaved(name s) -> o`: fuses a stored plan.
pub async fn fuse_saved(daemon: &Daemon1Proxy<'_>, name: &str) -> Result<OwnedObjectPath> {
    Ok(daemon.inner().call("FuseSaved", &(name,)).await?)
}

/// `SavePlan(name s, path s) -> PlanInfo`: stores the plan file at `path` under `name`.
pub async fn save_plan(daemon: &Daemon1Proxy<'_>, name: &str, path: &str) -> Result<PlanInfo> {
    Ok(daemon.inner().call("SavePlan", &(name, path)).await?)
}

/// `RemovePlan(name s)`.
pub async fn remove_plan(daemon: &Daemon1Proxy<'_>, name: &str) -> Result<()> {
    Ok(daemon.inner().call("RemovePlan", &(name,)).await?)
}

/// `Fit(policy s, params s, experts as, data s, name s) -> o`: a job.
pub async fn fit(
    daemon: &Daemon1Proxy<'_>,
    policy: &str,
    params: &str,
    experts: &[String],
    data: &str,
    name: &str,
) -> Result<OwnedObjectPath> {
    Ok(daemon
        .inner()
        .call("Fit", &(policy, params, experts, data, name))
        .await?)
}
