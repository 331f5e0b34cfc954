//! The multi-process globals suite (`globals_processes.rs`, not a copy) through Redis Sentinel: a
//! primary, a replica and three sentinels (`_sentinel` in this binary's name selects them). Needs
//! the `sentinel` feature: `cargo test --features sentinel --test globals_processes_sentinel`.
#![cfg(feature = "sentinel")]

#[path = "globals_processes.rs"]
mod suite;
