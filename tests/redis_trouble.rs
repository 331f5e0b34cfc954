//! Redis trouble answered by the library alone: a bare app (a `SessionLayer`, globals, no
//! middleware of its own) served over real TCP, against a real `redis-server` that is frozen
//! (`SIGSTOP`), killed and restarted, or slowed down. Checks the request deadline and the circuit
//! breaker of `herd::client` from the outside: every request that needs Redis answers within the
//! deadline plus [`SLACK`] with a 503 JSON error and `Retry-After`, service returns within 1 s of
//! Redis answering again, and a healthy burst never opens the breaker.
//!
//! (The flagship example is put through the same faults in `tests/multi_worker.rs`.)

mod launcher_support;
mod support;

use std::time::{Duration, Instant};

use axum::routing::{get, post};
use axum::{Json, Router};
use herd::client::BreakerState;
use herd::globals::Group;
use herd::{Globals, RedisClient, Session, SessionLayer};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{LatencyProxy, RedisServer};

/// The request deadline of these tests' apps.
const DEADLINE: Duration = Duration::from_millis(1000);
/// What a loaded 2-core machine may add to the deadline before the 503 reaches the client.
const SLACK: Duration = Duration::from_millis(250);
/// Service is back this soon after Redis answers again (plus [`SLACK`]).
const RECOVERY: Duration = Duration::from_secs(1);

/// The tests start loads and time them: one at a time on a 2-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A bare app: what a user writes, nothing about Redis trouble in it.
struct App {
    base: String,
    client: RedisClient,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The per-call timeout is longer than the deadline: what bounds a request here is the deadline.
fn config(url: &str, name: &str, pool_size: usize) -> herd::Config {
    herd::Config::builder()
        .redis_url(url)
        .prefix(support::unique_prefix(name))
        .request_timeout(DEADLINE)
        .command_timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(5))
        .pool_size(pool_size)
        .pool_wait_timeout(Duration::from_secs(10))
        .build()
        .expect("config")
}

