//! The multi-process globals suite (`globals_processes.rs`, not a copy) through Redis Sentinel: a
//! primary, a replica and three sentinels (`TOPOLOGY` below selects them). Needs
//! the `sentinel` feature: `cargo test --features sentinel --test globals_processes_sentinel`.
#![cfg(feature = "sentinel")]

#[path = "globals_processes.rs"]
mod suite;

/// What the suite runs on: it starts its Redis with `crate::TOPOLOGY`.
const TOPOLOGY: suite::support::topology::Topology = suite::support::topology::Topology::Sentinel;

/// Guard: the harness starts a real Sentinel setup for this suite.
#[tokio::test]
async fn the_suite_really_runs_through_sentinel() {
    suite::support::sentinel::assert_suite_runs_through_sentinel().await;
}
