//! moerge's daemon: the sled index of the expert library, the folder watcher, the service
//! core (generations, leases, change events) and, in `src/bin/moerged.rs`, the thin binary.
//!
//! Layers, top to bottom: [`bus`] (the only module that knows zbus) calls [`serving`]
//! (models, jobs, rights and limits, compute threads; candle only through `moerge-engine`),
//! which builds on [`service`] (events loop, generations and leases), which uses [`watch`]
//! (notify with a debouncer) and [`index`] (the only module that knows sled), and reads
//! adapter folders through `moerge-library`.

pub mod bus;
pub mod clustering;
pub mod index;
pub mod selection;
pub mod service;
pub mod serving;
pub mod watch;
