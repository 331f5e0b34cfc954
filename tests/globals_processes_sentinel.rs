//! The multi-process globals suite (`globals_processes.rs`, not a copy) through Redis Sentinel: a
//! primary, a replica and three sentinels (`_sentinel` in this binary's name selects them). Needs
//! the `sentinel` feature: `cargo test --features sentinel --test globals_processes_sentinel`.
#![cfg(feature = "sentinel")]

#[path = "globals_processes.rs"]
mod suite;

// The suite's own `support` module is private to it; the guard below needs the harness too.
#[allow(clippy::duplicate_mod)]
mod support;

/// Guard: this binary exists to run the suite through Sentinel. If it is renamed so that the
/// harness no longer sees `_sentinel` in its name, the suite would silently run on one server;
/// this fails instead. It also proves that the sentinels answer and that herd writes to the
/// master they name.
#[tokio::test]
async fn the_suite_really_runs_through_sentinel() {
    use support::cluster::TestRedis;
    assert!(
        support::cluster::on_sentinel(),
        "the harness does not see a Sentinel suite in `{:?}`: keep `_sentinel` in the file name \
         (or set HERD_TEST_TOPOLOGY=sentinel)",
        std::env::current_exe().ok()
    );
    let redis = TestRedis::start();
    let TestRedis::Sentinel(setup) = &redis else {
        panic!("the harness started something else than a Sentinel setup")
    };
    assert!(
        redis.url().starts_with("redis+sentinel://"),
        "{}",
        redis.url()
    );
    assert_eq!(
        setup.master_port(),
        Some(setup.primary.port()),
        "the sentinels answer and name the primary"
    );
    let client = herd::RedisClient::connect(support::cluster::config(&redis, "guard"))
        .await
        .expect("connect through the sentinels");
    herd::Globals::new(client.clone())
        .group("guard")
        .expect("group")
        .set("v", &1)
        .await
        .expect("set through Sentinel");
    let pattern = format!("{}:g:*", client.config().prefix());
    assert_eq!(
        setup.primary.keys(&pattern).len(),
        1,
        "written on the master"
    );
}
