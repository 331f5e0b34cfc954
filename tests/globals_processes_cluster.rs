//! The multi-process globals suite (`globals_processes.rs`, not a copy) on a private 3-primary Redis
//! Cluster: bank invariant, grouped writes seen together, exact counters, pub/sub across a restart.
//! `update` runs as read + compare-and-swap there (no `WATCH` on a cluster). Needs the `cluster`
//! feature: `cargo test --features cluster --test globals_processes_cluster`.
#![cfg(feature = "cluster")]

#[path = "globals_processes.rs"]
mod suite;

/// What the suite runs on: it starts its Redis with `crate::TOPOLOGY`.
const TOPOLOGY: suite::support::topology::Topology = suite::support::topology::Topology::Cluster;

/// Guard: the harness starts a real cluster for this suite.
#[tokio::test]
async fn the_suite_really_runs_on_a_redis_cluster() {
    suite::support::cluster::assert_suite_runs_on_a_cluster().await;
}
