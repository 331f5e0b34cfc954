//! The session layer under faults: Redis killed, frozen, slow, cutting connections, read-only, out of
//! memory; requests cancelled midway; hostile cookies. Each outcome is asserted.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Path;
use axum::routing::{get, post};
use axum::{Json, Router};
use herd::{RedisClient, Session, SessionLayer};
use http::{header, Request, StatusCode};
use serde_json::json;
use support::{LatencyProxy, RedisServer};
use tokio::sync::Mutex;
use tower::ServiceExt;

const TIMEOUT: Duration = Duration::from_millis(500);
/// What "within the configured timeout" may add for scheduling on a loaded 2-core machine: a
/// request that needs Redis answers within one command timeout plus this (the largest measured
/// was ~TIMEOUT + 60 ms), never after several timeouts back to back.
const SLACK: Duration = Duration::from_millis(250);

fn app(url: &str, name: &str) -> (Router, RedisClient) {
    let config = herd::Config::builder()
        .redis_url(url)
        .prefix(support::unique_prefix(name))
        .command_timeout(TIMEOUT)
        .connect_timeout(TIMEOUT)
        .build()
        .expect("config");
    let client = RedisClient::new(config).expect("client");
    let router = Router::new()
        .route("/untouched", get(|| async { "ok" }))
        .route(
            "/incr",
            get(|s: Session| async move {
                Ok::<_, herd::Error>(Json(json!({ "n": s.incr("n", 1).await? })))
            }),
        )
        .route(
            "/read",
            get(|s: Session| async move {
                let v: Option<serde_json::Value> = s.get("a").await?;
                Ok::<_, herd::Error>(Json(json!({ "a": v })))
            }),
        )
        .route(
            "/pair/{i}",
            post(|s: Session, Path(i): Path<u64>| async move {
                s.insert("a", i).await?;
                s.insert("b", i).await?;
                s.insert("pad", "x".repeat(2000)).await?;
                Ok::<_, herd::Error>("ok")
            }),
        )
        .layer(
            SessionLayer::new(client.clone())
                .with_key(support::test_key())
                .with_secure(false),
        );
    (router, client)
}

async fn send(router: &Router, path: &str, cookie: Option<&str>) -> (StatusCode, Option<String>) {
    let method = if path.starts_with("/pair") {
        "POST"
    } else {
        "GET"
    };
    let mut req = Request::builder().method(method).uri(path);
    if let Some(c) = cookie {
        req = req.header(header::COOKIE, c);
    }
    let res = router
        .clone()
        .oneshot(req.body(Body::empty()).expect("req"))
        .await
        .expect("infallible");
    let cookie = res
        .headers()
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_owned);
    (res.status(), cookie)
}

async fn new_session(router: &Router) -> String {
    let (status, cookie) = send(router, "/incr", None).await;
    assert_eq!(status, StatusCode::OK);
    cookie.expect("cookie")
}

/// One observed request.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    took: Duration,
    status: StatusCode,
    needs_redis: bool,
}

