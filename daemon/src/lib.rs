//! moerge's daemon: the sled index of the expert library, the folder watcher, the service
//! core (generations, leases, change events) and, in `src/bin/moerged.rs`, the thin binary.
//!
//! Layers, top to bottom: [`service`] (events loop, generations and leases) uses [`watch`]
//! (notify with a debouncer) and [`index`] (the only module that knows sled), and reads
//! adapter folders through `moerge-library`. Nothing here knows D-Bus or candle.

pub mod index;
pub mod service;
pub mod watch;
