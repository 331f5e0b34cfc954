//! The owner index tests (`session_owners.rs`, not a copy) on a private 3-primary Redis Cluster: the
//! harness sees `_cluster` in this binary's name and starts a cluster instead of one server
//! (`support::cluster::TestRedis`). Needs the `cluster` feature:
//! `cargo test --features cluster --test session_owners_cluster`.
#![cfg(feature = "cluster")]

#[path = "session_owners.rs"]
mod suite;
