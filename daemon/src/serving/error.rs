//! What a serving call can fail with. One variant per D-Bus error name; the bus layer maps
//! them one to one. Messages start with the argument at fault (`plan_json: experts[1].hash:
//! ...`, `options.top_p: ...`).

use moerge_engine::EngineError;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    #[error("{0}")]
    NoSuchExpert(String),
    #[error("{argument}: {message}")]
    InvalidArgument { argument: String, message: String },
    #[error("{0}")]
    AccessDenied(String),
    #[error("limit {limit} ({value}) reached: {message}")]
    LimitExceeded {
        limit: &'static str,
        value: u64,
        message: String,
    },
    #[error("{0}")]
    PluginFailed(String),
    #[error("{0}")]
    NoSuchObject(String),
    #[error("{0}")]
    NotSupported(String),
    #[error("{0}")]
    Internal(String),
}

impl ServeError {
    pub(crate) fn invalid(argument: impl Into<String>, message: impl Into<String>) -> ServeError {
        ServeError::InvalidArgument {
            argument: argument.into(),
            message: message.into(),
        }
    }

    /// An engine error, with the argument renamed as the caller knows it: the engine calls
    /// the plan `plan`, the D-Bus method `plan_json`.
    pub(crate) fn from_engine(e: EngineError, plan_argument: &str) -> ServeError {
        match e {
            EngineError::InvalidArgument { argument, message } => {
                let argument = if argument == "plan" {
                    plan_argument
                } else {
                    argument
                };
                ServeError::invalid(argument, message)
            }
            EngineError::Incompatible { adapter, reason } => {
                ServeError::invalid(plan_argument, format!("expert {adapter}: {reason}"))
            }
            other => ServeError::Internal(other.to_string()),
        }
    }
}
