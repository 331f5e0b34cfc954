//! Shared rate limits against a real Redis: a reference model driven by proptest, the burst
//! boundary, the layer's HTTP answers (429, `Retry-After`, `RateLimit` / `RateLimit-Policy`),
//! both policies for an unavailable Redis, exact counts across 4 OS processes, processes whose
//! clocks are an hour apart (faketime), and a Redis Cluster.
//!
//! The child processes are this test binary run again (`--exact child_process --ignored`), told
//! their job in environment variables; each prints `ALLOWED n`.

mod launcher_support;
mod support;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use axum::routing::get;
use axum::{Extension, Router};
use herd::rate_limit::{Decision, Quota, RateLimitLayer, RateLimiter, WhenUnavailable};
use herd::RedisClient;
use http_body_util::BodyExt as _;
use support::RedisServer;
use tower::ServiceExt as _;

const ROLE: &str = "HERD_RL_ROLE";
const URL: &str = "HERD_RL_URL";
const PREFIX: &str = "HERD_RL_PREFIX";
const CHECKS: &str = "HERD_RL_CHECKS";

/// A quota that refills one unit per hour: within a test, the counts are exact.
fn no_refill(burst: u32) -> Quota {
    Quota::per(burst, Duration::from_secs(3600 * u64::from(burst)))
}

fn config(url: &str, prefix: &str) -> herd::Config {
    herd::Config::builder()
        .redis_url(url)
        .prefix(prefix)
        .command_timeout(Duration::from_secs(2))
        .build()
        .expect("config")
}

async fn client(server: &RedisServer, name: &str) -> RedisClient {
    RedisClient::connect(support::config(server, name))
        .await
        .expect("connect")
}

// ---------------------------------------------------------------------------------------------
// The reference model.

#[derive(Clone, Debug)]
struct Check {
    key: u8,
    cost: u32,
}

fn check() -> impl proptest::strategy::Strategy<Value = Check> {
    use proptest::prelude::*;
    (0..3u8, prop_oneof![4 => Just(1u32), 1 => 1..4u32]).prop_map(|(key, cost)| Check { key, cost })
}

/// Without refill, GCRA is a budget of `burst` units per key: a check passes when its cost fits
/// in what is left, and then takes it.
async fn check_program(limiter: &RateLimiter, burst: u32, program: &[Check]) {
    let mut left: HashMap<u8, u32> = HashMap::new();
    for c in program {
        let left = left.entry(c.key).or_insert(burst);
        let d = limiter.check_n([c.key], c.cost).await.expect("check");
        let fits = c.cost <= *left;
        assert_eq!(d.is_allowed(), fits, "{c:?} with {left} left");
        if fits {
            *left -= c.cost;
            assert_eq!(d.retry_after(), Duration::ZERO);
        } else {
            assert!(d.retry_after() > Duration::ZERO, "{d:?}");
            assert!(d.retry_after_secs() >= 1);
        }
        assert_eq!(d.remaining(), *left, "{c:?}");
    }
}

#[test]
fn the_limiter_matches_the_reference_model() {
    use proptest::prelude::*;
    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = rt.block_on(client(&server, "rl-model"));
    let n = std::sync::atomic::AtomicU32::new(0);
    let config = ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(burst in 1..8u32, program in proptest::collection::vec(check(), 1..40))| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let limiter = RateLimiter::new(client.clone(), &format!("m{i}"), no_refill(burst)).expect("limiter");
        rt.block_on(check_program(&limiter, burst, &program));
    });
}

// ---------------------------------------------------------------------------------------------
// In one process.

#[tokio::test]
async fn a_burst_then_one_per_interval_and_retry_after_is_enough() {
    let server = RedisServer::start();
    let client = client(&server, "rl-burst").await;
    // 5 per second: a burst of 5, then one every 200 ms.
    let limiter =
        RateLimiter::new(client, "burst", Quota::per(5, Duration::from_secs(1))).expect("limiter");
    for i in 0..5 {
        let d = limiter.check("k").await.expect("check");
        assert!(d.is_allowed(), "request {i} of the burst refused");
        assert_eq!(d.remaining(), 4 - i);
    }
    for _ in 0..3 {
        let refused = limiter.check("k").await.expect("check");
        assert!(!refused.is_allowed());
        assert!(
            refused.retry_after() <= Duration::from_millis(200),
            "{refused:?}"
        );
        // Waiting what it says is enough, and the next one is refused again.
        tokio::time::sleep(refused.retry_after() + Duration::from_millis(5)).await;
        assert!(limiter.check("k").await.expect("check").is_allowed());
        assert!(!limiter.check("k").await.expect("check").is_allowed());
    }
    // Other keys have their own budget.
    assert!(limiter.check("other").await.expect("check").is_allowed());
    // The key expires once the burst is full again: nothing stays behind.
    let key_count = server.keys("*:rl:burst:*").len();
    assert_eq!(key_count, 2);
}

