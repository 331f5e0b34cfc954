//! The flagship example, black-box: its exact HTTP contract with 4 workers against a harness Redis,
//! exact counters under concurrency, the bank invariant, rolling reload under load, graceful stop.
//!
//! Builds the example first (`cargo build --example multi_worker` with this test's profile and
//! features), so running this file alone never uses a stale binary.

mod launcher_support;
mod support;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::RedisServer;

/// The tests of this file start up to 4 worker processes each, bound latencies ("503 within 2 s")
/// or demand zero errors under load: on a 2-core machine they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The example binary, built for this test run.
fn example_binary() -> PathBuf {
    launcher_support::example_bin("multi_worker")
}

/// A running example (the master and its workers); killed with its process group on drop.
struct Example {
    child: Option<Child>,
    port: u16,
    base: String,
}

impl Example {
    fn start(redis_url: &str, workers: usize) -> Example {
        Example::start_env(redis_url, workers, &[])
    }

    /// [`start`](Self::start) with extra environment for the master.
    fn start_env(redis_url: &str, workers: usize, env: &[(&str, &str)]) -> Example {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(example_binary())
            .args([
                "--workers",
                &workers.to_string(),
                "--port",
                &port.to_string(),
            ])
            .env("REDIS_URL", redis_url)
            .env("HERD_PREFIX", support::unique_prefix("flagship"))
            .env_remove("HERD_SECRET")
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the example");
        let example = Example {
            child: Some(child),
            port,
            base: format!("http://127.0.0.1:{port}"),
        };
        example.wait_for_workers(workers);
        example
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits until `n` distinct workers have answered /whoami over fresh connections.
    fn wait_for_workers(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = HashSet::new();
        while Instant::now() < deadline {
            if let Ok(body) = blocking_get(&format!("{}/whoami", self.base)) {
                if let Some(w) = body["worker"].as_u64() {
                    seen.insert(w);
                }
            }
            if seen.len() >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("only workers {seen:?} of {n} answered within 30 s");
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("kill(1)");
        assert!(status.success());
    }

    /// Waits for the master to exit and returns its exit code.
    fn wait(&mut self, limit: Duration) -> Option<i32> {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the master did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
        // Workers die with their master (they watch its channel); make sure anyway.
        for pid in processes_with_arg(&self.port.to_string()) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// Pids of processes of the example binary whose command line contains `arg`.
fn processes_with_arg(arg: &str) -> Vec<u32> {
    let bin = example_binary();
    let bin = bin.to_string_lossy();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let parts: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        if parts
            .iter()
            .any(|p| p.contains(&*bin) || p.ends_with("/multi_worker"))
            && parts.iter().any(|p| p == arg)
        {
            // Skip zombies: they are gone, only not yet reaped by their parent.
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            if !stat.contains(") Z ") {
                pids.push(pid);
            }
        }
    }
    pids
}

fn blocking_get(url: &str) -> Result<Value, String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").ok_or("url")?;
    let (host, path) = rest.split_once('/').ok_or("url")?;
    let mut s = std::net::TcpStream::connect(host).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).map_err(|e| e.to_string())
}

/// A client that opens a fresh connection per request, so requests spread over the workers.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

struct Reply {
    status: StatusCode,
    cookie: Option<String>,
    has_set_cookie: bool,
    /// The whole `Set-Cookie` header, if any.
    set_cookie: Option<String>,
    retry_after: Option<String>,
    /// The `Content-Type` header.
    content_type: Option<String>,
    body: Value,
}

/// A `Set-Cookie` that deletes the cookie: `Max-Age=0`, or an `Expires` in the past.
fn clears_cookie(set_cookie: &str) -> bool {
    set_cookie.contains("Max-Age=0") || set_cookie.contains("Expires=Thu, 01 Jan 1970")
}

async fn call(
    c: &reqwest::Client,
    method: &str,
    url: &str,
    cookie: Option<&str>,
    body: Option<&str>,
) -> Reply {
    let mut req = match method {
        "POST" => c.post(url),
        "GET" => c.get(url),
        other => c.request(other.parse().expect("method"), url),
    };
    if let Some(cookie) = cookie {
        req = req.header("cookie", cookie);
    }
    if let Some(body) = body {
        req = req
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    let res = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = res.status();
    let header = |name: &str| {
        res.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let set = header("set-cookie");
    let retry_after = header("retry-after");
    let content_type = header("content-type");
    let cookie = set
        .as_deref()
        .filter(|c| !c.contains("Max-Age=0"))
        .and_then(|c| c.split(';').next())
        .map(str::to_owned);
    let text = res.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Reply {
        status,
        cookie,
        has_set_cookie: set.is_some(),
        set_cookie: set,
        retry_after,
        content_type,
        body,
    }
}

/// The flagship with `workers` workers on a fresh harness Redis, a client, and the base URL.
fn flagship(workers: usize) -> (RedisServer, Example, reqwest::Client) {
    let redis = RedisServer::start();
    let ex = Example::start(&redis.url(), workers);
    (redis, ex, client())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_without_a_session_set_no_cookie_and_me_is_401() {
    let _serial = SERIAL.lock().await;
    let (_redis, ex, c) = flagship(4);
    let url = |p: &str| format!("{}{p}", ex.base);
    // Routes that do not need a session never set a cookie.
    let r = call(&c, "GET", &url("/healthz"), None, None).await;
    assert_eq!(
        (r.status, r.body.clone()),
        (StatusCode::OK, json!({ "ok": true }))
    );
    let r = call(&c, "GET", &url("/whoami"), None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.body["worker"].is_u64() && r.body["pid"].is_u64(),
        "{}",
        r.body
    );
    assert!(!r.has_set_cookie);
    let r = call(&c, "GET", &url("/session"), None, None).await;
    assert_eq!(r.body, json!({ "data": {} }));
    assert!(
        !r.has_set_cookie,
        "an anonymous /session must not create a session"
    );
    let r = call(&c, "GET", &url("/me"), None, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_counter_is_exact_under_500_concurrent_requests_over_all_workers() {
    let _serial = SERIAL.lock().await;
    let (_redis, ex, c) = flagship(4);
    let url = |p: &str| format!("{}{p}", ex.base);
    // Session counter: exact under 500 concurrent requests on one cookie, over all workers.
    let first = call(&c, "GET", &url("/counter"), None, None).await;
    assert_eq!(first.body["counter"], json!(1));
    let cookie = first.cookie.clone().expect("a new session sets a cookie");
    let mut tasks = Vec::new();
    for _ in 0..500 {
        let (c, u, cookie) = (c.clone(), url("/counter"), cookie.clone());
        tasks.push(tokio::spawn(async move {
            let r = call(&c, "GET", &u, Some(&cookie), None).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            assert!(!r.has_set_cookie, "an existing session got Set-Cookie");
            (
                r.body["counter"].as_i64().expect("counter"),
                r.body["worker"].as_u64().expect("worker"),
            )
        }));
    }
    let mut counts = HashSet::new();
    let mut workers = HashSet::new();
    for t in tasks {
        let (n, w) = t.await.expect("task");
        assert!(counts.insert(n), "counter value {n} handed out twice");
        workers.insert(w);
    }
    assert_eq!(counts.iter().max(), Some(&501));
    assert!(
        workers.len() >= 2,
        "requests did not spread over workers: {workers:?}"
    );
    let r = call(&c, "GET", &url("/session"), Some(&cookie), None).await;
    assert_eq!(r.body, json!({ "data": { "counter": 501 } }));
    assert!(!r.has_set_cookie);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_hit_counter_is_exact_under_1000_concurrent_requests() {
    let _serial = SERIAL.lock().await;
    let (_redis, ex, c) = flagship(4);
    let url = |p: &str| format!("{}{p}", ex.base);
    // Global hits: exact under 1000 concurrent requests.
    let base_hits = call(&c, "GET", &url("/hits"), None, None).await.body["hits"]
        .as_i64()
        .expect("hits");
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let (c, u) = (c.clone(), url("/hits"));
        tasks.push(tokio::spawn(async move {
            let r = call(&c, "GET", &u, None, None).await;
            assert_eq!(r.status, StatusCode::OK);
            r.body["hits"].as_i64().expect("hits")
        }));
    }
    let mut hits = HashSet::new();
    for t in tasks {
        assert!(hits.insert(t.await.expect("task")));
    }
    assert_eq!(hits.iter().max(), Some(&(base_hits + 1000)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_keep_the_total_at_10000_while_snapshots_are_taken() {
    let _serial = SERIAL.lock().await;
    let (_redis, ex, c) = flagship(4);
    let url = |p: &str| format!("{}{p}", ex.base);
    // Transfers: 2000 concurrent random transfers while snapshots are taken; always 10000.
    let r = call(&c, "GET", &url("/accounts"), None, None).await;
    assert_eq!(r.body["total"], json!(10000), "{}", r.body);
    let stop = Arc::new(AtomicBool::new(false));
    let snapshots = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (c, u, stop, snapshots) =
            (c.clone(), url("/accounts"), stop.clone(), snapshots.clone());
        readers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = call(&c, "GET", &u, None, None).await;
                assert_eq!(r.status, StatusCode::OK);
                assert_eq!(
                    r.body["total"],
                    json!(10000),
                    "a snapshot broke the invariant: {}",
                    r.body
                );
                let sum: i64 = r.body["accounts"]
                    .as_object()
                    .expect("accounts")
                    .values()
                    .map(|v| v.as_i64().expect("balance"))
                    .sum();
                assert_eq!(sum, 10000);
                snapshots.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut tasks = Vec::new();
    for i in 0..2000u64 {
        let (c, u) = (c.clone(), url("/transfer"));
        tasks.push(tokio::spawn(async move {
            let from = i % 10;
            let to = (i * 7 + 3) % 10;
            let to = if to == from { (to + 1) % 10 } else { to };
            let amount = 1 + (i * 37) % 300;
            let body = format!(r#"{{"from":"acct-{from}","to":"acct-{to}","amount":{amount}}}"#);
            let r = call(&c, "POST", &u, None, Some(&body)).await;
            if r.status == StatusCode::CONFLICT {
                assert_eq!(r.body, json!({ "error": "insufficient funds" }));
            }
            r.status
        }));
    }
    let mut ok = 0;
    let mut statuses = std::collections::BTreeMap::new();
    for t in tasks {
        let status = t.await.expect("task");
        *statuses.entry(status.as_u16()).or_insert(0) += 1;
        if status == StatusCode::OK {
            ok += 1;
        }
    }
    println!("transfer statuses: {statuses:?}");
    assert!(
        statuses.keys().all(|s| *s == 200 || *s == 409),
        "transfers must answer 200 or 409: {statuses:?}"
    );
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.expect("reader");
    }
    let r = call(&c, "GET", &url("/accounts"), None, None).await;
    assert_eq!(r.body["total"], json!(10000));
    for (name, balance) in r.body["accounts"].as_object().expect("accounts") {
        assert!(
            balance.as_i64().expect("balance") >= 0,
            "{name} went below zero"
        );
    }
    println!(
        "transfers: {ok} applied, {} refused; snapshots taken meanwhile: {}",
        2000 - ok,
        snapshots.load(Ordering::Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_transfers_are_400_short_funds_409_hostile_bodies_4xx() {
    let _serial = SERIAL.lock().await;
    let (_redis, ex, c) = flagship(2);
    let url = |p: &str| format!("{}{p}", ex.base);
    // Bad transfers are 400, short funds 409.
    for bad in [
        r#"{"from":"acct-1","to":"acct-99","amount":5}"#,
        r#"{"from":"acct-1","to":"acct-1","amount":5}"#,
        r#"{"from":"acct-1","to":"acct-2","amount":0}"#,
        r#"{"from":"acct-1","to":"acct-2","amount":-3}"#,
        r#"{"from":"acct-1","to":"acct-2","amount":1.5}"#,
        r#"{"from":"acct-1","to":"acct-2","amount":"5"}"#,
        r#"{"from":"acct-1","to":"acct-2","amount":1000001}"#,
        r#"{"from":"acct-1","to":"acct-2""#,
        r#"[]"#,
        "",
    ] {
        let r = call(&c, "POST", &url("/transfer"), None, Some(bad)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.body);
        assert!(r.body["error"].is_string(), "{bad}: {}", r.body);
    }
    let r = call(
        &c,
        "POST",
        &url("/transfer"),
        None,
        Some(r#"{"from":"acct-1","to":"acct-2","amount":1000000}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = call(&c, "GET", &url("/accounts"), None, None).await;
    assert_eq!(r.body["total"], json!(10000));

    // Hostile bodies: deeply nested JSON, non-UTF-8 bytes, oversize: 4xx, nothing stored.
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let huge = format!(
        r#"{{"from":"acct-1","to":"acct-2","amount":1,"pad":"{}"}}"#,
        "x".repeat(3 << 20)
    );
    for (what, body) in [
        ("nested", nested.into_bytes()),
        (
            "non-UTF-8",
            b"{\"from\":\"acct-1\xff\",\"to\":\"acct-2\",\"amount\":1}".to_vec(),
        ),
        ("oversize", huge.into_bytes()),
    ] {
        for path in ["/transfer", "/login"] {
            let res = c
                .post(url(path))
                .body(body.clone())
                .send()
                .await
                .expect("send");
            let status = res.status();
            assert!(status.is_client_error(), "{what} to {path}: {status}");
            if what == "oversize" {
                assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{what} to {path}");
            }
            assert!(
                res.headers().get("set-cookie").is_none(),
                "{what} to {path} made a session"
            );
            let text = res.text().await.unwrap_or_default();
            let body: Value = serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("{what} to {path}: not JSON: {text:?}"));
            assert!(body["error"].is_string(), "{what} to {path}: {body}");
        }
    }
    let r = call(&c, "GET", &url("/accounts"), None, None).await;
    assert_eq!(r.body["total"], json!(10000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_cycles_the_cookie_and_logout_ends_the_session() {
    let _serial = SERIAL.lock().await;
    let (_redis, ex, c) = flagship(2);
    let url = |p: &str| format!("{}{p}", ex.base);
    // Login cycles the cookie and the old one becomes anonymous; logout ends the session.
    // The pre-login session holds data (a counter), so "anonymous" is a real change.
    let anon = call(&c, "GET", &url("/counter"), None, None)
        .await
        .cookie
        .expect("cookie");
    let r = call(&c, "GET", &url("/session"), Some(&anon), None).await;
    assert_eq!(r.body, json!({ "data": { "counter": 1 } }));
    let r = call(
        &c,
        "POST",
        &url("/login"),
        Some(&anon),
        Some(r#"{"user":"alice"}"#),
    )
    .await;
    assert_eq!(
        (r.status, r.body.clone()),
        (StatusCode::OK, json!({ "user": "alice" }))
    );
    let logged = r.cookie.expect("login sets a new cookie");
    assert_ne!(logged, anon);
    let r = call(&c, "GET", &url("/me"), Some(&logged), None).await;
    assert_eq!(r.body, json!({ "user": "alice" }));
    // A cycled-away id is refused for a while (409, the session ended: a tombstone), then
    // anonymous; either way it never reaches the logged-in session.
    let r = call(&c, "GET", &url("/me"), Some(&anon), None).await;
    assert!(
        matches!(r.status, StatusCode::UNAUTHORIZED | StatusCode::CONFLICT) && !r.has_set_cookie,
        "the pre-login cookie must be anonymous or refused: {} {}",
        r.status,
        r.body
    );
    let r = call(&c, "GET", &url("/session"), Some(&anon), None).await;
    assert!(
        (r.status == StatusCode::OK && r.body == json!({ "data": {} }))
            || r.status == StatusCode::CONFLICT,
        "the pre-login cookie must not reach the session's data anymore: {} {}",
        r.status,
        r.body
    );
    let r = call(&c, "GET", &url("/session"), Some(&logged), None).await;
    assert_eq!(r.body, json!({ "data": { "counter": 1, "user": "alice" } }));
    for bad in [
        r#"{"user":""}"#,
        r#"{"user":42}"#,
        r#"{"name":"x"}"#,
        "nope",
    ] {
        let r = call(&c, "POST", &url("/login"), None, Some(bad)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    let r = call(&c, "POST", &url("/logout"), Some(&logged), None).await;
    assert_eq!(
        (r.status, r.body.clone()),
        (StatusCode::OK, json!({ "ok": true }))
    );
    let set = r.set_cookie.expect("logout clears the cookie");
    assert!(
        set.starts_with("herd_session=") && clears_cookie(&set),
        "logout must delete the cookie: {set}"
    );
    let r = call(&c, "GET", &url("/me"), Some(&logged), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = call(&c, "GET", &url("/session"), Some(&logged), None).await;
    assert_eq!(
        (r.status, r.body),
        (StatusCode::OK, json!({ "data": {} })),
        "the logged-out cookie is anonymous"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_cookies_never_give_5xx() {
    let _serial = SERIAL.lock().await;
    let (_redis, ex, c) = flagship(2);
    let url = |p: &str| format!("{}{p}", ex.base);
    // Garbage cookies never give 5xx.
    let long = format!("herd_session={}", "A".repeat(4000));
    for garbage in [
        "herd_session=",
        "herd_session=%%%",
        "herd_session=abc; herd_session=def",
        long.as_str(),
        "=;=;=",
    ] {
        for path in ["/counter", "/session", "/me"] {
            let r = call(&c, "GET", &url(path), Some(garbage), None).await;
            assert!(
                !r.status.is_server_error(),
                "{path} with {garbage:.40}: {}",
                r.status
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_is_bounded_and_every_error_body_is_json() {
    let _serial = SERIAL.lock().await;
    let (_redis, ex, c) = flagship(2);
    let url = |p: &str| format!("{}{p}", ex.base);
    // /slow sleeps, bounded: 0..=30000 ms, anything else is refused at once.
    let r = call(&c, "GET", &url("/slow?ms=50"), None, None).await;
    assert_eq!(r.body, json!({ "slept": 50 }));
    let r = call(&c, "GET", &url("/slow?ms=0"), None, None).await;
    assert_eq!(r.body, json!({ "slept": 0 }));
    for bad in ["30001", "18446744073709551616", "-1", "1.5", "soon", ""] {
        let t = Instant::now();
        let r = call(&c, "GET", &url(&format!("/slow?ms={bad}")), None, None).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "ms={bad}: {}", r.body);
        assert!(r.body["error"].is_string(), "ms={bad}: {}", r.body);
        assert!(t.elapsed() < Duration::from_secs(5), "ms={bad} slept");
    }

    // All bodies JSON, the errors axum makes itself too: wrong method (405, with `Allow`), a
    // query string that does not parse, an unknown route.
    for (method, path, status) in [
        ("GET", "/transfer", StatusCode::METHOD_NOT_ALLOWED),
        ("GET", "/login", StatusCode::METHOD_NOT_ALLOWED),
        ("DELETE", "/counter", StatusCode::METHOD_NOT_ALLOWED),
        ("PUT", "/accounts", StatusCode::METHOD_NOT_ALLOWED),
        ("GET", "/slow?ms=1&ms=2", StatusCode::BAD_REQUEST),
        ("GET", "/nowhere", StatusCode::NOT_FOUND),
    ] {
        let res = c
            .request(method.parse().unwrap(), url(path))
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), status, "{method} {path}");
        if status == StatusCode::METHOD_NOT_ALLOWED {
            assert!(
                res.headers().get("allow").is_some(),
                "{method} {path}: Allow"
            );
        }
        let content_type = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        assert!(
            content_type.starts_with("application/json"),
            "{method} {path}: {content_type}"
        );
        let text = res.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{method} {path}: not JSON: {text:?}"));
        assert!(body["error"].is_string(), "{method} {path}: {body}");
    }
}

/// `HERD_SECRET=""` (what compose's `${HERD_SECRET:-}` gives) counts as unset: the master makes
/// one key for all its workers, so one cookie verifies in every worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_herd_secret_still_gives_every_worker_the_same_key() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let ex = Example::start_env(&redis.url(), 4, &[("HERD_SECRET", "")]);
    let c = client();
    let url = format!("{}/counter", ex.base);
    let first = call(&c, "GET", &url, None, None).await;
    let cookie = first.cookie.expect("a new session sets a cookie");
    let mut workers = HashSet::new();
    workers.insert(first.body["worker"].as_u64().expect("worker"));
    let mut counts = HashSet::from([1]);
    for _ in 0..40 {
        let batch: Vec<_> = (0..25)
            .map(|_| {
                let (c, u, cookie) = (c.clone(), url.clone(), cookie.clone());
                tokio::spawn(async move { call(&c, "GET", &u, Some(&cookie), None).await })
            })
            .collect();
        for t in batch {
            let r = t.await.expect("task");
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            let w = r.body["worker"].as_u64().expect("worker");
            assert!(
                !r.has_set_cookie,
                "worker {w} did not recognise the cookie (a key of its own?): {}",
                r.body
            );
            assert!(counts.insert(r.body["counter"].as_i64().expect("counter")));
            workers.insert(w);
        }
        if workers.len() == 4 {
            break;
        }
    }
    assert_eq!(
        workers.len(),
        4,
        "every worker served the cookie: {workers:?}"
    );
    let r = call(
        &c,
        "GET",
        &format!("{}/session", ex.base),
        Some(&cookie),
        None,
    )
    .await;
    assert_eq!(r.body, json!({ "data": { "counter": counts.len() } }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_503_within_2s_and_other_routes_answer() {
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start();
    let ex = Example::start(&redis.url(), 2);
    let c = client();
    let url = |p: &str| format!("{}{p}", ex.base);
    let cookie = call(&c, "GET", &url("/counter"), None, None)
        .await
        .cookie
        .expect("cookie");
    let workers_before = pids(&ex.base, 2).await;
    tokio::task::block_in_place(|| redis.kill());
    assert_redis_routes_fail_fast(&c, &ex.base, &cookie, "stopped").await;
    tokio::task::block_in_place(|| redis.restart());
    let t = Instant::now();
    // Back on its own, in every worker (each one reconnects by itself).
    let mut back = HashSet::new();
    while back.len() < 2 {
        let r = call(&c, "GET", &url("/counter"), None, None).await;
        if r.status == StatusCode::OK {
            back.insert(r.body["worker"].as_u64().expect("worker"));
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no recovery in every worker within 10 s: {back:?} answered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("recovered {:?} after the restart", t.elapsed());
    assert_eq!(
        pids(&ex.base, 2).await,
        workers_before,
        "a worker exited during the outage"
    );
    // Redis came back empty (no persistence): the accounts are seeded again, on every worker.
    for _ in 0..8 {
        let r = call(&c, "GET", &url("/accounts"), None, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.body["total"], json!(10000), "{}", r.body);
    }
    let r = call(
        &c,
        "POST",
        &url("/transfer"),
        None,
        Some(r#"{"from":"acct-3","to":"acct-4","amount":10}"#),
    )
    .await;
    assert_eq!(
        (r.status, r.body),
        (StatusCode::OK, json!({ "ok": true })),
        "a transfer after Redis lost its data"
    );
    let r = call(&c, "GET", &url("/accounts"), None, None).await;
    assert_eq!(r.body["total"], json!(10000), "{}", r.body);
    assert_eq!(r.body["accounts"]["acct-4"], json!(1010), "{}", r.body);
}

/// Every route that needs Redis answers 503 + `Retry-After` + a JSON error within 2 s, one at a
/// time and as a burst of transfers (more than the pool has connections); the others answer 200.
async fn assert_redis_routes_fail_fast(c: &reqwest::Client, base: &str, cookie: &str, how: &str) {
    let transfer = r#"{"from":"acct-1","to":"acct-2","amount":1}"#;
    let login = r#"{"user":"bob"}"#;
    let mut worst = Duration::ZERO;
    for (method, path, body) in [
        ("GET", "/counter", None),
        ("GET", "/hits", None),
        ("GET", "/accounts", None),
        ("GET", "/me", None),
        ("GET", "/session", None),
        ("POST", "/transfer", Some(transfer)),
        ("POST", "/login", Some(login)),
    ] {
        // Login without the cookie: a frozen Redis runs the queued commands once thawed, and a
        // login's cycle would then end the visitor's session (a 503 means "outcome unknown").
        let cookie = (path != "/login").then_some(cookie);
        let t = Instant::now();
        let r = call(c, method, &format!("{base}{path}"), cookie, body).await;
        let took = t.elapsed();
        worst = worst.max(took);
        assert_eq!(
            r.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "Redis {how}: {method} {path}: {}",
            r.body
        );
        assert!(r.body["error"].is_string(), "{path}: {}", r.body);
        assert!(
            r.content_type
                .as_deref()
                .is_some_and(|t| t.starts_with("application/json")),
            "{path}: {:?}",
            r.content_type
        );
        assert_eq!(r.retry_after.as_deref(), Some("1"), "{path}: Retry-After");
        assert!(
            took < Duration::from_secs(2),
            "Redis {how}: {path} took {took:?}"
        );
    }
    // A burst: 24 transfers at once (the pool has 4 connections per worker).
    let t = Instant::now();
    let burst: Vec<_> = (0..24)
        .map(|_| {
            let (c, u) = (c.clone(), format!("{base}/transfer"));
            tokio::spawn(async move {
                let t = Instant::now();
                let r = call(&c, "POST", &u, None, Some(transfer)).await;
                (r.status, r.retry_after, t.elapsed())
            })
        })
        .collect();
    for b in burst {
        let (status, retry_after, took) = b.await.expect("task");
        worst = worst.max(took);
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "Redis {how}: burst"
        );
        assert_eq!(retry_after.as_deref(), Some("1"));
        assert!(
            took < Duration::from_secs(2),
            "Redis {how}: a transfer of the burst took {took:?}"
        );
    }
    println!(
        "Redis {how}: slowest 503 {worst:?}; burst of 24 transfers done in {:?}",
        t.elapsed()
    );
    for path in ["/healthz", "/whoami", "/slow?ms=1"] {
        let r = call(c, "GET", &format!("{base}{path}"), None, None).await;
        assert_eq!(r.status, StatusCode::OK, "Redis {how}: {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_redis_is_503_within_2s_and_service_returns_after_a_thaw() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let ex = Example::start(&redis.url(), 2);
    let c = client();
    let url = |p: &str| format!("{}{p}", ex.base);
    let cookie = call(&c, "GET", &url("/counter"), None, None)
        .await
        .cookie
        .expect("cookie");
    // Every worker has used its pool before the freeze (idle connections to a frozen server).
    for _ in 0..8 {
        let r = call(
            &c,
            "POST",
            &url("/transfer"),
            None,
            Some(r#"{"from":"acct-5","to":"acct-6","amount":1}"#),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    redis.freeze();
    assert_redis_routes_fail_fast(&c, &ex.base, &cookie, "frozen").await;
    redis.thaw();
    let t = Instant::now();
    loop {
        let r = call(
            &c,
            "POST",
            &url("/transfer"),
            None,
            Some(r#"{"from":"acct-6","to":"acct-5","amount":1}"#),
        )
        .await;
        if r.status == StatusCode::OK {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no recovery: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("transfers work again {:?} after the thaw", t.elapsed());
    // The session survived the freeze. Its counter is 1, or 2 if the INCR sent during the freeze
    // (answered 503: outcome unknown) ran when Redis woke up: never lost, never doubled.
    let r = call(&c, "GET", &url("/session"), Some(&cookie), None).await;
    let counter = r.body["data"]["counter"].as_i64();
    assert!(matches!(counter, Some(1 | 2)), "{}", r.body);
    let r = call(&c, "GET", &url("/accounts"), None, None).await;
    assert_eq!(r.body["total"], json!(10000), "{}", r.body);
}

/// Requests in a loop over fresh connections until `stop`; returns (ok, failed).
fn spawn_load(
    base: &str,
    stop: &Arc<AtomicBool>,
    tasks: usize,
) -> Vec<tokio::task::JoinHandle<(u64, Vec<String>)>> {
    (0..tasks)
        .map(|i| {
            let (base, stop) = (base.to_owned(), stop.clone());
            tokio::spawn(async move {
                let c = client();
                let (mut ok, mut failed) = (0, Vec::new());
                let path = if i % 2 == 0 { "/hits" } else { "/whoami" };
                while !stop.load(Ordering::Relaxed) {
                    match c.get(format!("{base}{path}")).send().await {
                        Ok(r) if r.status() == StatusCode::OK => ok += 1,
                        Ok(r) => failed.push(format!("status {}", r.status())),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (ok, failed)
            })
        })
        .collect()
}

async fn pids(base: &str, n: usize) -> HashSet<u64> {
    let c = client();
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < n && Instant::now() < deadline {
        let r = call(&c, "GET", &format!("{base}/whoami"), None, None).await;
        seen.insert(r.body["pid"].as_u64().expect("pid"));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_under_load_without_failures_and_sigterm_drains() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let mut ex = Example::start(&redis.url(), 4);
    let before = pids(&ex.base, 4).await;
    assert_eq!(before.len(), 4);

    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(&ex.base, &stop, 8);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    ex.signal("-HUP");
    // Wait until 4 new pids serve and none of the old ones.
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let now = pids(&ex.base, 4).await;
        if now.len() == 4 && now.is_disjoint(&before) {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "reload not complete after 10 s: {now:?} vs {before:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "rolling reload of 4 workers served by new pids after {:?}",
        t.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for l in load {
        let (o, f) = l.await.expect("load");
        ok += o;
        failed.extend(f);
    }
    println!("requests during reload: {ok} ok, {} failed", failed.len());
    assert!(ok > 50, "too little load: {ok}");
    assert!(
        failed.is_empty(),
        "requests failed during the reload: {failed:?}"
    );
    assert!(after.is_disjoint(&before));

    // SIGTERM with slow requests in flight: they all finish, exit 0, nothing left.
    let c = client();
    let slow: Vec<_> = (0..6)
        .map(|_| {
            let (c, u) = (c.clone(), format!("{}/slow?ms=1500", ex.base));
            tokio::spawn(async move { call(&c, "GET", &u, None, None).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    ex.signal("-TERM");
    for s in slow {
        let r = s.await.expect("slow request");
        assert_eq!(
            (r.status, r.body),
            (StatusCode::OK, json!({ "slept": 1500 }))
        );
    }
    let code = tokio::task::block_in_place(|| ex.wait(Duration::from_secs(20)));
    assert_eq!(code, Some(0), "the master must exit 0 after a clean drain");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left = processes_with_arg(&ex.port.to_string());
    assert!(left.is_empty(), "processes left after stop: {left:?}");
}

/// Runs `script` with `sh` in a fresh network namespace (`unshare -rn`: only a loopback, so nothing
/// answers on 127.0.0.1:6379 there), with `$BIN` set to the example. Returns (status, output).
fn in_empty_network(script: &str) -> (bool, String) {
    let out = Command::new("unshare")
        .args(["-rn", "sh", "-c", &format!("ip link set lo up\n{script}")])
        .env("BIN", example_binary())
        .env_remove("REDIS_URL")
        .env("RUST_LOG", "warn")
        .output()
        .expect("unshare(1) from util-linux is needed for this test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn without_redis_url_and_nothing_on_6379_a_private_redis_runs_for_the_session() {
    let _serial = SERIAL.blocking_lock();
    let (ok, out) = in_empty_network(
        r#"
        "$BIN" --workers 2 --port 3000 &
        pid=$!
        for i in $(seq 1 200); do
            curl -sf localhost:3000/healthz >/dev/null 2>&1 && break
            sleep 0.05
        done
        curl -s -c /tmp/herd-private-jar.$$ -b /tmp/herd-private-jar.$$ localhost:3000/counter; echo
        curl -s -c /tmp/herd-private-jar.$$ -b /tmp/herd-private-jar.$$ localhost:3000/counter; echo
        curl -s localhost:3000/accounts; echo
        rm -f /tmp/herd-private-jar.$$
        kill -TERM $pid
        wait $pid
        echo "exit=$?"
        "#,
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("a private redis-server runs on redis://127.0.0.1:"),
        "the example must say it started a private Redis: {out}"
    );
    assert!(out.contains(r#""counter":2"#), "{out}");
    assert!(out.contains(r#""total":10000"#), "{out}");
    assert!(out.contains("exit=0"), "{out}");
    let port = out
        .split("redis://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("port in the message")
        .to_owned();
    std::thread::sleep(Duration::from_millis(300));
    let left: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (cmd.contains("redis-server") && cmd.contains(&format!("--port {port} ")))
                .then(|| e.file_name().to_string_lossy().parse().ok())
                .flatten()
        })
        .collect();
    assert!(
        left.is_empty(),
        "the private redis-server outlived the example: {left:?}"
    );
}

/// The private redis-server lives in a process group of its own and dies with the master: Ctrl-C
/// (SIGINT to the terminal's whole foreground group) leaves it serving while the workers drain,
/// and a master killed with SIGKILL takes it along (`PR_SET_PDEATHSIG`).
#[test]
fn the_private_redis_outlives_ctrl_c_until_the_drain_ends_and_dies_with_a_killed_master() {
    let _serial = SERIAL.blocking_lock();
    let (ok, out) = in_empty_network(
        r#"
        alive() { s=$(awk '{print $3}' /proc/$1/stat 2>/dev/null); [ -n "$s" ] && [ "$s" != Z ]; }
        healthy() {
            for i in $(seq 1 300); do
                curl -sf localhost:$1/healthz >/dev/null 2>&1 && return 0
                sleep 0.05
            done
            return 1
        }
        # Ctrl-C: the example leads a session and process group of its own, as a job in a terminal
        # does. (Started with `setsid -f`, not `&`: a non-interactive shell's background jobs
        # ignore SIGINT, and so would everything they start.)
        pidfile=/tmp/herd-ctrlc-pid.$$
        setsid -f sh -c 'echo $$ > "$0"; exec "$BIN" --workers 2 --port 3100' "$pidfile"
        healthy 3100 || echo "not-healthy"
        pid=$(cat "$pidfile")
        r1=$(pgrep -P $pid -x redis-server)
        echo "redis1=$r1"
        curl -s "localhost:3100/slow?ms=1500" > /tmp/herd-ctrlc-slow.$$ &
        slow=$!
        sleep 0.4
        kill -INT -$pid
        sleep 0.4
        alive $r1 && echo "during-drain=alive" || echo "during-drain=gone"
        wait $slow
        echo "slow=$(cat /tmp/herd-ctrlc-slow.$$)"
        for i in $(seq 1 300); do alive $pid || break; sleep 0.05; done
        alive $pid && { echo "master-left"; kill -KILL $pid; }
        sleep 0.5
        alive $r1 && { echo "after-stop=alive"; kill -KILL $r1; } || echo "after-stop=gone"
        rm -f "$pidfile" /tmp/herd-ctrlc-slow.$$

        # SIGKILL of the master.
        "$BIN" --workers 2 --port 3101 &
        pid=$!
        healthy 3101 || echo "not-healthy"
        r2=$(pgrep -P $pid -x redis-server)
        echo "redis2=$r2"
        kill -KILL $pid
        for i in $(seq 1 40); do alive $r2 || break; sleep 0.05; done
        alive $r2 && { echo "after-kill=alive"; kill -KILL $r2; } || echo "after-kill=gone"
        "#,
    );
    assert!(ok, "{out}");
    assert!(!out.contains("not-healthy"), "{out}");
    for pid in ["redis1=", "redis2="] {
        let value = out
            .split(pid)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or("");
        assert!(
            value.parse::<u32>().is_ok(),
            "no redis-server child found: {out}"
        );
    }
    assert!(
        out.contains("during-drain=alive"),
        "Ctrl-C reached the private Redis while the workers drained: {out}"
    );
    assert!(out.contains(r#"slow={"slept":1500}"#), "{out}");
    assert!(
        !out.contains("master-left"),
        "Ctrl-C did not stop the master: {out}"
    );
    assert!(out.contains("after-stop=gone"), "{out}");
    assert!(
        out.contains("after-kill=gone"),
        "the private Redis outlived a SIGKILLed master: {out}"
    );
}

#[test]
fn without_any_redis_it_says_how_to_get_one() {
    let _serial = SERIAL.blocking_lock();
    let (ok, out) = in_empty_network(r#"PATH=/nonexistent exec "$BIN" --workers 1 --port 3000"#);
    assert!(!ok, "must fail without Redis: {out}");
    assert!(out.contains("redis-server is not installed"), "{out}");
    assert!(out.contains("REDIS_URL"), "{out}");
}

/// The siege: `HERD_LOAD_SECS` (default 10) of 500 concurrent keep-alive connections, each with its
/// own session, on session and global routes of 4 workers: zero errors and exact counters. The long
/// version: `HERD_LOAD_SECS=60 cargo test --release --all-features --test multi_worker siege -- --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn siege_500_connections_zero_errors_exact_counters() {
    let _serial = SERIAL.lock().await;
    let secs: u64 = std::env::var("HERD_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let redis = RedisServer::start();
    let ex = Example::start(&redis.url(), 4);
    let base_hits = call(&client(), "GET", &format!("{}/hits", ex.base), None, None)
        .await
        .body["hits"]
        .as_i64()
        .expect("hits");
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..500 {
        let base = ex.base.clone();
        tasks.push(tokio::spawn(async move {
            // One keep-alive connection per task, like a browser tab.
            let c = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client");
            let (mut counter, mut hits, mut errors) = (0i64, 0i64, Vec::new());
            let mut cookie: Option<String> = None;
            let mut n = i;
            while start.elapsed() < Duration::from_secs(secs) {
                n += 1;
                let path = if n % 2 == 0 { "/counter" } else { "/hits" };
                let mut req = c.get(format!("{base}{path}"));
                if let Some(ck) = &cookie {
                    req = req.header("cookie", ck);
                }
                match req.send().await {
                    Ok(res) if res.status() == StatusCode::OK => {
                        if path == "/counter" {
                            if let Some(set) = res.headers().get("set-cookie") {
                                let set = set.to_str().unwrap_or_default();
                                cookie = set.split(';').next().map(str::to_owned);
                            }
                            counter += 1;
                        } else {
                            hits += 1;
                        }
                        let _ = res.bytes().await;
                    }
                    Ok(res) => errors.push(format!("{path}: {}", res.status())),
                    Err(e) => errors.push(format!("{path}: {e}")),
                }
            }
            // The session's counter is exactly this visitor's successful increments.
            match &cookie {
                Some(ck) => {
                    let r = call(&c, "GET", &format!("{base}/session"), Some(ck), None).await;
                    let stored = r.body["data"]["counter"].as_i64().unwrap_or(-1);
                    if stored != counter {
                        errors.push(format!("session counter {stored}, expected {counter}"));
                    }
                }
                None => errors.push(format!(
                    "task {i} never got a session cookie ({counter} counter requests answered)"
                )),
            }
            (hits, counter, errors)
        }));
    }
    let (mut hits, mut counters, mut errors) = (0, 0, Vec::new());
    for t in tasks {
        let (h, c, e) = t.await.expect("task");
        hits += h;
        counters += c;
        errors.extend(e);
    }
    let elapsed = start.elapsed();
    let total_hits = call(&client(), "GET", &format!("{}/hits", ex.base), None, None)
        .await
        .body["hits"]
        .as_i64()
        .expect("hits");
    println!(
        "siege: {} requests in {elapsed:?} ({:.0}/s) over 500 connections, {} errors",
        hits + counters,
        (hits + counters) as f64 / elapsed.as_secs_f64(),
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert_eq!(
        total_hits,
        base_hits + hits + 1,
        "the global counter lost or doubled hits"
    );
}

fn rss_kib(pid: u64) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// Sends `total` requests from 64 keep-alive clients: session increments (each client starts a new
/// session every 500 requests), global hits, session reads.
async fn drive(base: &str, total: u64) {
    let per = total / 64;
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let base = base.to_owned();
            tokio::spawn(async move {
                let c = reqwest::Client::new();
                let mut cookie: Option<String> = None;
                for n in 0..per {
                    if n % 500 == 0 {
                        cookie = None;
                    }
                    let path = ["/counter", "/hits", "/session", "/counter"][(n % 4) as usize];
                    let mut req = c.get(format!("{base}{path}"));
                    if let Some(ck) = &cookie {
                        req = req.header("cookie", ck);
                    }
                    let res = req.send().await.expect("request");
                    assert_eq!(res.status(), StatusCode::OK);
                    if let Some(set) = res.headers().get("set-cookie") {
                        cookie = set
                            .to_str()
                            .ok()
                            .and_then(|s| s.split(';').next())
                            .map(str::to_owned);
                    }
                    let _ = res.bytes().await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("driver");
    }
}

/// A worker's resident memory after 1 000 000 requests is within 10% of what it was after 100 000:
/// nothing grows per session or per request. Long (a few minutes in release):
/// `cargo test --release --all-features --test multi_worker memory -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: a million requests; run with --release --ignored"]
async fn memory_stays_flat_over_a_million_requests() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let ex = Example::start(&redis.url(), 1);
    let pid = call(&client(), "GET", &format!("{}/whoami", ex.base), None, None)
        .await
        .body["pid"]
        .as_u64()
        .expect("pid");
    let t = Instant::now();
    drive(&ex.base, 100_000).await;
    let after_100k = rss_kib(pid);
    drive(&ex.base, 900_000).await;
    let after_1m = rss_kib(pid);
    println!(
        "worker RSS: {after_100k} KiB after 100k requests, {after_1m} KiB after 1M ({:+.1}%), {:?}",
        (after_1m as f64 / after_100k as f64 - 1.0) * 100.0,
        t.elapsed()
    );
    assert!(
        after_1m * 10 <= after_100k * 11,
        "RSS grew from {after_100k} KiB to {after_1m} KiB"
    );
}

/// The same example on a 3-primary Redis Cluster, with only `REDIS_URL` changed
/// (`redis+cluster://host:port,...`; built with the `cluster` feature).
#[cfg(feature = "cluster")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_on_a_redis_cluster_with_only_redis_url_changed() {
    let _serial = SERIAL.lock().await;
    let cluster = support::cluster::RedisCluster::start();
    let ex = Example::start(&cluster.url(), 2);
    let c = client();
    let url = |p: &str| format!("{}{p}", ex.base);
    let first = call(&c, "GET", &url("/counter"), None, None).await;
    let cookie = first.cookie.expect("cookie");
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (c, u, cookie) = (c.clone(), url("/counter"), cookie.clone());
        tasks.push(tokio::spawn(async move {
            call(&c, "GET", &u, Some(&cookie), None).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), StatusCode::OK);
    }
    let r = call(&c, "GET", &url("/session"), Some(&cookie), None).await;
    assert_eq!(r.body, json!({ "data": { "counter": 101 } }));
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let (c, u) = (c.clone(), url("/transfer"));
        tasks.push(tokio::spawn(async move {
            let body = format!(
                r#"{{"from":"acct-{}","to":"acct-{}","amount":{}}}"#,
                i % 10,
                (i + 3) % 10,
                1 + i % 50
            );
            call(&c, "POST", &u, None, Some(&body)).await.status
        }));
    }
    let mut moved = 0;
    for t in tasks {
        let status = t.await.expect("task");
        assert!(
            status == StatusCode::OK || status == StatusCode::CONFLICT,
            "{status}"
        );
        moved += usize::from(status == StatusCode::OK);
    }
    assert!(moved > 0, "no transfer went through on the cluster");
    let r = call(&c, "GET", &url("/accounts"), None, None).await;
    assert_eq!(r.body["total"], json!(10000));
    assert_eq!(r.body["accounts"].as_object().map(|a| a.len()), Some(10));
    let r = call(
        &c,
        "POST",
        &url("/login"),
        Some(&cookie),
        Some(r#"{"user":"zoe"}"#),
    )
    .await;
    let logged = r
        .cookie
        .expect("login cycles the id (across slots on a cluster)");
    let r = call(&c, "GET", &url("/session"), Some(&logged), None).await;
    assert_eq!(r.body, json!({ "data": { "counter": 101, "user": "zoe" } }));
    let r = call(&c, "GET", &url("/me"), Some(&cookie), None).await;
    assert!(
        matches!(r.status, StatusCode::UNAUTHORIZED | StatusCode::CONFLICT),
        "the pre-login cookie must be dead (anonymous, or refused as a cycled-away id): {}",
        r.status
    );
    let hits = |r: Reply| (r.status, r.body["hits"].as_i64());
    let (status, first) = hits(call(&c, "GET", &url("/hits"), None, None).await);
    assert_eq!(status, StatusCode::OK);
    let first = first.expect("hits is a number");
    let second = hits(call(&c, "GET", &url("/hits"), None, None).await);
    assert_eq!(
        second,
        (StatusCode::OK, Some(first + 1)),
        "the global counter on a cluster"
    );
}
