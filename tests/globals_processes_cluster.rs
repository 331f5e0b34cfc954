//! The multi-process globals suite (`globals_processes.rs`, not a copy) on a private 3-primary Redis
//! Cluster: bank invariant, grouped writes seen together, exact counters, pub/sub across a restart.
//! `update` runs as read + compare-and-swap there (no `WATCH` on a cluster). Needs the `cluster`
//! feature: `cargo test --features cluster --test globals_processes_cluster`.
#![cfg(feature = "cluster")]

#[path = "globals_processes.rs"]
mod suite;
