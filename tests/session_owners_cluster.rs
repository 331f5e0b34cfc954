//! The owner index tests (`session_owners.rs`, not a copy) on a private 3-primary Redis
//! Cluster: `TOPOLOGY` below makes the harness start a cluster instead of one server
//! (`support::topology`). Needs the `cluster` feature:
//! `cargo test --features cluster --test session_owners_cluster`.
#![cfg(feature = "cluster")]

#[path = "session_owners.rs"]
mod suite;

/// What the suite runs on: it starts its Redis with `crate::TOPOLOGY`.
const TOPOLOGY: suite::support::topology::Topology = suite::support::topology::Topology::Cluster;

/// Guard: the harness starts a real cluster for this suite.
#[tokio::test]
async fn the_suite_really_runs_on_a_redis_cluster() {
    suite::support::cluster::assert_suite_runs_on_a_cluster().await;
}
