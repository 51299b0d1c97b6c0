//! Wire types: what the methods take and return, as D-Bus structures. They are boundary
//! types: the daemon converts its domain values into them explicitly.

use serde::{Deserialize, Serialize};
use zbus::Type;

/// One expert of the library. Signature `(ssssttt)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct ExpertInfo {
    /// The folder name.
    pub name: String,
    /// Lowercase hex of the content hash; empty when the files could not be read.
    pub hash: String,
    /// `ready`, `rejected` or `incompatible`.
    pub state: String,
    /// Why the expert is rejected or incompatible (names the file and tensor); empty when ready.
    pub reason: String,
    /// Bumped each time the content or state under this name changes.
    pub generation: u64,
    /// Both files, in bytes.
    pub size_bytes: u64,
    /// The library generation this listing was taken from.
    pub library_generation: u64,
}

/// One live model object. Signature `(ostbass)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct ModelInfo {
    pub path: zbus::OwnedObjectPath,
    /// The bus name (or `p2p:<n>`) of the client that owns it.
    pub owner: String,
    /// The library generation it leased.
    pub generation: u64,
    /// True once an expert it uses changed or was removed.
    pub stale: bool,
    /// The plan's experts, by name.
    pub experts: Vec<String>,
    /// `single` or `ensemble`.
    pub kind: String,
}

/// A fusion policy the daemon can run. Signature `(sss)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct PolicyInfo {
    pub name: String,
    pub version: String,
    pub description: String,
}

/// A stored plan. Signature `(sasbs)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct PlanInfo {
    pub name: String,
    /// The experts it names.
    pub experts: Vec<String>,
    /// True once an expert it names changed, was removed or is not ready.
    pub stale: bool,
    /// Why it is stale; empty when it is not.
    pub reason: String,
}

/// What `Score` returns. Signature `(asauaddd)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Type)]
pub struct ScoreResult {
    /// The completion's tokens, as text (one per scored token).
    pub tokens: Vec<String>,
    /// Their ids.
    pub token_ids: Vec<u32>,
    /// The negative log-likelihood of each completion token, in nats.
    pub token_nll: Vec<f64>,
    /// Their sum.
    pub total_nll: f64,
    /// Their mean (the paper's loss).
    pub mean_nll: f64,
}

/// One of `TopTokens`' answers. Signature `(usd)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Type)]
pub struct TokenProbability {
    pub id: u32,
    pub text: String,
    pub probability: f64,
}

/// The routing weights one routed module gave every prompt token. Signature `(sasaad)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Type)]
pub struct ExplainRecord {
    /// Module path, e.g. `model.layers.0.mlp.fc1`.
    pub module: String,
    /// The routed units of this module, in column order: expert names (the plan's order,
    /// skipping experts that do not adapt the module) or group names.
    pub units: Vec<String>,
    /// `weights[token][unit]`: 0 outside the top-k; each row sums to 1.
    pub weights: Vec<Vec<f64>>,
}

/// What `Explain` returns. Signature `(asa(sasaad))`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Type)]
pub struct Explanation {
    /// The prompt's tokens, as text.
    pub tokens: Vec<String>,
    /// One record per routed module, in forward order; empty for a plan that routes nothing.
    pub records: Vec<ExplainRecord>,
}

/// A job's state, as the `State` property spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Parses the `State` property.
    pub fn parse(s: &str) -> Option<JobState> {
        Some(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => return None,
        })
    }

    /// Whether the job has ended (it will not change again).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_the_documented_ones() {
        let check = |got: &zbus::Signature, want: &str| assert_eq!(got.to_string(), want);
        check(ExpertInfo::SIGNATURE, "(ssssttt)");
        check(ModelInfo::SIGNATURE, "(ostbass)");
        check(PolicyInfo::SIGNATURE, "(sss)");
        check(PlanInfo::SIGNATURE, "(sasbs)");
        check(ScoreResult::SIGNATURE, "(asauaddd)");
        check(TokenProbability::SIGNATURE, "(usd)");
        check(ExplainRecord::SIGNATURE, "(sasaad)");
        check(Explanation::SIGNATURE, "(asa(sasaad))");
    }

    #[test]
    fn job_states_round_trip() {
        for s in [
            JobState::Queued,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
        ] {
            assert_eq!(JobState::parse(s.as_str()), Some(s));
        }
        assert_eq!(JobState::parse("done"), None);
    }
}
