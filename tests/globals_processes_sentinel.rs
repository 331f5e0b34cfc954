//! The multi-process globals suite (`globals_processes.rs`, not a copy) through Redis Sentinel: a
//! primary, a replica and three sentinels (`_sentinel` in this binary's name selects them). Needs
//! the `sentinel` feature: `cargo test --features sentinel --test globals_processes_sentinel`.
#![cfg(feature = "sentinel")]

#[path = "globals_processes.rs"]
mod suite;

// The suite's own `support` module is private to it; the guard below needs the harness too.
#[allow(clippy::duplicate_mod)]
mod support;

/// Guard: this binary exists to run the suite through Sentinel (see the harness).
#[tokio::test]
async fn the_suite_really_runs_through_sentinel() {
    support::cluster::assert_suite_runs_through_sentinel().await;
}