/// Runs `workers` tasks sending requests until `stop_after`, alternating a Redis route and an
/// untouched route, and returns every sample.
async fn load(router: Router, cookie: String, workers: usize, stop_after: Duration) -> Vec<Sample> {
    let start = Instant::now();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (router, cookie, samples) = (router.clone(), cookie.clone(), samples.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while start.elapsed() < stop_after {
                let needs_redis = (i + w as u64).is_multiple_of(2);
                let path = if needs_redis { "/incr" } else { "/untouched" };
                let t = Instant::now();
                let at = start.elapsed();
                let (status, _) = send(&router, path, Some(&cookie)).await;
                samples.lock().await.push(Sample {
                    at,
                    took: t.elapsed(),
                    status,
                    needs_redis,
                });
                i += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("load task");
    }
    let samples = samples.lock().await.clone();
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_then_restarted() {
    let mut server = RedisServer::start();
    let (router, _client) = app(&server.url(), "kill");
    let cookie = new_session(&router).await;
    let t0 = Instant::now();
    let loader = tokio::spawn(load(router.clone(), cookie, 8, Duration::from_secs(9)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let down_from = t0.elapsed();
    tokio::task::block_in_place(|| server.kill());
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::block_in_place(|| server.restart());
    let up_from = t0.elapsed();
    let samples = loader.await.expect("load");
    check_outage(&samples, down_from, up_from);
}

/// Every request is answered within the timeout; untouched routes always succeed; requests that
/// start 2 s after the outage ended all succeed.
fn check_outage(samples: &[Sample], down_from: Duration, up_from: Duration) {
    assert!(samples.len() > 100, "too little load: {}", samples.len());
    let slowest = samples.iter().max_by_key(|s| s.took).expect("samples");
    println!("slowest request: {slowest:?}");
    let mut failed_during = 0;
    for s in samples {
        assert!(
            s.took <= TIMEOUT + SLACK,
            "a request waited {:?} (timeout {TIMEOUT:?}): {s:?}",
            s.took
        );
        if !s.needs_redis {
            assert_eq!(
                s.status,
                StatusCode::OK,
                "a route without Redis failed: {s:?}"
            );
        }
        if s.status != StatusCode::OK {
            assert_eq!(s.status, StatusCode::SERVICE_UNAVAILABLE, "{s:?}");
            failed_during += 1;
        }
        if s.at > up_from + Duration::from_secs(2) {
            assert_eq!(
                s.status,
                StatusCode::OK,
                "not recovered 2 s after the outage: {s:?}"
            );
        }
        if s.at + SLACK < down_from {
            assert_eq!(s.status, StatusCode::OK, "failed before the outage: {s:?}");
        }
    }
    assert!(failed_during > 0, "the outage was not observed");
    let first_ok_after = samples
        .iter()
        .filter(|s| s.needs_redis && s.at >= up_from && s.status == StatusCode::OK)
        .map(|s| s.at - up_from)
        .min();
    // Detection: from the fault to the first 503 answered.
    let first_503 = samples
        .iter()
        .filter(|s| s.status != StatusCode::OK)
        .map(|s| (s.at + s.took).saturating_sub(down_from))
        .min();
    let late_503s = samples
        .iter()
        .filter(|s| s.status != StatusCode::OK && s.at + s.took > up_from)
        .count();
    println!(
        "samples: {}, 503s: {failed_during}, first 503 {first_503:?} after the fault, first \
         success {first_ok_after:?} after the recovery, {late_503s} 503s answered after it",
        samples.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_then_thawed() {
    let server = RedisServer::start();
    let (router, _client) = app(&server.url(), "freeze");
    let cookie = new_session(&router).await;
    let t0 = Instant::now();
    let loader = tokio::spawn(load(router.clone(), cookie, 8, Duration::from_secs(9)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let down_from = t0.elapsed();
    server.freeze();
    tokio::time::sleep(Duration::from_secs(5)).await;
    server.thaw();
    let up_from = t0.elapsed();
    let samples = loader.await.expect("load");
    check_outage(&samples, down_from, up_from);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_above_the_timeout_never_applies_a_write_twice() {
    let server = RedisServer::start();
    let proxy = LatencyProxy::start(server.port());
    let (router, client) = app(&proxy.url(), "latency");
    let cookie = new_session(&router).await; // n = 1
    let mut ok = 0;
    let attempts: u32 = 20;
    for i in 0..attempts {
        // Every other request: replies arrive after the timeout.
        if i.is_multiple_of(2) {
            proxy.set_delay(TIMEOUT + Duration::from_millis(300));
        } else {
            proxy.set_delay(Duration::ZERO);
        }
        let t = Instant::now();
        let (status, _) = send(&router, "/incr", Some(&cookie)).await;
        assert!(t.elapsed() <= TIMEOUT + SLACK, "waited {:?}", t.elapsed());
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {}
            other => panic!("unexpected {other}"),
        }
    }
    proxy.set_delay(Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(2)).await; // let delayed replies drain
    let key = server
        .keys(&format!("{}:s:*", client.config().prefix()))
        .pop()
        .expect("session key");
    let n: i64 = server.cmd(&["HGET", &key, "n"]);
    println!(
        "attempts {attempts}, answered 200: {ok}, stored count {}",
        n - 1
    );
    assert!(n > i64::from(ok), "a write that answered 200 is missing");
    assert!(n - 1 <= i64::from(attempts), "a write was applied twice");
    // Service is back.
    let (status, _) = send(&router, "/incr", Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_load_errors_stay_bounded() {
    let server = RedisServer::start();
    let (router, client) = app(&server.url(), "cut");
    let cookie = new_session(&router).await;
    let loader = tokio::spawn(load(
        router.clone(),
        cookie.clone(),
        8,
        Duration::from_secs(4),
    ));
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let killed = tokio::task::block_in_place(|| server.kill_clients());
        assert!(killed >= 1, "nothing to cut");
    }
    let samples = loader.await.expect("load");
    let failed = samples
        .iter()
        .filter(|s| s.status != StatusCode::OK)
        .count();
    let ok_incr = samples
        .iter()
        .filter(|s| s.needs_redis && s.status == StatusCode::OK)
        .count() as i64;
    println!("samples {}, failed {failed}", samples.len());
    // At most the requests in flight on the cut connection fail (8 workers × 3 cuts).
    assert!(failed <= 8 * 3, "{failed} failures for 3 cuts");
    let (status, _) = send(&router, "/incr", Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK, "the connection did not heal");
    let key = server
        .keys(&format!("{}:s:*", client.config().prefix()))
        .pop()
        .expect("session key");
    let n: i64 = server.cmd(&["HGET", &key, "n"]);
    assert!(
        n >= ok_incr + 2,
        "an acknowledged increment is missing: {n} < {ok_incr} + 2"
    );
}

/// 1000 requests cut at random points (the client goes away: the request future is dropped), half
/// of them session saves of two fields, half globals work on pooled connections (`update` with
/// `WATCH`, then an atomic group of two variables). Some complete, some are cut; nothing is half
/// written, and afterwards every pooled connection serves (none is left with a pending reply or a
/// `WATCH`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_cancelled_midway_leave_nothing_half_written() {
    use rand::Rng as _;
    use std::sync::atomic::{AtomicU64, Ordering};
    let server = RedisServer::start();
    let (router, client) = app(&server.url(), "cancel");
    let group = herd::Globals::new(client.clone())
        .with_max_attempts(100)
        .group("cancel")
        .expect("group");
    let globals_routes = {
        let group = group.clone();
        Router::new().route(
            "/pairg/{i}",
            post(move |Path(i): Path<i64>| {
                let group = group.clone();
                async move {
                    group
                        .update(&["c"], |v: &mut [Option<i64>]| {
                            v[0] = Some(v[0].unwrap_or(0) + 1);
                            Ok::<(), std::convert::Infallible>(())
                        })
                        .await
                        .map_err(|e| match e {
                            herd::globals::UpdateError::Failed(e) => e,
                            herd::globals::UpdateError::Aborted(never) => match never {},
                        })?;
                    group.atomic().set("a", &i).set("b", &i).apply().await?;
                    Ok::<_, herd::Error>("ok")
                }
            }),
        )
    };
    let router = router.merge(globals_routes);
    let cookie = new_session(&router).await;
    let (completed, cut) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let completed_globals = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..1000u64 {
        let (router, cookie) = (router.clone(), cookie.clone());
        let (completed, cut_count) = (completed.clone(), cut.clone());
        let completed_globals = completed_globals.clone();
        // All 1000 start at once and queue: cut points spread over the time they take to finish.
        let cut = Duration::from_micros(rand::rng().random_range(0..300_000));
        let path = if i % 2 == 0 {
            format!("/pair/{i}")
        } else {
            format!("/pairg/{i}")
        };
        tasks.push(tokio::spawn(async move {
            match tokio::time::timeout(cut, send(&router, &path, Some(&cookie))).await {
                Ok((status, _)) => {
                    assert_eq!(status, StatusCode::OK, "{path}");
                    completed.fetch_add(1, Ordering::Relaxed);
                    if path.starts_with("/pairg") {
                        completed_globals.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(_) => {
                    cut_count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let (completed, cut) = (
        completed.load(Ordering::Relaxed),
        cut.load(Ordering::Relaxed),
    );
    println!("1000 requests: {completed} completed, {cut} cut midway");
    assert!(
        completed > 0,
        "no request completed: the test cuts too early"
    );
    assert!(cut > 0, "no request was cut: the test proves nothing");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let key = server
        .keys(&format!("{}:s:*", client.config().prefix()))
        .pop()
        .expect("session key");
    let (a, b): (Option<String>, Option<String>) = {
        let mut conn = server.conn();
        redis::cmd("HMGET")
            .arg(&key)
            .arg("a")
            .arg("b")
            .query(&mut conn)
            .expect("hmget")
    };
    assert_eq!(a, b, "a half-applied save: a={a:?} b={b:?}");
    let ab: Vec<Option<i64>> = group.get_many(&["a", "b"]).await.expect("read");
    assert_eq!(ab[0], ab[1], "a half-applied atomic group: {ab:?}");
    let c = group.get::<i64>("c").await.expect("read").unwrap_or(0);
    let completed_globals = completed_globals.load(Ordering::Relaxed) as i64;
    assert!(
        (completed_globals..=500).contains(&c),
        "{c} updates stored, {completed_globals} acknowledged, 500 sent"
    );

    // The shared connection serves...
    for _ in 0..50 {
        let (status, _) = send(&router, "/incr", Some(&cookie)).await;
        assert_eq!(status, StatusCode::OK);
    }
    // ...and so does every pooled connection: twice as many concurrent updates as the pool holds
    // (16 by default), each on its own variable, all succeed.
    let tasks: Vec<_> = (0..32)
        .map(|k| {
            let group = group.clone();
            tokio::spawn(async move {
                group
                    .update(
                        &[format!("after{k}").as_str()],
                        |v: &mut [Option<i64>]| {
                            v[0] = Some(v[0].unwrap_or(0) + 1);
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
    let c_before = group.get::<i64>("c").await.expect("read").unwrap_or(0);
    for _ in 0..16 {
        let (status, _) = send(&router, "/pairg/7", Some(&cookie)).await;
        assert_eq!(status, StatusCode::OK);
    }
    let c_after = group.get::<i64>("c").await.expect("read").unwrap_or(0);
    assert_eq!(c_after, c_before + 16, "updates after the cuts are exact");
}

#[tokio::test]
async fn read_only_and_out_of_memory_refuse_writes_cleanly() {
    let server = RedisServer::start();
    let (router, client) = app(&server.url(), "readonly");
    let cookie = new_session(&router).await;
    send(&router, "/pair/1", Some(&cookie)).await;
    let key = server
        .keys(&format!("{}:s:*", client.config().prefix()))
        .pop()
        .expect("session key");
    let before: std::collections::HashMap<String, String> = server.cmd(&["HGETALL", &key]);

    server.make_read_only();
    let (status, _) = send(&router, "/pair/2", Some(&cookie)).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "READONLY must be a 503"
    );
    let (status, _) = send(&router, "/incr", Some(&cookie)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _) = send(&router, "/read", Some(&cookie)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "reads keep working on a read-only server"
    );
    server.make_writable();
    let after: std::collections::HashMap<String, String> = server.cmd(&["HGETALL", &key]);
    assert_eq!(before, after, "a refused write changed data");

    let _: () = server.cmd(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    let _: () = server.cmd(&["CONFIG", "SET", "maxmemory", "1"]);
    let (status, _) = send(&router, "/pair/3", Some(&cookie)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "OOM must be a 503");
    let (status, _) = send(&router, "/read", Some(&cookie)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "reads keep working when Redis is out of memory"
    );
    let _: () = server.cmd(&["CONFIG", "SET", "maxmemory", "0"]);
    let after: std::collections::HashMap<String, String> = server.cmd(&["HGETALL", &key]);
    assert_eq!(before, after, "a refused write changed data");
    let (status, _) = send(&router, "/pair/4", Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
}

/// Correctly signed cookies carrying hostile ids: none reaches Redis (no command at all is run for
/// them, per `INFO commandstats`), while a correctly signed well-formed id does (the positive
/// control: the same request path, the same signing, so the count of zero means something).
#[tokio::test]
async fn hostile_cookies_never_reach_redis() {
    let server = RedisServer::start();
    let (router, _client) = app(&server.url(), "hostile");
    let key = support::test_key(); // the layer's key: correctly signed, hostile ids
    let signed = |id: &str| {
        let mut jar = cookie::CookieJar::new();
        jar.signed_mut(&key)
            .add(cookie::Cookie::new("herd_session", id.to_owned()));
        let value = jar
            .get("herd_session")
            .map(|c| c.value().to_owned())
            .expect("signed cookie");
        format!("herd_session={value}")
    };
    let ids = [
        "*".to_owned(),
        "{tag}".to_owned(),
        "a}b{c".to_owned(),
        "abc\r\nFLUSHALL".to_owned(),
        "0123456789abcdef\r\n0123456789abcd".to_owned(),
        "with space".to_owned(),
        "0123456789abcdef 123456789abcdef".to_owned(),
        "x".repeat(5000),
        "0".repeat(5000),
        "0123456789abcdef0123456789abcde*".to_owned(),
        "0123456789abcdef{0123456789abcd}".to_owned(),
        "0123456789ABCDEF0123456789ABCDEF".to_owned(),
        "0123456789abcdef0123456789abcdef0".to_owned(),
        "abc%0D%0AFLUSHALL".to_owned(),
    ];
    let read = |header: http::HeaderValue| {
        let req = Request::builder()
            .uri("/read")
            .header(header::COOKIE, header)
            .body(Body::empty())
            .expect("req");
        router.clone().oneshot(req)
    };
    server.reset_stats();
    let (mut sent, mut unsendable) = (0, 0);
    for id in &ids {
        // CR and LF cannot be put in an HTTP header at all (the `http` crate refuses them, as
        // does hyper on the wire): such a cookie never reaches the layer. Counted, not skipped.
        let Ok(hv) = http::HeaderValue::from_str(&signed(id)) else {
            assert!(id.contains(['\r', '\n']), "{id:?} should be sendable");
            unsendable += 1;
            continue;
        };
        let res = read(hv).await.expect("infallible");
        assert_eq!(res.status(), StatusCode::OK, "{id:?}");
        assert!(
            res.headers().get(header::SET_COOKIE).is_none(),
            "a read with a refused cookie sets nothing"
        );
        sent += 1;
    }
    assert_eq!(
        (sent, unsendable),
        (ids.len() - 2, 2),
        "all but the two CR/LF ids were sent"
    );
    let data_commands = |calls: &std::collections::HashMap<String, u64>| -> u64 {
        calls
            .iter()
            .filter(|(c, _)| {
                !matches!(
                    c.as_str(),
                    "info" | "config|resetstat" | "ping" | "client|setinfo" | "hello"
                )
            })
            .map(|(_, n)| n)
            .sum()
    };
    let calls = server.command_calls();
    assert_eq!(
        data_commands(&calls),
        0,
        "hostile ids reached Redis: {calls:?}"
    );

    // Positive control: a well-formed id, signed the same way, does reach Redis (one HGETALL).
    let valid = "0123456789abcdef0123456789abcdef";
    let res = read(http::HeaderValue::from_str(&signed(valid)).expect("header"))
        .await
        .expect("infallible");
    assert_eq!(res.status(), StatusCode::OK);
    let calls = server.command_calls();
    assert_eq!(
        calls.get("hgetall").copied(),
        Some(1),
        "the valid id was not looked up: {calls:?}"
    );
    assert_eq!(data_commands(&calls), 1, "{calls:?}");
    assert_eq!(server.dbsize(), 0, "nothing was created by reading");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_cookieless_requests_create_nothing() {
    let server = RedisServer::start();
    let (router, _client) = app(&server.url(), "flood");
    let before = server.dbsize();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let router = router.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..12_500 {
                let path = if (i + t) % 2 == 0 {
                    "/read"
                } else {
                    "/untouched"
                };
                let (status, cookie) = send(&router, path, None).await;
                assert_eq!(status, StatusCode::OK);
                assert!(cookie.is_none());
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(server.dbsize(), before);
}

/// Regression: a logout (`destroy`) whose delete fails is not dropped when a later command of the
/// same request fails too: the response never reports success for a session that was not deleted.
#[tokio::test]
async fn a_failed_logout_is_not_reported_as_done() {
    let server = RedisServer::start();
    let config = herd::Config::builder()
        .redis_url(server.url())
        .prefix(support::unique_prefix("failed-logout"))
        .command_timeout(TIMEOUT)
        .connect_timeout(TIMEOUT)
        .build()
        .expect("config");
    let client = RedisClient::new(config).expect("client");
    let router = Router::new()
        .route(
            "/seed",
            post(|s: Session| async move {
                s.insert("user", "ann").await?;
                Ok::<_, herd::Error>("ok")
            }),
        )
        .route(
            "/logout-then-count",
            post(|s: Session| async move {
                s.destroy().await;
                // A handler that ignores the counter's failure (it is not what the request is for).
                let _ = s.incr("logouts", 1).await;
                "ok"
            }),
        )
        .layer(
            SessionLayer::new(client)
                .with_key(support::test_key())
                .with_secure(false),
        );
    let send = |path: &'static str, cookie: Option<String>| {
        let router = router.clone();
        async move {
            let mut req = Request::builder().method("POST").uri(path);
            if let Some(c) = cookie {
                req = req.header(header::COOKIE, c);
            }
            router
                .oneshot(req.body(Body::empty()).expect("request"))
                .await
                .expect("infallible")
        }
    };
    let res = send("/seed", None).await;
    assert_eq!(res.status(), StatusCode::OK);
    let cookie = res
        .headers()
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_owned)
        .expect("cookie");
    server.freeze();
    let res = send("/logout-then-count", Some(cookie)).await;
    server.thaw();
    assert_eq!(
        res.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the logout was not applied, yet the response said {}",
        res.status()
    );
}
