//! The multi-process globals suite (`globals_processes.rs`, not a copy) on a private 3-primary Redis
//! Cluster: bank invariant, grouped writes seen together, exact counters, pub/sub across a restart.
//! `update` runs as read + compare-and-swap there (no `WATCH` on a cluster). Needs the `cluster`
//! feature: `cargo test --features cluster --test globals_processes_cluster`.
#![cfg(feature = "cluster")]

#[path = "globals_processes.rs"]
mod suite;

// The suite's own `support` module is private to it; the guard below needs the harness too.
#[allow(clippy::duplicate_mod)]
mod support;

/// Guard: this binary exists to run the suite on a cluster (see the harness).
#[tokio::test]
async fn the_suite_really_runs_on_a_redis_cluster() {
    support::cluster::assert_suite_runs_on_a_cluster().await;
}
