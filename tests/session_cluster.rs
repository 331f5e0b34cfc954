//! The whole session suite (`session.rs`, not a copy) on a private 3-primary Redis Cluster: the
//! harness sees `_cluster` in this binary's name and starts a cluster instead of one server
//! (`support::cluster::TestRedis`). Needs the `cluster` feature:
//! `cargo test --features cluster --test session_cluster`.
#![cfg(feature = "cluster")]

#[path = "session.rs"]
mod suite;
