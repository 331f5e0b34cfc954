//! Globals under faults: an exhausted pool of dedicated connections with Redis slow, and Redis
//! killed under atomic groups.

mod support;

use std::time::{Duration, Instant};

use herd::globals::UpdateError;
use herd::{Globals, RedisClient};
use support::{LatencyProxy, RedisServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_exhaustion_waits_at_most_the_pool_timeout_then_503() {
    let server = RedisServer::start();
    let proxy = LatencyProxy::start(server.port());
    let pool_wait = Duration::from_millis(300);
    let config = herd::Config::builder()
        .redis_url(proxy.url())
        .secret_base64(support::test_secret())
        .prefix(support::unique_prefix("pool"))
        .pool_size(2)
        .pool_wait_timeout(pool_wait)
        .command_timeout(Duration::from_secs(2))
        .build()
        .expect("config");
    let client = RedisClient::new(config).expect("client");
    let group = Globals::new(client).group("g").expect("group");
    group.set("x", &0_i64).await.expect("seed");
    proxy.set_delay(Duration::from_millis(150)); // Redis is slow: each round trip 150 ms

    let mut tasks = Vec::new();
    for _ in 0..20 {
        let group = group.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = group
                .update(&["x"], |v: &mut [Option<i64>]| {
                    v[0] = Some(v[0].unwrap_or(0) + 1);
                    Ok::<(), std::convert::Infallible>(())
                })
                .await;
            (t.elapsed(), r)
        }));
    }
    let (mut ok, mut unavailable) = (0, 0);
    for t in tasks {
        let (took, r) = t.await.expect("task");
        match r {
            Ok(()) => ok += 1,
            Err(UpdateError::Failed(e)) if e.is_unavailable() => {
                unavailable += 1;
                // Waiting for a connection is bounded by the pool wait timeout (plus scheduling).
                assert!(
                    took < pool_wait + Duration::from_millis(1500),
                    "waited {took:?}: {e}"
                );
                assert_eq!(e.status(), http::StatusCode::SERVICE_UNAVAILABLE);
            }
            Err(e) => panic!("unexpected: {e:?}"),
        }
        assert!(took < Duration::from_secs(10), "an update hung: {took:?}");
    }
    println!("pool of 2, 20 concurrent updates on a slow Redis: {ok} ok, {unavailable} × 503");
    assert!(unavailable > 0, "the pool was never exhausted");
    assert!(ok > 0, "no update got through");

    // The pool is healthy afterwards.
    proxy.set_delay(Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..10 {
        group
            .update(&["x"], |v: &mut [Option<i64>]| {
                v[0] = Some(v[0].unwrap_or(0) + 1);
                Ok::<(), std::convert::Infallible>(())
            })
            .await
            .expect("update after the storm");
    }
    let x: i64 = group.get("x").await.expect("get").expect("x");
    assert_eq!(
        x,
        ok + 10,
        "every acknowledged update is stored exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_atomic_groups_then_back() {
    let mut server = RedisServer::start();
    let config = support::config(&server, "groups-kill");
    let client = RedisClient::new(config).expect("client");
    let group = Globals::new(client).group("pair").expect("group");
    group
        .atomic()
        .set("a", &0_i64)
        .set("b", &0_i64)
        .apply()
        .await
        .expect("seed");
    tokio::task::block_in_place(|| server.kill());
    for i in 0..5_i64 {
        let t = Instant::now();
        let err = group
            .atomic()
            .set("a", &i)
            .set("b", &i)
            .apply()
            .await
            .expect_err("Redis is down");
        assert!(err.is_unavailable() || err.is_outcome_unknown(), "{err}");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "took {:?}",
            t.elapsed()
        );
    }
    tokio::task::block_in_place(|| server.restart());
    let t = Instant::now();
    loop {
        match group
            .atomic()
            .set("a", &7_i64)
            .set("b", &7_i64)
            .apply()
            .await
        {
            Ok(_) => break,
            Err(e) => assert!(t.elapsed() < Duration::from_secs(5), "no recovery: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ab: Vec<Option<i64>> = group.get_many(&["a", "b"]).await.expect("snapshot");
    assert_eq!(ab, vec![Some(7), Some(7)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_under_updates_neither_deadlocks_nor_leaks_the_pool() {
    let server = RedisServer::start();
    let config = herd::Config::builder()
        .redis_url(server.url())
        .secret_base64(support::test_secret())
        .prefix(support::unique_prefix("freeze"))
        .pool_size(4)
        .pool_wait_timeout(Duration::from_millis(300))
        .command_timeout(Duration::from_millis(400))
        .build()
        .expect("config");
    let client = RedisClient::new(config).expect("client");
    // Many attempts: after the thaw, 20 updates of one variable race on 4 connections.
    let group = Globals::new(client)
        .with_max_attempts(100)
        .group("g")
        .expect("group");
    group.set("x", &0_i64).await.expect("seed");
    let add = |group: herd::globals::Group| async move {
        let t = Instant::now();
        let r = group
            .update(&["x"], |v: &mut [Option<i64>]| {
                v[0] = Some(v[0].unwrap_or(0) + 1);
                Ok::<(), std::convert::Infallible>(())
            })
            .await;
        (t.elapsed(), r.is_ok())
    };
    server.freeze();
    let tasks: Vec<_> = (0..20).map(|_| tokio::spawn(add(group.clone()))).collect();
    for t in tasks {
        let (took, ok) = t.await.expect("task");
        assert!(!ok, "an update succeeded against a frozen Redis");
        assert!(took < Duration::from_secs(3), "an update hung for {took:?}");
    }
    server.thaw();
    // Every pooled connection works again: more concurrent updates than the pool has connections.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tasks: Vec<_> = (0..20).map(|_| tokio::spawn(add(group.clone()))).collect();
    let mut ok = 0;
    for t in tasks {
        ok += i64::from(t.await.expect("task").1);
    }
    assert_eq!(ok, 20, "updates failed after the thaw");
    let x: i64 = group.get("x").await.expect("get").expect("x");
    assert_eq!(x, 20, "an update was lost or applied twice");
}
