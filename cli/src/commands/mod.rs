//! One module per subcommand family; each returns the process exit code.

pub mod explain;
pub mod inspect;
pub mod model;
pub mod plan;
pub mod policies;
pub mod train;