fn app(limiter: RateLimiter) -> Router {
    Router::new()
        .route(
            "/",
            get(|Extension(d): Extension<Decision>| async move {
                format!("remaining={}", d.remaining())
            }),
        )
        .layer(RateLimitLayer::new(
            limiter,
            |req: &http::request::Parts| {
                req.headers
                    .get("x-user")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            },
        ))
}

async fn call(app: &Router, user: Option<&str>) -> (http::StatusCode, http::HeaderMap, String) {
    let mut req = http::Request::get("/");
    if let Some(user) = user {
        req = req.header("x-user", user);
    }
    let res = app
        .clone()
        .oneshot(req.body(axum::body::Body::empty()).expect("request"))
        .await
        .expect("infallible");
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_layer_answers_429_with_retry_after_and_the_ietf_headers() {
    let server = RedisServer::start();
    let client = client(&server, "rl-layer").await;
    let limiter =
        RateLimiter::new(client, "api", Quota::per(2, Duration::from_secs(10))).expect("limiter");
    let app = app(limiter);
    let (status, headers, body) = call(&app, Some("ann")).await;
    assert_eq!(status, 200);
    assert_eq!(body, "remaining=1");
    assert_eq!(headers["ratelimit-policy"], r#""api";q=2;w=10"#);
    assert_eq!(headers["ratelimit"], r#""api";r=1;t=5"#);
    assert_eq!(call(&app, Some("ann")).await.0, 200);
    let (status, headers, body) = call(&app, Some("ann")).await;
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "5");
    assert_eq!(headers["ratelimit"], r#""api";r=0;t=5"#);
    assert_eq!(headers["ratelimit-policy"], r#""api";q=2;w=10"#);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(body, r#"{"error":"too many requests"}"#);
    // Another key, and no key at all (not limited, no headers).
    assert_eq!(call(&app, Some("bob")).await.0, 200);
    for _ in 0..5 {
        let (status, headers, _) = call(&app, None).await;
        assert_eq!(status, 500, "no Decision for the handler without a key");
        assert!(headers.get("ratelimit").is_none());
    }
}

#[tokio::test]
async fn redis_down_denies_by_default_and_allows_when_told() {
    let mut server = RedisServer::start();
    let client = client(&server, "rl-down").await;
    let quota = Quota::per(10, Duration::from_secs(10));
    let closed = RateLimiter::new(client.clone(), "closed", quota).expect("limiter");
    assert_eq!(closed.unavailable_policy(), WhenUnavailable::Deny);
    let open = RateLimiter::new(client, "open", quota)
        .expect("limiter")
        .when_unavailable(WhenUnavailable::Allow);
    assert!(closed.check("k").await.expect("check").is_allowed());
    server.kill();
    let e = closed.check("k").await.expect_err("Redis is down");
    assert!(e.is_unavailable() || e.is_outcome_unknown(), "{e:?}");
    let (status, headers, _) = call(&app(closed.clone()), Some("k")).await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "1");
    let d = open.check("k").await.expect("fail open");
    assert!(d.is_allowed() && d.is_unchecked());
    let (status, headers, _) = call(&app(open.clone()), Some("k")).await;
    assert_eq!(status, 200);
    assert!(
        headers.get("ratelimit").is_none(),
        "unchecked: no counts to show"
    );
    // Service returns with Redis.
    server.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match closed.check("k").await {
            Ok(d) => {
                assert!(d.is_allowed());
                break;
            }
            Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Across OS processes.

/// Runs `n` children of role `role`, each making `checks` checks; returns how many each allowed.
fn run_children(n: usize, url: &str, prefix: &str, checks: u32, wrap: Option<&[&str]>) -> Vec<u32> {
    let exe = std::env::current_exe().expect("test binary");
    let children: Vec<_> = (0..n)
        .map(|_| {
            let mut cmd = match wrap {
                Some(wrapper) => {
                    let mut c = Command::new(wrapper[0]);
                    c.args(&wrapper[1..]).arg(&exe);
                    c
                }
                None => Command::new(&exe),
            };
            cmd.args(["--exact", "child_process", "--ignored", "--nocapture"])
                .env(ROLE, "check")
                .env(URL, url)
                .env(PREFIX, prefix)
                .env(CHECKS, checks.to_string())
                // libfaketime: shift the wall clock only, so tokio's timers keep working.
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    children
        .into_iter()
        .map(|child| {
            let out = child.wait_with_output().expect("child output");
            assert!(out.status.success(), "child failed");
            let text = String::from_utf8_lossy(&out.stdout);
            text.lines()
                .find_map(|l| l.strip_prefix("ALLOWED "))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or_else(|| panic!("no ALLOWED line in {text:?}"))
        })
        .collect()
}

#[test]
fn four_processes_share_one_exact_budget() {
    let server = RedisServer::start();
    let prefix = support::unique_prefix("rl-4p");
    // 4 × 100 checks against a burst of 150 that does not refill within the test.
    let allowed = run_children(4, &server.url(), &prefix, 100, None);
    assert_eq!(allowed.iter().sum::<u32>(), 150, "{allowed:?}");
    assert!(
        allowed.iter().filter(|&&a| a > 0).count() >= 2,
        "{allowed:?}"
    );
}

#[test]
fn a_process_whose_clock_is_an_hour_ahead_sees_the_same_budget() {
    if !launcher_support::optional_tool(
        "faketime",
        &["-f", "+0", "true"],
        "apt-get install faketime",
        "the clock-skew test of the rate limiter",
    ) {
        return;
    }
    let server = RedisServer::start();
    let prefix = support::unique_prefix("rl-skew");
    // The wrapped child really runs an hour (and a day) off.
    let skewed = Command::new("faketime")
        .args(["-f", "+1h", "date", "+%s"])
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .output()
        .expect("faketime");
    let skewed: i64 = String::from_utf8_lossy(&skewed.stdout)
        .trim()
        .parse()
        .expect("date");
    let real = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert!(
        (skewed - real - 3600).abs() < 60,
        "faketime did not shift the clock"
    );
    // 100 of the 150 in a process on time, then 100 more in one an hour ahead, and 100 in one a
    // day behind: a limiter on the callers' clocks would have refilled the budget for them.
    let on_time = run_children(1, &server.url(), &prefix, 100, None);
    let ahead = run_children(
        1,
        &server.url(),
        &prefix,
        100,
        Some(&["faketime", "-f", "+1h"]),
    );
    let behind = run_children(
        1,
        &server.url(),
        &prefix,
        100,
        Some(&["faketime", "-f", "-1d"]),
    );
    assert_eq!((on_time[0], ahead[0], behind[0]), (100, 50, 0));
}

#[cfg(feature = "cluster")]
#[test]
fn on_a_redis_cluster_budgets_are_exact_per_key() {
    let cluster = support::cluster::RedisCluster::start();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let prefix = support::unique_prefix("rl-cluster");
    rt.block_on(async {
        let client = RedisClient::connect(config(&cluster.url(), &prefix))
            .await
            .expect("connect");
        let limiter = RateLimiter::new(client, "c", no_refill(7)).expect("limiter");
        // Keys land in different slots (the key is the hash tag); each has its own budget.
        let keys: Vec<String> = (0..12).map(|i| format!("client-{i}")).collect();
        let checks = keys
            .iter()
            .flat_map(|k| std::iter::repeat_n(k.clone(), 10))
            .map(|k| {
                let limiter = limiter.clone();
                async move {
                    (
                        k.clone(),
                        limiter.check(&k).await.expect("check").is_allowed(),
                    )
                }
            });
        let results = futures::future::join_all(checks).await;
        let mut allowed: HashMap<String, u32> = HashMap::new();
        for (k, ok) in results {
            *allowed.entry(k).or_default() += u32::from(ok);
        }
        assert!(allowed.values().all(|&n| n == 7), "{allowed:?}");
    });
    let slots: std::collections::HashSet<u16> = cluster
        .keys(&format!("{prefix}:rl:c:*"))
        .iter()
        .map(|k| cluster.slot_of(k))
        .collect();
    assert!(slots.len() > 1, "every key in one slot: {slots:?}");
    let nodes: std::collections::HashSet<usize> =
        slots.iter().map(|&s| cluster.owner_of(s)).collect();
    assert!(nodes.len() > 1, "every key on one node");
}

// ---------------------------------------------------------------------------------------------
// The child side.

#[test]
#[ignore = "a child process of the multi-process tests, started by them"]
fn child_process() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    assert_eq!(role, "check");
    println!();
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"));
    let checks: u32 = var(CHECKS).parse().expect("checks");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let allowed = rt.block_on(async {
        let client = RedisClient::connect(config(&var(URL), &var(PREFIX)))
            .await
            .expect("connect");
        let limiter = RateLimiter::new(client, "shared", no_refill(150)).expect("limiter");
        let mut allowed = 0;
        for _ in 0..checks {
            allowed += u32::from(
                limiter
                    .check("one-client")
                    .await
                    .expect("check")
                    .is_allowed(),
            );
        }
        allowed
    });
    println!("ALLOWED {allowed}");
}
