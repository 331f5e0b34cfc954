//! Observability end to end: `herd run --metrics/--dashboard` over real workers (the flagship
//! example against a harness Redis, and `launcher_hello`), the dashboard in headless Chromium,
//! and no secret in any log line or metric.
//!
//! The browser part needs `/usr/bin/chromium` (Debian package `chromium`): without it, it is
//! skipped with a note, unless `HERD_TEST_STRICT=1` (set by CI) makes that a failure.
#![cfg(all(unix, feature = "cli", feature = "metrics"))]

mod launcher_support;
mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use herd::launcher::{request, Request, Status};
use support::RedisServer;

/// The flagship example, built for this test run (same profile and features), so that running this
/// file alone never uses a stale binary.
fn flagship_bin() -> PathBuf {
    launcher_support::example_bin("multi_worker")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// `herd run ... -- PROGRAM`, output captured in a file, killed with its workers on drop.
struct Herd {
    child: Option<Child>,
    port: u16,
    socket: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Herd {
    fn start(herd_args: &[&str], program: &[&str], env: &[(&str, &str)]) -> Herd {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let socket = dir.path().join("herd.sock");
        let log = dir.path().join("output.log");
        let out = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(launcher_support::herd_bin());
        cmd.arg("run")
            .args(["--bind", &format!("127.0.0.1:{port}")])
            .arg("--socket")
            .arg(&socket)
            .args(herd_args)
            .arg("--")
            .args(program)
            .env_remove("HERD_SECRET")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start herd run");
        let herd = Herd {
            child: Some(child),
            port,
            socket,
            log,
            _dir: dir,
        };
        herd.wait_online(None);
        herd
    }

    fn status(&self) -> Option<Status> {
        request(&self.socket, &Request::Status, Duration::from_secs(5))
            .ok()?
            .status
    }

    /// Waits until every slot is online (and, if given, none of them has pid `not`).
    fn wait_online(&self, not: Option<u32>) -> Vec<u32> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.status() {
                let online: Vec<u32> = s
                    .workers
                    .iter()
                    .filter(|w| w.state == "online")
                    .filter_map(|w| w.pid)
                    .collect();
                if !online.is_empty()
                    && online.len() == s.workers.len()
                    && not.is_none_or(|p| !online.contains(&p))
                {
                    return online;
                }
            }
            assert!(
                Instant::now() < deadline,
                "workers not online; output:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Graceful stop; waits for the exit so that the log is complete.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Herd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            for w in self.status().map(|s| s.workers).unwrap_or_default() {
                if let Some(pid) = w.pid {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A plain HTTP/1.1 exchange over a fresh connection: (status, headers, body).
fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).expect("write");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read");
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").expect("response head");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    // Chunked bodies of small JSON answers: good enough to search them.
    (status, headers, body.to_owned())
}

fn get(port: u16, path: &str) -> String {
    let (status, _, body) = http(port, "GET", path, &[], "");
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// Sum over workers of an unlabelled-per-worker series `name{worker="N"} v`.
fn sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{worker=")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn workers_reporting(metrics: &str) -> usize {
    metrics
        .lines()
        .filter(|l| l.starts_with("herd_requests_total{worker="))
        .count()
}

fn wait_metrics(port: u16, what: &str, mut ok: impl FnMut(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let m = get(port, "/metrics");
        if ok(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn session_cookie(headers: &[(String, String)]) -> Option<String> {
    headers
        .iter()
        .filter(|(k, _)| k == "set-cookie")
        .find_map(|(_, v)| {
            let pair = v.split(';').next()?;
            let (name, value) = pair.split_once('=')?;
            (name.trim() == "herd_session" && !value.is_empty()).then(|| value.to_owned())
        })
}

fn flagship(redis: &RedisServer, herd_args: &[&str], env: &[(&str, &str)]) -> Herd {
    let url = redis.url();
    let prefix = support::unique_prefix("observe");
    let mut all = vec![
        ("REDIS_URL", url.as_str()),
        ("HERD_PREFIX", prefix.as_str()),
    ];
    all.extend_from_slice(env);
    let bin = flagship_bin();
    Herd::start(herd_args, &[bin.to_str().expect("utf-8 path")], &all)
}

#[test]
fn metrics_move_by_exactly_the_load_across_workers() {
    let _serial = launcher_support::serial();
    let redis = RedisServer::start();
    let mport = free_port();
    let maddr = format!("127.0.0.1:{mport}");
    let herd = flagship(
        &redis,
        &["--workers", "2", "--metrics", &maddr],
        &[("RUST_LOG", "warn")],
    );
    let before = wait_metrics(mport, "both workers reporting", |m| {
        workers_reporting(m) == 2
    });
    // Settle: a report may still carry the readiness probes.
    std::thread::sleep(Duration::from_millis(2500));
    let before = {
        let _ = before;
        get(mport, "/metrics")
    };
    let requests0 = sum(&before, "herd_requests_total");
    let saves0 = sum(&before, "herd_session_saves_total");
    let creates0 = sum(&before, "herd_session_creates_total");
    let redis0 = sum(&before, "herd_redis_command_seconds_count");

    const N: usize = 100;
    let (_, headers, _) = http(herd.port, "GET", "/counter", &[], "");
    let cookie = session_cookie(&headers).expect("a session cookie");
    let cookie_header = format!("herd_session={cookie}");
    for _ in 1..N {
        let (status, _, _) = http(
            herd.port,
            "GET",
            "/counter",
            &[("Cookie", &cookie_header)],
            "",
        );
        assert_eq!(status, 200);
    }
    for _ in 0..N {
        get(herd.port, "/whoami");
    }
    let after = wait_metrics(mport, "the requests to be counted", |m| {
        sum(m, "herd_requests_total") >= requests0 + (2 * N) as f64
    });
    // Once more after another report: no request counted twice.
    std::thread::sleep(Duration::from_millis(2500));
    let after = {
        let _ = after;
        get(mport, "/metrics")
    };
    assert_eq!(
        sum(&after, "herd_requests_total") - requests0,
        (2 * N) as f64,
        "{after}"
    );
    assert_eq!(sum(&after, "herd_session_creates_total") - creates0, 1.0);
    assert_eq!(
        sum(&after, "herd_session_saves_total") - saves0,
        N as f64,
        "{after}"
    );
    assert!(sum(&after, "herd_redis_command_seconds_count") - redis0 >= N as f64);
    // Every worker served some of them (fresh connections spread over the shared socket), and
    // the master's own series are there.
    for line in after
        .lines()
        .filter(|l| l.starts_with("herd_requests_total{"))
    {
        assert!(line.contains("worker=\""), "{line}");
    }
    assert!(after.contains("herd_workers 2"), "{after}");
    assert_eq!(
        after
            .lines()
            .filter(|l| l.starts_with("herd_worker_resident_memory_bytes{"))
            .count(),
        2
    );
    // One TYPE line per family, even with two workers.
    let types: Vec<&str> = after.lines().filter(|l| l.starts_with("# TYPE ")).collect();
    let unique: std::collections::HashSet<&&str> = types.iter().collect();
    assert_eq!(types.len(), unique.len(), "{after}");
}

fn chromium() -> Option<PathBuf> {
    let bin = "/usr/bin/chromium";
    launcher_support::optional_tool(
        bin,
        &["--version"],
        "Debian: `apt-get install chromium`",
        "the dashboard test in a headless browser",
    )
    .then(|| PathBuf::from(bin))
}

/// The DOM of `url` after its scripts ran for a few (virtual) seconds.
fn dump_dom(chromium: &Path, url: &str) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("run chromium");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn dashboard_shows_every_worker_in_chromium_and_follows_a_restart() {
    // Without a browser, the same checks run on the page's data (`/api/status`) only.
    let chromium = chromium();
    let _serial = launcher_support::serial();
    let dport = free_port();
    let hello = launcher_support::hello_bin();
    let herd = Herd::start(
        &[
            "--workers",
            "3",
            "--dashboard",
            &format!("127.0.0.1:{dport}"),
        ],
        &[hello.to_str().expect("utf-8 path")],
        &[],
    );
    let pids = herd.wait_online(None);
    assert_eq!(pids.len(), 3);
    let url = format!("http://127.0.0.1:{dport}/");
    // The master samples once a second: wait for a sample with every worker.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pids
        .iter()
        .all(|p| get(dport, "/api/status").contains(&format!("\"pid\":{p},")))
    {
        assert!(Instant::now() < deadline, "no sample with every worker");
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(chromium) = &chromium {
        let dom = dump_dom(chromium, &url);
        for pid in &pids {
            assert!(
                dom.contains(&format!("data-pid=\"{pid}\"")),
                "pid {pid} not on the page:\n{dom}"
            );
        }
        assert!(dom.contains("online"), "{dom}");
    }
    // Read-only by default: no controls, and the control endpoints refuse.
    let (status, _, _) = http(dport, "POST", "/api/reload", &[], "");
    assert_eq!(status, 403);

    let victim = pids[1];
    let _ = Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status();
    let now = herd.wait_online(Some(victim));
    let new: Vec<u32> = now.iter().copied().filter(|p| !pids.contains(p)).collect();
    assert_eq!(new.len(), 1, "{now:?} vs {pids:?}");
    // The page follows (it polls every second); allow for the one-second sampling.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let data = get(dport, "/api/status");
        let page = match &chromium {
            Some(chromium) => dump_dom(chromium, &url),
            None => data.clone(),
        };
        let (new_shown, victim_shown) = match &chromium {
            Some(_) => (
                page.contains(&format!("data-pid=\"{}\"", new[0])),
                page.contains(&format!("data-pid=\"{victim}\"")),
            ),
            None => {
                // The workers the page lists now (the history holds earlier samples too).
                let v: serde_json::Value = serde_json::from_str(&data).expect("status JSON");
                let listed = |pid: u32| {
                    v["status"]["workers"]
                        .as_array()
                        .is_some_and(|ws| ws.iter().any(|w| w["pid"] == pid))
                };
                (listed(new[0]), listed(victim))
            }
        };
        if new_shown && !victim_shown {
            if chromium.is_some() {
                assert!(page.contains("<td>1</td>"), "one restart shown:\n{page}");
            } else {
                assert!(page.contains("\"restarts\":1"), "one restart:\n{page}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "page did not follow:\n{page}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn dashboard_controls_need_the_token_and_remote_binds_are_refused() {
    let _serial = launcher_support::serial();
    let dport = free_port();
    let hello = launcher_support::hello_bin();
    let herd = Herd::start(
        &[
            "--workers",
            "1",
            "--dashboard",
            &format!("127.0.0.1:{dport}"),
            "--dashboard-token",
            "s3cret-token",
        ],
        &[hello.to_str().expect("utf-8 path")],
        &[],
    );
    let (status, _, _) = http(
        dport,
        "POST",
        "/api/scale?workers=2",
        &[("x-herd-token", "wrong-token!")],
        "",
    );
    assert_eq!(status, 403);
    let (status, _, body) = http(
        dport,
        "POST",
        "/api/scale?workers=2",
        &[("x-herd-token", "s3cret-token")],
        "",
    );
    assert_eq!(status, 200, "{body}");
    let pids = herd.wait_online(None);
    assert_eq!(pids.len(), 2);
    assert!(!herd.output().contains("s3cret-token"));

    // A non-loopback dashboard without a token is refused at start.
    let out = Command::new(launcher_support::herd_bin())
        .args([
            "run",
            "--bind",
            "127.0.0.1:0",
            "--dashboard",
            "0.0.0.0:0",
            "--",
        ])
        .arg(&hello)
        .output()
        .expect("run herd");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("non-loopback"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn no_secret_in_any_log_line_or_metric() {
    let _serial = launcher_support::serial();
    let redis = RedisServer::start();
    let secret = support::test_secret();
    let mport = free_port();
    let dport = free_port();
    let mut herd = flagship(
        &redis,
        &[
            "--workers",
            "2",
            "--metrics",
            &format!("127.0.0.1:{mport}"),
            "--dashboard",
            &format!("127.0.0.1:{dport}"),
        ],
        &[
            ("HERD_SECRET", secret.as_str()),
            ("RUST_LOG", "trace"),
            ("HERD_LOG", "trace"),
        ],
    );
    let mut cookies = Vec::new();
    let (status, headers, _) = http(herd.port, "POST", "/login", &[], r#"{"user":"alice"}"#);
    assert_eq!(status, 200);
    let mut cookie = session_cookie(&headers).expect("login cookie");
    cookies.push(cookie.clone());
    for path in ["/counter", "/session", "/me", "/counter", "/hits"] {
        for _ in 0..10 {
            let header = format!("herd_session={cookie}");
            let (status, headers, body) = http(herd.port, "GET", path, &[("Cookie", &header)], "");
            assert_eq!(status, 200, "{path}: {body}");
            if let Some(c) = session_cookie(&headers) {
                cookie = c.clone();
                cookies.push(c);
            }
        }
    }
    let header = format!("herd_session={cookie}");
    let (status, _, _) = http(herd.port, "POST", "/logout", &[("Cookie", &header)], "");
    assert_eq!(status, 200);
    // A visitor without a session gets one from /counter too.
    let (_, headers, _) = http(herd.port, "GET", "/counter", &[], "");
    cookies.extend(session_cookie(&headers));
    std::thread::sleep(Duration::from_millis(2500));
    let metrics = get(mport, "/metrics");
    let api = get(dport, "/api/status");
    assert!(metrics.contains("herd_session_destroys_total"), "{metrics}");
    herd.stop();
    let log = herd.output();
    assert!(
        log.contains("herd.request"),
        "trace output captured: {}",
        &log[..log.len().min(2000)]
    );
    let mut needles = vec![("HERD_SECRET", secret.clone())];
    for c in &cookies {
        needles.push(("cookie value", c.clone()));
        // The id part, after the 44-character signature: it is what Redis keys are made of.
        if c.len() > 44 {
            needles.push(("session id", c[44..].to_owned()));
        }
    }
    let outputs: HashMap<&str, &str> = [
        ("log", log.as_str()),
        ("/metrics", &metrics),
        ("/api/status", &api),
    ]
    .into_iter()
    .collect();
    for (what, needle) in &needles {
        for (where_, text) in &outputs {
            if let Some(line) = text.lines().find(|l| l.contains(needle.as_str())) {
                panic!("{what} found in {where_}: {line}");
            }
        }
    }
}
