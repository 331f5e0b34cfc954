//! The whole session suite (`session.rs`, not a copy) through Redis Sentinel: a primary, a replica
//! and three sentinels started by the harness (`_sentinel` in this binary's name selects them);
//! herd connects with `redis+sentinel://…/master`. Needs the `sentinel` feature:
//! `cargo test --features sentinel --test session_sentinel`.
#![cfg(feature = "sentinel")]

#[path = "session.rs"]
mod suite;
