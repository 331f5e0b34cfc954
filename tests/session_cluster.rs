//! The whole session suite (`session.rs`, not a copy) on a private 3-primary Redis Cluster: the
//! harness sees `_cluster` in this binary's name and starts a cluster instead of one server
//! (`support::cluster::TestRedis`). Needs the `cluster` feature:
//! `cargo test --features cluster --test session_cluster`.
#![cfg(feature = "cluster")]

#[path = "session.rs"]
mod suite;

// The suite's own `support` module is private to it; the guard below needs the harness too.
#[allow(clippy::duplicate_mod)]
mod support;

/// Guard: this binary exists to run the suite on a cluster (see the harness).
#[tokio::test]
async fn the_suite_really_runs_on_a_redis_cluster() {
    support::cluster::assert_suite_runs_on_a_cluster().await;
}
