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

/// Guard: this binary exists to run the suite on a cluster. If it is renamed so that the harness
/// no longer sees `_cluster` in its name, the suite would silently run on one server; this fails
/// instead. It also proves that herd routes by slot through the cluster URL (keys of several
/// groups land on several nodes).
#[tokio::test]
async fn the_suite_really_runs_on_a_redis_cluster() {
    use support::cluster::TestRedis;
    assert!(
        support::cluster::on_cluster(),
        "the harness does not see a cluster suite in `{:?}`: keep `_cluster` in the file name \
         (or set HERD_TEST_TOPOLOGY=cluster)",
        std::env::current_exe().ok()
    );
    let redis = TestRedis::start();
    let TestRedis::Cluster(cluster) = &redis else {
        panic!("the harness started something else than a cluster")
    };
    assert!(
        redis.url().starts_with("redis+cluster://"),
        "{}",
        redis.url()
    );
    for node in cluster.nodes() {
        let info: String = node.cmd(&["CLUSTER", "INFO"]);
        assert!(
            info.contains("cluster_state:ok") && info.contains("cluster_size:3"),
            "{info}"
        );
    }
    let client = herd::RedisClient::connect(support::cluster::config(&redis, "guard"))
        .await
        .expect("connect");
    let globals = herd::Globals::new(client.clone());
    for g in 0..12 {
        globals
            .group(&format!("g{g}"))
            .expect("group")
            .set("v", &g)
            .await
            .expect("set through the cluster");
    }
    let pattern = format!("{}:g:*", client.config().prefix());
    let nodes_with_keys = cluster
        .nodes()
        .iter()
        .filter(|n| !n.keys(&pattern).is_empty())
        .count();
    assert!(
        nodes_with_keys >= 2,
        "12 groups all landed on one node: not routed by slot"
    );
}
