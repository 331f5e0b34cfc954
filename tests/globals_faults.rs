//! Globals under faults: an exhausted pool of dedicated connections with Redis slow, and Redis
//! killed under atomic groups.

mod support;

use std::time::{Duration, Instant};

use herd::globals::UpdateError;
use herd::{Globals, RedisClient};
use support::{LatencyProxy, RedisServer};

/// What a bounded wait may add for scheduling on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(250);

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
    let round_trip = Duration::from_millis(150);
    proxy.set_delay(round_trip); // Redis is slow: each reply 150 ms late

    // 20 concurrent updates of 20 different variables (no conflicts: each update is one checkout
    // and two round trips, WATCH + MGET then MULTI/EXEC) on a pool of 2 connections.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let group = group.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let name = format!("v{i}");
            let r = group
                .update(&[name.as_str()], |v: &mut [Option<i64>]| {
                    v[0] = Some(v[0].unwrap_or(0) + 1);
                    Ok::<(), std::convert::Infallible>(())
                })
                .await;
            (i, t.elapsed(), r)
        }));
    }
    let (mut ok, mut unavailable) = (Vec::new(), 0);
    let (mut slowest_503, mut slowest_ok) = (Duration::ZERO, Duration::ZERO);
    for t in tasks {
        let (i, took, r) = t.await.expect("task");
        match r {
            Ok(()) => {
                ok.push(i);
                slowest_ok = slowest_ok.max(took);
            }
            Err(UpdateError::Failed(e)) if e.is_unavailable() => {
                unavailable += 1;
                slowest_503 = slowest_503.max(took);
                assert_eq!(e.status(), http::StatusCode::SERVICE_UNAVAILABLE);
            }
            Err(e) => panic!("unexpected: {e:?}"),
        }
    }
    println!(
        "pool of 2, 20 concurrent updates on a slow Redis: {} ok (slowest {slowest_ok:?}), \
         {unavailable} × 503 (slowest {slowest_503:?}; pool wait {pool_wait:?})",
        ok.len()
    );
    assert!(unavailable > 0, "the pool was never exhausted");
    assert!(!ok.is_empty(), "no update got through");
    // A 503 comes after the pool wait timeout, not later.
    assert!(
        slowest_503 <= pool_wait + SLACK,
        "an update waited {slowest_503:?} for a pooled connection (pool wait {pool_wait:?})"
    );
    // A success waited at most the pool wait, then made two slow round trips (and a recycle
    // check of the connection, one more).
    assert!(
        slowest_ok <= pool_wait + round_trip * 3 + SLACK,
        "an update took {slowest_ok:?}"
    );

    // The pool is healthy afterwards: every acknowledged update is stored exactly once, and
    // updates racing on one variable all get through.
    proxy.set_delay(Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..20 {
        let v: Option<i64> = group.get(&format!("v{i}")).await.expect("get");
        let expected = ok.contains(&i).then_some(1);
        assert_eq!(v, expected, "v{i}");
    }
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
    assert_eq!(x, 10, "every update after the storm is stored exactly once");
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
        // Within the command timeout of `support::config` (500 ms).
        assert!(
            t.elapsed() <= Duration::from_millis(500) + SLACK,
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
            Err(e) => assert!(
                t.elapsed() < Duration::from_secs(2),
                "no recovery 2 s after the restart: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ab: Vec<Option<i64>> = group.get_many(&["a", "b"]).await.expect("snapshot");
    assert_eq!(ab, vec![Some(7), Some(7)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_under_updates_neither_deadlocks_nor_leaks_the_pool() {
    let server = RedisServer::start();
    let (pool_wait, timeout) = (Duration::from_millis(300), Duration::from_millis(400));
    let config = herd::Config::builder()
        .redis_url(server.url())
        .secret_base64(support::test_secret())
        .prefix(support::unique_prefix("freeze"))
        .pool_size(4)
        .pool_wait_timeout(pool_wait)
        .command_timeout(timeout)
        .connect_timeout(timeout)
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
    let mut slowest = Duration::ZERO;
    for t in tasks {
        let (took, ok) = t.await.expect("task");
        assert!(!ok, "an update succeeded against a frozen Redis");
        slowest = slowest.max(took);
    }
    println!("frozen Redis, 20 updates on an empty pool of 4: slowest failure {slowest:?}");
    // Waiting for a slot (pool wait), then opening a connection (connect timeout) or one round
    // trip on it (command timeout): never longer.
    assert!(
        slowest <= pool_wait + timeout + SLACK,
        "an update took {slowest:?} against a frozen Redis"
    );
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

/// Idle pooled connections when Redis freezes: a checkout recycles (pings) an idle connection before
/// lending it, and a failed recycle moves on to the next idle one — each with its own timeout.
/// One `update` must still fail within its bounds, not after one recycle timeout per idle
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_with_idle_pooled_connections_fails_updates_in_bounded_time() {
    let server = RedisServer::start();
    let (pool_wait, timeout) = (Duration::from_millis(300), Duration::from_millis(400));
    let config = herd::Config::builder()
        .redis_url(server.url())
        .secret_base64(support::test_secret())
        .prefix(support::unique_prefix("freeze-idle"))
        .pool_size(8)
        .pool_wait_timeout(pool_wait)
        .command_timeout(timeout)
        .connect_timeout(timeout)
        .build()
        .expect("config");
    let client = RedisClient::new(config).expect("client");
    let group = Globals::new(client)
        .with_max_attempts(100)
        .group("g")
        .expect("group");
    let add = |group: herd::globals::Group, name: String| async move {
        let t = Instant::now();
        let r = group
            .update(&[name.as_str()], |v: &mut [Option<i64>]| {
                v[0] = Some(v[0].unwrap_or(0) + 1);
                Ok::<(), std::convert::Infallible>(())
            })
            .await;
        (t.elapsed(), r)
    };
    // Eight concurrent updates: eight pooled connections, idle afterwards.
    let tasks: Vec<_> = (0..8)
        .map(|i| tokio::spawn(add(group.clone(), format!("v{i}"))))
        .collect();
    for t in tasks {
        t.await.expect("task").1.expect("update before the freeze");
    }
    server.freeze();
    let (took, r) = add(group.clone(), "v0".into()).await;
    println!("frozen Redis, 8 idle pooled connections: one update failed after {took:?}");
    assert!(r.is_err(), "an update succeeded against a frozen Redis");
    assert!(
        took <= pool_wait + timeout + SLACK,
        "one update took {took:?} against a frozen Redis (pool wait {pool_wait:?}, timeouts \
         {timeout:?})"
    );
    server.thaw();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, r) = add(group.clone(), "v0".into()).await;
    r.expect("update after the thaw");
    let v: Option<i64> = group.get("v0").await.expect("get");
    assert_eq!(v, Some(2));
}
