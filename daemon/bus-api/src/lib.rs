//! moerge's D-Bus API: the names, object paths, wire types, error names and zbus proxies of
//! `moerged`, shared by the daemon, the CLI, tests and Rust clients. It compiles without
//! candle or sled: a client needs only this crate and zbus.
//!
//! The daemon owns the well-known name [`WELL_KNOWN_NAME`] and serves one
//! `org.moerge.Daemon1` object at [`DAEMON_PATH`]. Fusing returns `org.moerge.Model1` objects,
//! fitting and selecting return `org.moerge.Job1` objects. Every error is a named D-Bus error
//! ([`MoergeError`]) whose message names the argument at fault.
//!
//! ```no_run
//! use moerge_bus::{Daemon1Proxy, GenerateOptions, Model1Proxy};
//! # async fn run() -> Result<(), moerge_bus::MoergeError> {
//! let bus = zbus::Connection::session().await?;
//! let daemon = Daemon1Proxy::new(&bus).await?;
//! for expert in daemon.list_experts().await? {
//!     println!("{} {} {}", expert.name, expert.state, expert.hash);
//! }
//! let plan = std::fs::read_to_string("plan.json").unwrap();
//! let path = daemon.fuse_plan(&plan).await?;
//! let model = Model1Proxy::builder(&bus).path(path).build().await?;
//! let score = model.score("abc>", "ABC\n").await?;
//! println!("mean NLL {:.3}", score.mean_nll);
//! let text = model.generate("abc>", GenerateOptions::greedy(16).to_dict()).await?;
//! println!("{text}");
//! model.release().await?;
//! # Ok(()) }
//! ```

mod error;
mod names;
mod options;
mod proxies;
mod types;

pub use error::{ErrorKind, MoergeError};
pub use names::*;
pub use options::{GenerateOptions, OptionError};
pub use proxies::{Daemon1Proxy, Job1Proxy, Model1Proxy};
pub use types::*;
