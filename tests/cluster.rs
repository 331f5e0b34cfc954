//! Redis Cluster specifics the session suite (`session_cluster.rs`) does not cover: slots moving
//! under load (`ASK`, then `MOVED`, retried by herd because the server refused before running
//! anything) and a cycle cut short after its first step (the old id is dead, never two sessions).
//! `cargo test --features cluster --test cluster`.
#![cfg(feature = "cluster")]

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herd::RedisClient;
use http::StatusCode;
use support::cluster::RedisCluster;
use support::topology::{config, counter_app, request, TestRedis};

/// Sessions whose slots move from one node to another while four tasks increment them: every
/// request succeeds and every counter is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_moving_under_load_lose_nothing_and_fail_nothing() {
    let cluster = TestRedis::Cluster(RedisCluster::start());
    // A 2 s command timeout: this test is about refusals being retried, not about a loaded CI
    // machine stalling a round trip for 500 ms (which would rightly be "outcome unknown").
    let client = RedisClient::connect(
        herd::Config::builder()
            .redis_url(cluster.url())
            .prefix(support::unique_prefix("reshard"))
            .command_timeout(Duration::from_secs(2))
            .build()
            .expect("config"),
    )
    .await
    .expect("connect");
    let prefix = client.config().prefix().to_owned();
    let app = counter_app(&client);
    let TestRedis::Cluster(nodes) = &cluster else {
        unreachable!()
    };

    // Sessions until at least four live on node 0 (the one that gives slots away).
    let mut cookies = Vec::new();
    let mut moving = Vec::new();
    while moving.len() < 4 {
        let (status, _, cookie) = request(&app, "GET", "/incr", None).await;
        assert_eq!(status, StatusCode::OK);
        cookies.push(cookie.expect("cookie"));
        let keys = cluster.keys(&format!("{prefix}:s:*"));
        moving = keys
            .iter()
            .map(|k| nodes.slot_of(k))
            .filter(|s| nodes.owner_of(*s) == 0)
            .collect();
    }
    let cookies = Arc::new(cookies);
    let expected: Arc<Vec<AtomicU64>> =
        Arc::new(cookies.iter().map(|_| AtomicU64::new(1)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (app, cookies, expected, stop) =
            (app.clone(), cookies.clone(), expected.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let n = i % cookies.len();
                // Every third request a read (one HGETALL), else an increment (a script).
                let path = if i % 3 == 2 { "/get" } else { "/incr" };
                let (status, body, _) = request(&app, "GET", path, Some(&cookies[n])).await;
                if status == StatusCode::OK {
                    if path == "/incr" {
                        expected[n].fetch_add(1, Ordering::Relaxed);
                    }
                } else {
                    failures.push(format!("{status}: {body}"));
                }
                i += 1;
            }
            failures
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = client.round_trips();
    let redirects_before = client.cluster_redirects();
    let slots = moving.clone();
    let cluster = tokio::task::spawn_blocking(move || {
        if let TestRedis::Cluster(nodes) = &cluster {
            for slot in slots {
                nodes.migrate_slot(slot, 0, 1, Duration::from_millis(150));
            }
        }
        cluster
    })
    .await
    .expect("migration");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for t in tasks {
        failures.extend(t.await.expect("task"));
    }
    let requests = client.round_trips() - before;
    let redirects = client.cluster_redirects() - redirects_before;
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let TestRedis::Cluster(nodes) = &cluster else {
        unreachable!()
    };
    for slot in &moving {
        assert_eq!(nodes.owner_of(*slot), 1, "slot {slot} moved");
    }
    for (n, cookie) in cookies.iter().enumerate() {
        let (status, body, _) = request(&app, "GET", "/get", Some(cookie)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            expected[n].load(Ordering::Relaxed).to_string(),
            "session {n}"
        );
    }
    println!(
        "{} slots moved under load: {requests} round trips, {redirects} re-sent after MOVED/ASK, \
         0 failures, counters exact",
        moving.len()
    );
    // The migration was met: requests were refused and re-sent (else this test proves nothing).
    assert!(redirects > 0, "no request met MOVED or ASK");
}

/// A group of globals whose slot moves to another node while tasks apply atomic groups
/// (`MULTI`/`EXEC`: refused as a whole with `ASK`/`MOVED` inside, re-sent) and `update`s
/// (compare-and-swap script on a cluster) to it: nothing fails, and the result is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_globals_group_moving_under_atomic_groups_and_updates_stays_exact() {
    use herd::Globals;
    let cluster = TestRedis::Cluster(RedisCluster::start());
    let client = RedisClient::connect(
        herd::Config::builder()
            .redis_url(cluster.url())
            .prefix(support::unique_prefix("reshard-globals"))
            .command_timeout(Duration::from_secs(2))
            .build()
            .expect("config"),
    )
    .await
    .expect("connect");
    let prefix = client.config().prefix().to_owned();
    let group = Globals::new(client.clone())
        .with_max_attempts(100)
        .group("moving")
        .expect("group");
    group
        .atomic()
        .set("a", &0_i64)
        .set("b", &0_i64)
        .set("x", &0_i64)
        .apply()
        .await
        .expect("seed");
    let TestRedis::Cluster(nodes) = &cluster else {
        unreachable!()
    };
    let key = cluster
        .keys(&format!("{prefix}:g:*"))
        .pop()
        .expect("a global's key");
    let slot = nodes.slot_of(&key);
    let from = nodes.owner_of(slot);
    let to = (from + 1) % 3;

    let stop = Arc::new(AtomicBool::new(false));
    let groups_acked = Arc::new(AtomicU64::new(0));
    let updates_acked = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (group, stop, groups_acked, updates_acked) = (
            group.clone(),
            stop.clone(),
            groups_acked.clone(),
            updates_acked.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if t % 2 == 0 {
                    match group.atomic().incr("a", 1).incr("b", 1).apply().await {
                        Ok(_) => {
                            groups_acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.push(format!("atomic group: {e}")),
                    }
                } else {
                    let r = group
                        .update(&["x"], |v: &mut [Option<i64>]| {
                            v[0] = Some(v[0].unwrap_or(0) + 1);
                            Ok::<(), std::convert::Infallible>(())
                        })
                        .await;
                    match r {
                        Ok(()) => {
                            updates_acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.push(format!("update: {e}")),
                    }
                }
            }
            failures
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let redirects_before = client.cluster_redirects();
    let (groups_mid, updates_mid) = (
        groups_acked.load(Ordering::Relaxed),
        updates_acked.load(Ordering::Relaxed),
    );
    let cluster = tokio::task::spawn_blocking(move || {
        if let TestRedis::Cluster(nodes) = &cluster {
            nodes.migrate_slot(slot, from, to, Duration::from_millis(300));
        }
        cluster
    })
    .await
    .expect("migration");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for t in tasks {
        failures.extend(t.await.expect("task"));
    }
    let redirects = client.cluster_redirects() - redirects_before;
    let TestRedis::Cluster(nodes) = &cluster else {
        unreachable!()
    };
    assert_eq!(nodes.owner_of(slot), to, "the slot moved");
    let (groups, updates) = (
        groups_acked.load(Ordering::Relaxed),
        updates_acked.load(Ordering::Relaxed),
    );
    println!(
        "a globals group moved from node {from} to node {to} under load: {groups} atomic groups \
         and {updates} updates acknowledged ({} and {} during the move), {redirects} re-sent \
         after MOVED/ASK, {} failures",
        groups - groups_mid,
        updates - updates_mid,
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(redirects > 0, "no request met MOVED or ASK");
    assert!(
        groups > groups_mid && updates > updates_mid,
        "no load during the move"
    );
    let abx: Vec<Option<i64>> = group.get_many(&["a", "b", "x"]).await.expect("read");
    assert_eq!(
        abx,
        vec![
            Some(groups as i64),
            Some(groups as i64),
            Some(updates as i64)
        ],
        "every acknowledged group applied once and whole, every update once"
    );
}

/// A cycle that stops after marking the old key (a crash between its steps): the old id is refused
/// as after a login (409, no Set-Cookie, nothing written into the old session, no fresh session
/// for it), and only for a tombstone's minute: the mark capped the key's TTL.
#[tokio::test]
async fn a_cycle_cut_after_the_mark_refuses_the_old_id_for_a_minute() {
    let cluster = TestRedis::Cluster(RedisCluster::start());
    let client = RedisClient::connect(config(&cluster, "cut"))
        .await
        .expect("connect");
    let prefix = client.config().prefix().to_owned();
    let app = counter_app(&client);
    let (_, _, cookie) = request(&app, "GET", "/incr", None).await;
    let cookie = cookie.expect("cookie");
    let key = cluster
        .keys(&format!("{prefix}:s:*"))
        .pop()
        .expect("the session key");
    let ttl_before: i64 = cluster.cmd(&["PTTL", &key]);
    assert!(ttl_before > 60_000, "{ttl_before}");
    // Step 1 of a cycle, as herd runs it, and then the process dies.
    let take = include_str!("../src/session/take.lua");
    let fields: Vec<String> =
        cluster.cmd(&["EVAL", take, "1", &key, "0123456789abcdef0123456789abcdef"]);
    assert!(fields.iter().any(|f| f == "n"), "{fields:?}");
    let ttl: i64 = cluster.cmd(&["PTTL", &key]);
    assert!(
        (1..=60_000).contains(&ttl),
        "the marked key lives no longer than a tombstone: {ttl} ms"
    );
    for path in ["/get", "/incr"] {
        let (status, _, set_cookie) = request(&app, "GET", path, Some(&cookie)).await;
        assert_eq!(status, StatusCode::CONFLICT, "{path} with the marked id");
        assert_eq!(set_cookie, None, "{path}: no cookie, no fresh session");
    }
    let n: Option<String> = cluster.cmd(&["HGET", &key, "n"]);
    assert_eq!(
        n.as_deref(),
        Some("1"),
        "the marked session was not written to"
    );
    assert_eq!(
        cluster.keys(&format!("{prefix}:s:*")).len(),
        1,
        "no fresh session was made for the marked id"
    );
    // A full cycle on a cluster: three round trips, the old key gone, the data moved.
    let (_, _, c) = request(&app, "GET", "/incr", None).await;
    let c = c.expect("cookie");
    let before = client.round_trips();
    let (status, _, cycled) = request(&app, "POST", "/login", Some(&c)).await;
    assert_eq!(status, StatusCode::OK);
    println!(
        "cycle_id on a cluster (blind write + cycle): {} round trips",
        client.round_trips() - before
    );
    let (_, body, _) = request(&app, "GET", "/get", Some(&cycled.expect("new cookie"))).await;
    assert_eq!(body, "1");
    let (status, _, set_cookie) = request(&app, "GET", "/get", Some(&c)).await;
    assert_eq!(
        (status, set_cookie),
        (StatusCode::CONFLICT, None),
        "the old id is cycled away"
    );
}