async fn start_app(config: herd::Config) -> App {
    let client = RedisClient::new(config).expect("client");
    // Several load tasks transfer between the same two accounts: allow retries as the flagship
    // does, so that a conflict (409) stays rare.
    let globals = Globals::new(client.clone()).with_max_attempts(50);
    let stats = globals.group("stats").expect("group");
    let bank = globals.group("bank").expect("group");
    let router = Router::new()
        .route("/untouched", get(|| async { "ok" }))
        .route(
            "/counter",
            get(|s: Session| async move {
                Ok::<_, herd::Error>(Json(json!({ "n": s.incr("n", 1).await? })))
            }),
        )
        .route("/hits", get(hits).with_state(stats.clone()))
        .route("/three", get(three).with_state(stats))
        .route("/transfer", post(transfer).with_state(bank))
        .layer(
            SessionLayer::new(client.clone())
                .with_key(support::test_key())
                .with_secure(false),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(async move {
        axum::serve(listener, router).await.expect("serve");
    });
    App {
        base,
        client,
        server,
    }
}

async fn hits(
    axum::extract::State(stats): axum::extract::State<Group>,
) -> herd::Result<Json<Value>> {
    Ok(Json(json!({ "hits": stats.incr("hits", 1).await? })))
}

/// Three round trips, each error caught: a session read, a global read, a global write. The
/// answer says how each went; any failure makes it a 503.
async fn three(
    axum::extract::State(stats): axum::extract::State<Group>,
    session: Session,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let a = session.get::<i64>("n").await.map(|_| ());
    let b = stats.get::<i64>("hits").await.map(|_| ());
    let c = stats.incr("three", 1).await.map(|_| ());
    let outcome: Vec<Value> = [&a, &b, &c]
        .iter()
        .map(|r| match r {
            Ok(()) => json!("ok"),
            Err(e) => json!(e.status().as_u16()),
        })
        .collect();
    match a.and(b).and(c) {
        Ok(()) => Json(json!({ "three": outcome })).into_response(),
        Err(e) => {
            let mut res = e.into_response();
            res.extensions_mut().insert(outcome);
            res
        }
    }
}

/// Moves 1 from `a` to `b` with a WATCH-based update (a pooled connection each time).
async fn transfer(
    axum::extract::State(bank): axum::extract::State<Group>,
) -> Result<Json<Value>, herd::Error> {
    bank.update(&["a", "b"], |v: &mut [Option<i64>]| {
        v[0] = Some(v[0].unwrap_or(1_000_000) - 1);
        v[1] = Some(v[1].unwrap_or(0) + 1);
        Ok::<(), std::convert::Infallible>(())
    })
    .await
    .map_err(|e| match e {
        herd::globals::UpdateError::Failed(e) => e,
        herd::globals::UpdateError::Aborted(never) => match never {},
    })?;
    Ok(Json(json!({ "ok": true })))
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// One observed request.
#[derive(Debug, Clone)]
struct Sample {
    path: &'static str,
    /// When it was sent, from the start of the load.
    at: Duration,
    took: Duration,
    status: StatusCode,
    /// For a non-200: JSON body with an `error` string and `Retry-After: 1`.
    well_formed_error: bool,
}

async fn request(c: &reqwest::Client, base: &str, path: &'static str, origin: Instant) -> Sample {
    let at = origin.elapsed();
    let t = Instant::now();
    let req = if path == "/transfer" {
        c.post(format!("{base}{path}"))
    } else {
        c.get(format!("{base}{path}"))
    };
    let res = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
    let status = res.status();
    let retry_after = res
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let json_type = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    let body: Value = res.json().await.unwrap_or(Value::Null);
    let took = t.elapsed();
    Sample {
        path,
        at,
        took,
        status,
        well_formed_error: json_type
            && body["error"].is_string()
            && retry_after.as_deref() == Some("1"),
    }
}

/// `tasks` loops, each over its own connection, cycling through `paths` until `stop_after`.
async fn load(
    base: &str,
    paths: &'static [&'static str],
    tasks: usize,
    origin: Instant,
    stop_after: Duration,
) -> Vec<Sample> {
    let mut handles = Vec::new();
    for i in 0..tasks {
        let base = base.to_owned();
        handles.push(tokio::spawn(async move {
            let c = http();
            let mut samples = Vec::new();
            let mut n = i;
            while origin.elapsed() < stop_after {
                samples.push(request(&c, &base, paths[n % paths.len()], origin).await);
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            samples
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.expect("load task"));
    }
    all
}

/// The checks of an outage from `down` to `up` (times from the load's start): every request
/// answered within the deadline plus slack; the failures are 503 JSON + `Retry-After`; none
/// before the fault, all fine from `up + RECOVERY` on; the route without Redis always fine.
fn check_outage(samples: &[Sample], down: Duration, up: Duration) {
    assert!(samples.len() > 100, "too little load: {}", samples.len());
    let slowest = samples.iter().max_by_key(|s| s.took).expect("samples");
    let failed = samples
        .iter()
        .filter(|s| s.status != StatusCode::OK)
        .count();
    let first_ok_after_up = samples
        .iter()
        .filter(|s| s.path != "/untouched" && s.at >= up && s.status == StatusCode::OK)
        .map(|s| s.at + s.took - up)
        .min();
    println!(
        "{} requests, {failed} failed; slowest {:?} ({}); first success {first_ok_after_up:?} after Redis answered again",
        samples.len(),
        slowest.took,
        slowest.path
    );
    for s in samples {
        assert!(
            s.took <= DEADLINE + SLACK,
            "a request took {:?}, over the deadline {DEADLINE:?} + {SLACK:?}: {s:?}",
            s.took
        );
        if s.path == "/untouched" {
            assert_eq!(
                s.status,
                StatusCode::OK,
                "a route without Redis failed: {s:?}"
            );
            continue;
        }
        // Transfers racing on two accounts may lose the race too often: a conflict, not trouble.
        if s.path == "/transfer" && s.status == StatusCode::CONFLICT {
            continue;
        }
        if s.status != StatusCode::OK {
            assert_eq!(s.status, StatusCode::SERVICE_UNAVAILABLE, "{s:?}");
            assert!(s.well_formed_error, "503 without JSON + Retry-After: {s:?}");
            assert!(
                s.at + s.took + SLACK >= down,
                "failed before the fault: {s:?}"
            );
        }
        if s.at >= up + RECOVERY {
            assert_eq!(
                s.status,
                StatusCode::OK,
                "not recovered {RECOVERY:?} after Redis answered again: {s:?}"
            );
        }
    }
    assert!(failed > 0, "the outage was not observed");
}

const MIXED: &[&str] = &["/counter", "/untouched", "/hits", "/transfer", "/three"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_redis_under_load_answers_503_within_the_deadline_and_recovers_within_1s() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let app = start_app(config(&redis.url(), "frozen", 4)).await;
    let origin = Instant::now();
    let base = app.base.clone();
    let loader =
        tokio::spawn(async move { load(&base, MIXED, 12, origin, Duration::from_secs(7)).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let down = origin.elapsed();
    redis.freeze();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_ne!(
        app.client.health().state,
        BreakerState::Closed,
        "the breaker did not open while Redis was frozen"
    );
    let up = origin.elapsed();
    redis.thaw();
    let samples = loader.await.expect("load");
    check_outage(&samples, down, up);
    // While frozen and open, requests failed fast: most 503s took a fraction of the deadline.
    let fast = samples
        .iter()
        .filter(|s| s.status == StatusCode::SERVICE_UNAVAILABLE && s.took < DEADLINE / 4)
        .count();
    let slow = samples
        .iter()
        .filter(|s| s.status == StatusCode::SERVICE_UNAVAILABLE && s.took >= DEADLINE / 4)
        .count();
    println!("503s: {fast} fast (< {:?}), {slow} slower", DEADLINE / 4);
    assert!(
        fast > slow,
        "the breaker did not make 503s fast: {fast} fast, {slow} slow"
    );
    let health = app.client.health();
    assert_eq!(health.state, BreakerState::Closed);
    assert!(health.opened >= 1 && health.since.is_some(), "{health:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_redis_under_load_answers_503_within_the_deadline_and_recovers_within_1s() {
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start();
    let app = start_app(config(&redis.url(), "killed", 4)).await;
    let origin = Instant::now();
    let base = app.base.clone();
    let loader =
        tokio::spawn(async move { load(&base, MIXED, 12, origin, Duration::from_secs(7)).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let down = origin.elapsed();
    tokio::task::block_in_place(|| redis.kill());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_ne!(app.client.health().state, BreakerState::Closed);
    tokio::task::block_in_place(|| redis.restart());
    // Redis answers from here on (restart waits for its PING).
    let up = origin.elapsed();
    let samples = loader.await.expect("load");
    check_outage(&samples, down, up);
    assert_eq!(app.client.health().state, BreakerState::Closed);
}

/// Three round trips during a stall fail after one deadline in all, not one each; the next
/// request, with the breaker open, fails at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_round_trips_during_a_stall_fail_after_one_deadline() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let app = start_app(config(&redis.url(), "three", 4)).await;
    let c = http();
    let origin = Instant::now();
    let ok = request(&c, &app.base, "/three", origin).await;
    assert_eq!(ok.status, StatusCode::OK, "{ok:?}");
    redis.freeze();
    let stalled = request(&c, &app.base, "/three", origin).await;
    println!("three round trips during a stall: {:?}", stalled.took);
    assert_eq!(stalled.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(stalled.well_formed_error, "{stalled:?}");
    assert!(
        stalled.took <= DEADLINE + SLACK,
        "three round trips took {:?}: more than one deadline ({DEADLINE:?})",
        stalled.took
    );
    // The per-call timeout (5 s) did not apply: the request deadline did.
    assert!(
        stalled.took >= DEADLINE - Duration::from_millis(50),
        "{stalled:?}"
    );
    let next = request(&c, &app.base, "/three", origin).await;
    assert_eq!(next.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        next.took < Duration::from_millis(250),
        "with the breaker open the next request waited {:?}",
        next.took
    );
    redis.thaw();
}

/// More transfers at once than the pool has connections, against a slow but healthy Redis: the
/// ones still waiting for a connection at their deadline get a 503 at the deadline, the others
/// succeed; the breaker stays closed (Redis answers throughout), and the money adds up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_exhaustion_is_503_at_the_deadline_and_does_not_open_the_breaker() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let proxy = LatencyProxy::start(redis.port());
    let app = start_app(config(&proxy.url(), "pool", 1)).await;
    let c = http();
    let origin = Instant::now();
    assert_eq!(
        request(&c, &app.base, "/transfer", origin).await.status,
        StatusCode::OK
    );
    // Each round trip now takes 150 ms: one transfer holds the only pooled connection ~450 ms.
    proxy.set_delay(Duration::from_millis(150));
    let burst: Vec<_> = (0..8)
        .map(|_| {
            let (c, base) = (c.clone(), app.base.clone());
            tokio::spawn(async move { request(&c, &base, "/transfer", origin).await })
        })
        .collect();
    let mut ok = 0;
    let mut refused = 0;
    for b in burst {
        let s = b.await.expect("task");
        assert!(s.took <= DEADLINE + SLACK, "{s:?}");
        match s.status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(s.well_formed_error, "{s:?}");
                refused += 1;
            }
            other => panic!("unexpected {other}: {s:?}"),
        }
    }
    println!("pool of 1, 8 transfers at once: {ok} done, {refused} refused at the deadline");
    assert!(ok >= 1 && refused >= 1, "{ok} done, {refused} refused");
    assert_eq!(app.client.health().state, BreakerState::Closed);
    assert_eq!(
        app.client.health().opened,
        0,
        "a busy pool opened the breaker"
    );
    proxy.set_delay(Duration::ZERO);
    let total: (Option<i64>, Option<i64>) = {
        let a: Option<String> = redis.cmd(&[
            "GET",
            &format!("{}:g:{{bank}}:a", app.client.config().prefix()),
        ]);
        let b: Option<String> = redis.cmd(&[
            "GET",
            &format!("{}:g:{{bank}}:b", app.client.config().prefix()),
        ]);
        (
            a.and_then(|v| v.parse().ok()),
            b.and_then(|v| v.parse().ok()),
        )
    };
    if let (Some(a), Some(b)) = total {
        assert_eq!(a + b, 1_000_000, "a transfer was half applied");
    }
}

/// The probe racing real traffic: Redis thaws while requests keep coming; each one is a fast 503
/// (open or half-open) or a 200, never a slow one, and all succeed within 1 s of the thaw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_probe_racing_real_traffic_lets_it_back_within_1s() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let app = start_app(config(&redis.url(), "probe", 4)).await;
    let c = http();
    let origin = Instant::now();
    assert_eq!(
        request(&c, &app.base, "/hits", origin).await.status,
        StatusCode::OK
    );
    redis.freeze();
    // The first request meets the freeze and waits its deadline; the breaker opens meanwhile.
    let first = request(&c, &app.base, "/hits", origin).await;
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_ne!(app.client.health().state, BreakerState::Closed);
    // Let a few probes go unanswered (each waits 5 s, the per-call timeout, while half-open).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let base = app.base.clone();
    let thawed_at = origin.elapsed() + Duration::from_millis(300);
    let traffic = tokio::spawn(async move {
        load(
            &base,
            &["/hits", "/counter"],
            8,
            origin,
            thawed_at + Duration::from_secs(2),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.thaw();
    let samples = traffic.await.expect("traffic");
    let mut seen_half_open_503 = 0;
    for s in &samples {
        assert!(s.took <= DEADLINE + SLACK, "{s:?}");
        if s.status != StatusCode::OK {
            assert_eq!(s.status, StatusCode::SERVICE_UNAVAILABLE, "{s:?}");
            assert!(s.well_formed_error, "{s:?}");
            if s.at < thawed_at {
                seen_half_open_503 += 1;
                assert!(
                    s.took < Duration::from_millis(250),
                    "not failed fast: {s:?}"
                );
            }
        }
        if s.at >= thawed_at + RECOVERY {
            assert_eq!(
                s.status,
                StatusCode::OK,
                "not back 1 s after the thaw: {s:?}"
            );
        }
    }
    assert!(seen_half_open_503 > 0, "no request met the open breaker");
    assert_eq!(app.client.health().state, BreakerState::Closed);
    assert_eq!(app.client.health().opened, 1, "{:?}", app.client.health());
}

/// A healthy burst: 500 concurrent connections on session and global routes, with the default
/// deadline and timeouts. No 503 at all, and the breaker never opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_burst_of_500_connections_never_opens_the_breaker() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    // The defaults: a 2 s deadline, 1 s per call.
    let config = herd::Config::builder()
        .redis_url(redis.url())
        .prefix(support::unique_prefix("burst"))
        .build()
        .expect("config");
    let app = start_app(config).await;
    let origin = Instant::now();
    let samples = load(
        &app.base,
        &["/counter", "/hits"],
        500,
        origin,
        Duration::from_secs(5),
    )
    .await;
    let failed: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.status != StatusCode::OK)
        .collect();
    println!(
        "healthy burst: {} requests over 500 connections, {} failed, slowest {:?}",
        samples.len(),
        failed.len(),
        samples.iter().map(|s| s.took).max()
    );
    assert!(samples.len() >= 500, "{}", samples.len());
    assert!(
        failed.is_empty(),
        "{} false failures, first {:?}",
        failed.len(),
        failed.first()
    );
    assert_eq!(
        app.client.health().opened,
        0,
        "the breaker opened under a healthy burst"
    );
}

/// The breaker is visible in `herd status` (the `redis` column, from the worker's metrics): closed,
/// open while Redis is frozen and a request met it, closed again after the thaw. The worker is the
/// flagship example under `herd run --metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herd_status_shows_the_breaker_open_while_redis_is_frozen() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let flagship = launcher_support::example_bin("multi_worker");
    let metrics = format!("127.0.0.1:{}", launcher_support::free_port());
    let url = redis.url();
    let prefix = support::unique_prefix("status");
    let mut master = tokio::task::block_in_place(|| {
        let mut m = launcher_support::Master::herd_run_env(
            &["--workers", "1", "--metrics", &metrics],
            &[flagship.to_str().expect("path")],
            &[
                ("REDIS_URL", url.as_str()),
                ("HERD_PREFIX", prefix.as_str()),
            ],
        );
        m.wait_online(1, Duration::from_secs(30));
        m
    });
    let base = format!("http://127.0.0.1:{}", master.port());
    let breaker = |master: &launcher_support::Master| {
        master
            .status()
            .and_then(|s| s.workers.first().and_then(|w| w.redis.clone()))
    };
    let wait_for = |master: &launcher_support::Master, want: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = breaker(master);
            if now.as_deref() == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "status shows redis {now:?}, not {want}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let c = http();
    let origin = Instant::now();
    assert_eq!(
        request(&c, &base, "/counter", origin).await.status,
        StatusCode::OK
    );
    tokio::task::block_in_place(|| wait_for(&master, "closed"));
    redis.freeze();
    let r = request(&c, &base, "/counter", origin).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
    tokio::task::block_in_place(|| wait_for(&master, "open"));
    let status = master.status().expect("status");
    assert!(status.workers[0].redis_since.is_some(), "{status:?}");
    let table = status.to_string();
    assert!(
        table.contains("redis") && table.contains("open "),
        "{table}"
    );
    redis.thaw();
    tokio::task::block_in_place(|| wait_for(&master, "closed"));
    assert_eq!(
        request(&c, &base, "/counter", origin).await.status,
        StatusCode::OK
    );
    master.assert_running();
}

/// An app with globals only, no `SessionLayer`: `RequestDeadlineLayer` gives its requests the
/// deadline. Against a frozen Redis the first request answers at the deadline (1 s), not at the
/// per-call timeout (5 s); without the layer it is the per-call timeout that bounds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_deadline_layer_bounds_an_app_without_sessions() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let client = RedisClient::new(config(&redis.url(), "globals-only", 4)).expect("client");
    let stats = Globals::new(client.clone()).group("stats").expect("group");
    let router = Router::new()
        .route("/hits", get(hits).with_state(stats))
        .layer(herd::client::RequestDeadlineLayer::new(
            client.config().request_timeout(),
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(async move {
        axum::serve(listener, router).await.expect("serve");
    });
    let c = http();
    let origin = Instant::now();
    assert_eq!(
        request(&c, &base, "/hits", origin).await.status,
        StatusCode::OK
    );
    redis.freeze();
    let stalled = request(&c, &base, "/hits", origin).await;
    println!(
        "globals-only app, frozen Redis: 503 after {:?}",
        stalled.took
    );
    assert_eq!(stalled.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(stalled.well_formed_error, "{stalled:?}");
    assert!(
        stalled.took >= DEADLINE - Duration::from_millis(50) && stalled.took <= DEADLINE + SLACK,
        "{stalled:?}"
    );
    redis.thaw();
    server.abort();
}
