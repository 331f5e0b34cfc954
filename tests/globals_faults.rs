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

/// Redis out of memory (`maxmemory` tiny, `noeviction`): a grouped write is refused as a whole with
/// a clear 503 (its `DEL`, which Redis would still allow alone, is not applied either), `set`,
/// `incr` and `update` are refused, and every read keeps working. Writes work again once memory is
/// available.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_refuses_writes_whole_and_keeps_reads() {
    let server = RedisServer::start();
    let client = RedisClient::new(support::config(&server, "oom")).expect("client");
    let group = Globals::new(client).group("g").expect("group");
    group
        .atomic()
        .set("a", &1_i64)
        .set("b", &1_i64)
        .set("c", &1_i64)
        .apply()
        .await
        .expect("seed");
    let _: () = server.cmd(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    let _: () = server.cmd(&["CONFIG", "SET", "maxmemory", "1"]);

    let err = group
        .atomic()
        .set("a", &2_i64)
        .set("b", &2_i64)
        .delete("c")
        .apply()
        .await
        .expect_err("out of memory");
    println!("grouped write out of memory: {err}");
    assert!(err.is_unavailable(), "{err:?}");
    assert_eq!(err.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    assert!(err.to_string().contains("nothing was applied"), "{err}");
    let err = group.set("a", &3_i64).await.expect_err("out of memory");
    assert!(err.is_unavailable(), "set: {err:?}");
    let err = group.incr("n", 1).await.expect_err("out of memory");
    assert!(err.is_unavailable(), "incr: {err:?}");
    let err = group
        .update(&["a"], |v: &mut [Option<i64>]| {
            v[0] = Some(9);
            Ok::<(), std::convert::Infallible>(())
        })
        .await
        .expect_err("out of memory");
    match err {
        UpdateError::Failed(e) => assert!(e.is_unavailable(), "update: {e:?}"),
        other => panic!("update: {other:?}"),
    }

    // Reads keep working, and nothing was written, not even the group's DEL.
    let abc: Vec<Option<i64>> = group.get_many(&["a", "b", "c"]).await.expect("read");
    assert_eq!(abc, vec![Some(1), Some(1), Some(1)]);
    assert_eq!(group.get::<i64>("n").await.expect("read"), None);

    let _: () = server.cmd(&["CONFIG", "SET", "maxmemory", "0"]);
    group
        .atomic()
        .set("a", &2_i64)
        .set("b", &2_i64)
        .delete("c")
        .apply()
        .await
        .expect("memory is back");
    let abc: Vec<Option<i64>> = group.get_many(&["a", "b", "c"]).await.expect("read");
    assert_eq!(abc, vec![Some(2), Some(2), None]);
}

/// `CLIENT KILL` of every client connection — the shared one and the pooled ones that `update`
/// holds for `WATCH` — three times under load: only the updates in flight on a cut connection fail
/// (503, "outcome unknown" for a cut `EXEC`), the pool replaces what was cut, nothing is counted
/// twice, and afterwards every pooled connection serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_cut_mid_load_errors_stay_bounded_and_the_pool_heals() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let server = RedisServer::start();
    let pool_size = 8;
    let config = herd::Config::builder()
        .redis_url(server.url())
        .prefix(support::unique_prefix("pool-cut"))
        .pool_size(pool_size)
        .command_timeout(Duration::from_millis(500))
        .pool_wait_timeout(Duration::from_millis(500))
        .build()
        .expect("config");
    let client = RedisClient::new(config).expect("client");
    let group = Globals::new(client)
        .with_max_attempts(100)
        .group("g")
        .expect("group");
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, unknown, refused) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let workers = 8;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (group, stop) = (group.clone(), stop.clone());
        let (acked, unknown, refused) = (acked.clone(), unknown.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                // Each worker its own variable (no conflicts), plus one shared counter.
                let mine = format!("w{w}");
                let r = group
                    .update(&[mine.as_str(), "total"], |v: &mut [Option<i64>]| {
                        v[0] = Some(v[0].unwrap_or(0) + 1);
                        v[1] = Some(v[1].unwrap_or(0) + 1);
                        Ok::<(), std::convert::Infallible>(())
                    })
                    .await;
                slowest = slowest.max(t.elapsed());
                match r {
                    Ok(()) => acked.fetch_add(1, Ordering::Relaxed),
                    Err(UpdateError::Failed(e)) if e.is_outcome_unknown() => {
                        unknown.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(UpdateError::Failed(e)) if e.is_unavailable() => {
                        refused.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => panic!("unexpected: {e:?}"),
                };
            }
            slowest
        }));
    }
    let mut killed = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        killed.push(tokio::task::block_in_place(|| server.kill_clients()));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut slowest = Duration::ZERO;
    for t in tasks {
        slowest = slowest.max(t.await.expect("task"));
    }
    let (acked, unknown, refused) = (
        acked.load(Ordering::Relaxed),
        unknown.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    );
    println!(
        "3 cuts of {killed:?} connections under {workers} concurrent updates: {acked} ok, \
         {unknown} outcome unknown, {refused} refused; slowest update {slowest:?}"
    );
    // The pooled connections were cut too (more than the one shared connection).
    assert!(
        killed.iter().all(|k| *k >= 2),
        "the pooled connections were not cut: {killed:?}"
    );
    // At most the updates in flight at each cut fail.
    assert!(
        unknown + refused <= (workers * 3) as u64,
        "{} failures for 3 cuts of {workers} workers",
        unknown + refused
    );
    assert!(acked > 100, "too little load: {acked}");
    // No update counted twice, none acknowledged and lost.
    let total: i64 = group.get("total").await.expect("read").unwrap_or(0);
    assert!(
        (acked as i64..=(acked + unknown) as i64).contains(&total),
        "total {total}, acked {acked}, unknown {unknown}"
    );
    // The pool healed: twice as many concurrent updates as it has connections, all succeed.
    let tasks: Vec<_> = (0..pool_size * 2)
        .map(|k| {
            let group = group.clone();
            tokio::spawn(async move {
                group
                    .update(
                        &[format!("after{k}").as_str()],
                        |v: &mut [Option<i64>]| {
                            v[0] = Some(1);
                            Ok::<(), std::convert::Infallible>(())
                        },
                    )
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task").expect("an update after the cuts");
    }
}
