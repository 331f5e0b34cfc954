//! Several hosts behind a real load balancer, on one machine: three "hosts" (each a `herd run`
//! master with 2 workers of the flagship example, on its own loopback address 127.0.0.2, .3, .4)
//! behind HAProxy (health checks on `/healthz` every 200 ms), against a Redis Sentinel group
//! (primary, replica, 3 sentinels). Through the balancer: exact session counters and global hits
//! under 200 concurrent clients, the bank invariant under transfers and snapshots, a rolling
//! deploy across the hosts, a host killed and brought back, a host drained on purpose (lame duck),
//! and a Sentinel failover in the middle of the load. Also the lame duck of one host alone, with
//! its own launcher and as a single worker without a master.
//!
//! HAProxy is required: the test fails with an install hint when it is missing (CI installs it).
//! `docs/several-machines.md` explains the setup and quotes the figures this file prints
//! (`cargo test --all-features --test multi_host -- --nocapture`).

mod launcher_support;
mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herd::launcher::{request, Request};
use reqwest::StatusCode;
use serde_json::Value;
use support::sentinel::SentinelSetup;
use support::RedisServer;

/// The tests of this file start many processes and count failures under load: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The cookie key every host shares (a test key: cookies must verify on any host).
const SECRET: &str =
    "iICEw8ahwUaw3DLcnOiyna0y+Ou/DXqYo+Wr7aeuQ+UEjM08isS5oPuKvG4Z8aMe1P93q0XtyPTn5hHIrEde1g==";
/// HAProxy's health-check interval and the checks needed to change a server's state.
const CHECK_INTER_MS: u64 = 200;
const CHECK_FALL: u64 = 2;
/// The hosts' lame-duck period: well above `CHECK_FALL * CHECK_INTER_MS` (plus a check's own time
/// on a loaded 2-core machine).
const LAME_DUCK_SECS: u64 = 2;
/// Pause of each client between two requests: 200 clients then offer about as much load as
/// the debug build serves on 2 cores, so latencies stay far from the timeouts.
const THINK: Duration = Duration::from_millis(100);
/// Concurrent clients of each load phase, by kind.
const SESSION_CLIENTS: usize = 170;
const TRANSFER_CLIENTS: usize = 20;
const SNAPSHOT_CLIENTS: usize = 10;

fn flagship() -> PathBuf {
    launcher_support::example_bin("multi_worker")
}

/// `kill -SIG -- -PGID`: the whole process group.
fn kill_group(pgid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
}

/// One host: a `herd run` master (leader of its own process group) and its workers.
struct Host {
    name: String,
    ip: String,
    port: u16,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Host {
    fn start(name: &str, ip: &str, port: u16, dir: &Path, redis_url: &str, prefix: &str) -> Host {
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("host log");
        let child = Command::new(launcher_support::herd_bin())
            .args(["run", "--workers", "2", "--bind", &format!("{ip}:{port}")])
            .arg("--socket")
            .arg(&socket)
            .args(["--lame-duck", &LAME_DUCK_SECS.to_string()])
            .args(["--drain-timeout", "10", "--ready-timeout", "30", "--"])
            .arg(flagship())
            .env("REDIS_URL", redis_url)
            .env("HERD_PREFIX", prefix)
            .env("HERD_SECRET", SECRET)
            // A new Redis connection goes through a sentinel first, and a reply can wait for a
            // core: with 9 processes and 200 clients on 2 cores shared with other builds, the
            // default 1 s is too short for either now and then.
            .env("HERD_CONNECT_TIMEOUT_MS", "3000")
            .env("HERD_REDIS_TIMEOUT_MS", "3000")
            .env("RUST_LOG", "warn,herd=info")
            .env_remove("LISTEN_FDS")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("HERD_LAME_DUCK_MS")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("start herd run");
        let host = Host {
            name: name.to_owned(),
            ip: ip.to_owned(),
            port,
            socket,
            log,
            child: Some(child),
        };
        host.wait_online();
        host
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn wait_online(&self) {
        support::sentinel::wait(
            &format!("host {} online", self.name),
            Duration::from_secs(60),
            || {
                request(&self.socket, &Request::Status, Duration::from_secs(2))
                    .ok()
                    .and_then(|r| r.status)
                    .is_some_and(|s| {
                        s.workers.len() == 2
                            && !s.reloading
                            && s.workers.iter().all(|w| w.state == "online")
                    })
            },
        );
    }

    /// A rolling reload through the control socket (what `herd reload` does), answered when done.
    fn reload(&self) {
        let r = request(&self.socket, &Request::Reload, Duration::from_secs(60)).expect("reload");
        assert!(r.ok, "reload of {} failed: {}", self.name, r.message);
    }

    /// SIGKILL to the master's process group and to each worker's own group: the host is gone.
    fn kill_everything(&mut self) {
        let master = self.pid();
        let workers = launcher_support::children_of(master);
        kill_group(master, "KILL");
        for w in workers {
            kill_group(w, "KILL");
        }
        let mut child = self.child.take().expect("running");
        let _ = child.wait();
    }

    /// Wait for the master to exit; its exit code.
    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let mut child = self.child.take().expect("running");
        wait_exit(&mut child, limit, &format!("host {}", self.name)).code()
    }

    /// One GET straight to this host (not through the balancer): (status, body).
    fn get(&self, path: &str) -> Result<(u16, String), String> {
        raw_get(&format!("{}:{}", self.ip, self.port), path)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.kill_everything();
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("---- host {} log (last lines) ----", self.name);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Waits for `child` to exit (panics after `limit`).
fn wait_exit(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not stop within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// GET over a fresh connection with `Connection: close`: (status, body).
fn raw_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| format!("read: {e}"))?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    Ok((status, body.to_owned()))
}

/// HAProxy with its own config in a temp dir, killed on drop.
struct Haproxy {
    child: Child,
    port: u16,
    admin: PathBuf,
    log: PathBuf,
}

impl Haproxy {
    /// `deploy/haproxy.cfg` (the config of `docs/several-machines.md` and of docker-compose's
    /// `lb` profile) with this test's `bind` and `server` lines, and an admin socket.
    fn config(port: u16, admin: &Path, servers: &[(&str, &str, u16)]) -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy.cfg");
        let text = std::fs::read_to_string(path).expect("deploy/haproxy.cfg");
        let checks = format!("check inter {CHECK_INTER_MS}ms fall {CHECK_FALL} ");
        assert!(
            text.contains(&checks),
            "deploy/haproxy.cfg must check as this test assumes: `{checks}`"
        );
        let mut cfg = String::new();
        for line in text.lines() {
            let word = line.split_whitespace().next().unwrap_or("");
            match word {
                "bind" => cfg.push_str(&format!("    bind 127.0.0.1:{port}\n")),
                "server" => {}
                _ => {
                    cfg.push_str(line);
                    cfg.push('\n');
                }
            }
            if line == "global" {
                cfg.push_str(&format!(
                    "    stats socket {} mode 600 level admin\n",
                    admin.display()
                ));
            }
        }
        for (name, ip, p) in servers {
            cfg.push_str(&format!("    server {name} {ip}:{p}\n"));
        }
        cfg
    }

    fn start(dir: &Path, servers: &[(&str, &str, u16)]) -> Haproxy {
        let found = Command::new("haproxy")
            .arg("-v")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "haproxy is needed by the multi-host test: install it (`apt-get install -y haproxy`, \
             `brew install haproxy`, `dnf install haproxy`); CI installs it in .ci/run"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let admin = dir.join("haproxy-admin.sock");
        let cfg_path = dir.join("haproxy.cfg");
        std::fs::write(&cfg_path, Haproxy::config(port, &admin, servers)).expect("write config");
        let check = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&cfg_path)
            .output()
            .expect("haproxy -c");
        assert!(
            check.status.success(),
            "haproxy rejects the config: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let log = dir.join("haproxy.log");
        let out = std::fs::File::create(&log).expect("haproxy log");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("start haproxy");
        let lb = Haproxy {
            child,
            port,
            admin,
            log,
        };
        support::sentinel::wait("haproxy to listen", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        lb
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Wait until HAProxy sees `server` in `state`; how long it took.
    fn wait_state(&self, server: &str, state: &str, limit: Duration) -> Duration {
        wait_state(&self.admin, server, state, limit)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- haproxy log ----\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// What one load phase saw.
#[derive(Default, Debug)]
struct Outcome {
    ok: u64,
    /// Failed requests: (seconds since the phase started, what).
    failed: Vec<(f64, String)>,
    /// Successful `/hits` and those whose outcome is unknown (failed).
    hits_ok: i64,
    hits_unknown: i64,
    /// Session counters that are not within [acknowledged, acknowledged + unknown].
    session_errors: Vec<String>,
    /// Sessions whose every increment was acknowledged, checked exactly.
    exact_sessions: usize,
    /// Snapshots of the bank that did not sum to 10000.
    bank_errors: Vec<String>,
    snapshots: u64,
    transfers: u64,
    /// Responses per server (the `x-herd-server` header HAProxy sets).
    per_server: HashMap<String, u64>,
    /// When the last request failed (seconds since the phase started).
    last_failure: Option<f64>,
}

/// Runs 200 clients through the balancer until `stop` (each a keep-alive connection, like a
/// browser tab): 170 visitors alternating `/counter` (their session) and `/hits` (a global), 20
/// transferring between the bank's accounts, 10 taking snapshots of the bank. Then each visitor
/// reads its session back and checks its counter.
async fn load(base: &str, stop: Arc<AtomicBool>) -> Outcome {
    let start = Instant::now();
    let total = SESSION_CLIENTS + TRANSFER_CLIENTS + SNAPSHOT_CLIENTS;
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let mut tasks = Vec::new();
    for i in 0..total {
        let (base, stop, outcome) = (base.to_owned(), stop.clone(), outcome.clone());
        tasks.push(tokio::spawn(async move {
            let c = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client");
            let mut cookie: Option<String> = None;
            let (mut counter_ok, mut counter_unknown) = (0i64, 0i64);
            let mut seed = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let (path, req) = if i < SESSION_CLIENTS {
                    let path = if n.is_multiple_of(2) { "/counter" } else { "/hits" };
                    let mut req = c.get(format!("{base}{path}"));
                    if let Some(ck) = &cookie {
                        req = req.header("cookie", ck);
                    }
                    (path, req)
                } else if i < SESSION_CLIENTS + TRANSFER_CLIENTS {
                    let from = seed % 10;
                    let to = (from + 1 + (seed >> 8) % 9) % 10;
                    let body = format!(
                        r#"{{"from":"acct-{from}","to":"acct-{to}","amount":{}}}"#,
                        1 + (seed >> 16) % 50
                    );
                    let req = c
                        .post(format!("{base}/transfer"))
                        .header("content-type", "application/json")
                        .body(body);
                    ("/transfer", req)
                } else {
                    ("/accounts", c.get(format!("{base}/accounts")))
                };
                let result = req.send().await;
                let at = start.elapsed().as_secs_f64();
                let mut o_failed = None;
                match result {
                    Ok(res) => {
                        let status = res.status();
                        let server = res
                            .headers()
                            .get("x-herd-server")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("?")
                            .to_owned();
                        let set_cookie = res
                            .headers()
                            .get("set-cookie")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.split(';').next())
                            .map(str::to_owned);
                        let body = res.text().await;
                        match (status, body) {
                            (StatusCode::OK, Ok(body)) => {
                                let mut o = outcome.lock().unwrap();
                                o.ok += 1;
                                *o.per_server.entry(server).or_default() += 1;
                                match path {
                                    "/counter" => {
                                        counter_ok += 1;
                                        if let Some(ck) = set_cookie {
                                            cookie = Some(ck);
                                        }
                                    }
                                    "/hits" => o.hits_ok += 1,
                                    "/transfer" => o.transfers += 1,
                                    _ => {
                                        o.snapshots += 1;
                                        let v: Value =
                                            serde_json::from_str(&body).unwrap_or_default();
                                        if v["total"] != 10000 {
                                            o.bank_errors.push(body);
                                        }
                                    }
                                }
                            }
                            // A transfer refused for lack of funds is an answer, not a failure.
                            (StatusCode::CONFLICT | StatusCode::UNPROCESSABLE_ENTITY, Ok(_))
                                if path == "/transfer" =>
                            {
                                outcome.lock().unwrap().ok += 1;
                            }
                            (status, body) => {
                                o_failed = Some(format!(
                                    "{path}: {status} via {server}: {}",
                                    body.unwrap_or_default()
                                ));
                            }
                        }
                    }
                    Err(e) => o_failed = Some(format!("{path}: {}", chain(&e))),
                }
                if let Some(why) = o_failed {
                    match path {
                        "/counter" => counter_unknown += 1,
                        "/hits" => outcome.lock().unwrap().hits_unknown += 1,
                        _ => {}
                    }
                    {
                        let mut o = outcome.lock().unwrap();
                        o.failed.push((at, why));
                        o.last_failure = Some(at);
                    }
                }
                // A visitor's think time (and a failing host or Redis is not hammered).
                tokio::time::sleep(THINK).await;
            }
            if i >= SESSION_CLIENTS {
                return;
            }
            // The session holds exactly the acknowledged increments, plus at most the unknown.
            let Some(ck) = cookie else {
                if counter_ok > 0 {
                    outcome
                        .lock()
                        .unwrap()
                        .session_errors
                        .push(format!("client {i}: {counter_ok} increments, no cookie"));
                }
                return;
            };
            let mut stored = None;
            for _ in 0..50 {
                let r = c
                    .get(format!("{base}/session"))
                    .header("cookie", &ck)
                    .send()
                    .await;
                if let Ok(r) = r {
                    if r.status() == StatusCode::OK {
                        let v: Value = r.json().await.unwrap_or_default();
                        stored = v["data"]["counter"].as_i64();
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let mut o = outcome.lock().unwrap();
            match stored {
                Some(s) if s >= counter_ok && s <= counter_ok + counter_unknown => {
                    if counter_unknown == 0 {
                        o.exact_sessions += 1;
                    }
                }
                other => o.session_errors.push(format!(
                    "client {i}: stored {other:?}, acknowledged {counter_ok}, unknown {counter_unknown}"
                )),
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let done = std::mem::take(&mut *outcome.lock().unwrap());
    done
}

/// An error and its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(&format!(": {s}"));
        source = s.source();
    }
    out
}

async fn hits(base: &str) -> i64 {
    for _ in 0..100 {
        if let Ok(r) = reqwest::get(format!("{base}/hits")).await {
            if r.status() == StatusCode::OK {
                let v: Value = r.json().await.unwrap_or_default();
                if let Some(n) = v["hits"].as_i64() {
                    return n;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/hits never answered");
}

/// Runs the load while `during` acts (on a blocking thread), stops it `after` the action, reads
/// the global counter before and after. Returns the outcome and the hits the counter gained
/// beyond those read by this function itself.
async fn phase<T: Send + 'static>(
    name: &str,
    base: &str,
    during: impl FnOnce(Instant) -> T + Send + 'static,
    after: Duration,
) -> (Outcome, i64, T) {
    let before = hits(base).await;
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let runner = {
        let (base, stop) = (base.to_owned(), stop.clone());
        tokio::spawn(async move { load(&base, stop).await })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let acted = tokio::task::spawn_blocking(move || during(start))
        .await
        .expect("action");
    tokio::time::sleep(after).await;
    stop.store(true, Ordering::Relaxed);
    let outcome = runner.await.expect("load");
    let gained = hits(base).await - before - 1;
    println!(
        "[{name}] {:.1}s: {} ok ({} transfers, {} snapshots, {} hits), {} failed; per host {:?}; \
         exact sessions {}",
        start.elapsed().as_secs_f64(),
        outcome.ok,
        outcome.transfers,
        outcome.snapshots,
        outcome.hits_ok,
        outcome.failed.len(),
        outcome.per_server,
        outcome.exact_sessions,
    );
    for (at, why) in outcome.failed.iter().take(5) {
        println!("[{name}]   failed at {at:.2}s: {why}");
    }
    (outcome, gained, acted)
}

/// Sessions and globals are exact (within the unknown outcomes), the bank always sums to 10000.
fn assert_consistent(name: &str, o: &Outcome, gained: i64) {
    assert!(
        o.session_errors.is_empty(),
        "[{name}] session counters lost or doubled updates: {:?}",
        &o.session_errors[..o.session_errors.len().min(5)]
    );
    assert!(
        o.bank_errors.is_empty(),
        "[{name}] the bank did not sum to 10000: {:?}",
        &o.bank_errors[..o.bank_errors.len().min(3)]
    );
    assert!(
        gained >= o.hits_ok && gained <= o.hits_ok + o.hits_unknown,
        "[{name}] hits gained {gained}, acknowledged {}, unknown {}",
        o.hits_ok,
        o.hits_unknown
    );
    assert!(
        o.snapshots > 0 && o.transfers > 0,
        "[{name}] too little load"
    );
}

fn assert_no_failures(name: &str, o: &Outcome) {
    assert!(
        o.failed.is_empty(),
        "[{name}] {} requests failed, first: {:?}",
        o.failed.len(),
        &o.failed[..o.failed.len().min(5)]
    );
}

/// A port free on 127.0.0.2, .3 and .4.
fn free_port_on_hosts(ips: &[&str]) -> u16 {
    for _ in 0..50 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        if ips
            .iter()
            .all(|ip| std::net::TcpListener::bind((*ip, port)).is_ok())
        {
            return port;
        }
    }
    panic!("no port free on {ips:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_behind_haproxy_deploy_die_drain_and_fail_over() {
    let _serial = SERIAL.lock().await;
    let suite = Instant::now();
    let sentinel = tokio::task::spawn_blocking(SentinelSetup::start)
        .await
        .expect("sentinel");
    let url = sentinel.url();
    let prefix = support::unique_prefix("multihost");
    let dir = tempfile::tempdir().expect("temp dir");
    let ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let names = ["h2", "h3", "h4"];
    let port = free_port_on_hosts(&ips);
    let hosts: Vec<Host> = {
        let (dir, url, prefix) = (dir.path().to_owned(), url.clone(), prefix.clone());
        tokio::task::spawn_blocking(move || {
            names
                .iter()
                .zip(ips)
                .map(|(n, ip)| Host::start(n, ip, port, &dir, &url, &prefix))
                .collect()
        })
        .await
        .expect("hosts")
    };
    let servers: Vec<(&str, &str, u16)> = names
        .iter()
        .zip(ips)
        .map(|(n, ip)| (*n, ip, port))
        .collect();
    let lb = Haproxy::start(dir.path(), &servers);
    for n in names {
        lb.wait_state(n, "UP", Duration::from_secs(10));
    }
    let base = lb.base();
    let hosts = Arc::new(Mutex::new(hosts));
    println!(
        "setup: sentinel group, 3 hosts, haproxy in {:?}",
        suite.elapsed()
    );

    // 1. Steady state: exact counters, bank invariant, every host serves.
    let (o, gained, ()) = phase("steady", &base, |_| (), Duration::from_secs(3)).await;
    assert_no_failures("steady", &o);
    assert_consistent("steady", &o, gained);
    assert!(o.session_errors.is_empty() && o.exact_sessions > 0);
    for n in names {
        assert!(
            o.per_server.get(n).copied().unwrap_or(0) > 0,
            "{n} took no traffic: {:?}",
            o.per_server
        );
    }

    // 2. Rolling deploy across the hosts, one after the other, as a deploy script would.
    let h = hosts.clone();
    let (o, gained, took) = phase(
        "rolling deploy",
        &base,
        move |_| {
            let t = Instant::now();
            for host in h.lock().unwrap().iter() {
                host.reload();
            }
            t.elapsed()
        },
        Duration::from_millis(500),
    )
    .await;
    println!("[rolling deploy] 3 hosts x 2 workers reloaded in {took:?}");
    assert_no_failures("rolling deploy", &o);
    assert_consistent("rolling deploy", &o, gained);

    // 3. A host dies (every process of it SIGKILLed), then comes back.
    let h = hosts.clone();
    let admin = lb.admin.clone();
    let (dir_path, url2, prefix2) = (dir.path().to_owned(), url.clone(), prefix.clone());
    let (o, gained, (killed_at, dead_at, down_after, online_after, up_after)) = phase(
        "host killed",
        &base,
        move |start| {
            let mut hosts = h.lock().unwrap();
            let killed_at = start.elapsed().as_secs_f64();
            // Returns when every process of the host is dead and reaped.
            hosts[1].kill_everything();
            let dead_at = start.elapsed().as_secs_f64();
            let down_after = wait_state(&admin, "h3", "DOWN", Duration::from_secs(10));
            std::thread::sleep(Duration::from_secs(1));
            let back = Instant::now();
            hosts[1] = Host::start("h3", ips[1], port, &dir_path, &url2, &prefix2);
            let online_after = back.elapsed();
            let up_after = wait_state(&admin, "h3", "UP", Duration::from_secs(10));
            (killed_at, dead_at, down_after, online_after, up_after)
        },
        Duration::from_secs(2),
    )
    .await;
    println!(
        "[host killed] killing its processes took {:.0} ms; haproxy marked it DOWN \
         {down_after:?} after they were all dead (checks every {CHECK_INTER_MS} ms, fall \
         {CHECK_FALL}); restarted, its workers were online in {online_after:?} and haproxy \
         marked it UP {up_after:?} later; {} requests failed",
        (dead_at - killed_at) * 1000.0,
        o.failed.len()
    );
    assert_consistent("host killed", &o, gained);
    assert!(
        down_after <= Duration::from_millis(CHECK_INTER_MS * (CHECK_FALL + 3)),
        "haproxy took {down_after:?} to stop sending to the dead host"
    );
    // Only the requests in flight on the killed host may fail: at most one per client, all
    // between the kill and the moment HAProxy marked the host down.
    assert!(
        o.failed.len() <= SESSION_CLIENTS + TRANSFER_CLIENTS + SNAPSHOT_CLIENTS,
        "more failures than requests in flight: {}",
        o.failed.len()
    );
    let window = killed_at..=dead_at + down_after.as_secs_f64() + 0.1;
    let late: Vec<_> = o
        .failed
        .iter()
        .filter(|(at, _)| !window.contains(at))
        .collect();
    assert!(
        late.is_empty(),
        "failures outside the kill window {window:?}: {:?}",
        &late[..late.len().min(5)]
    );
    assert!(o.per_server.get("h3").copied().unwrap_or(0) > 0);
    // The host takes traffic again.
    let (o, gained, ()) = phase("after the restart", &base, |_| (), Duration::from_secs(2)).await;
    assert_no_failures("after the restart", &o);
    assert_consistent("after the restart", &o, gained);
    assert!(
        o.per_server.get("h3").copied().unwrap_or(0) > 0,
        "the restarted host takes no traffic: {:?}",
        o.per_server
    );

    // 4. A host drains on purpose: SIGTERM, lame duck, then the drain. Nothing fails.
    let h = hosts.clone();
    let admin = lb.admin.clone();
    let (o, gained, (reported, down_after, exit)) = phase(
        "host drained",
        &base,
        move |_| {
            let mut hosts = h.lock().unwrap();
            let host = &mut hosts[2];
            let t = Instant::now();
            launcher_support::kill(host.pid(), "TERM");
            // It says so on /healthz at once, and still serves everything.
            let mut reported = None;
            while t.elapsed() < Duration::from_secs(LAME_DUCK_SECS) {
                if let Ok((503, body)) = host.get("/healthz") {
                    assert!(body.contains(r#""draining":true"#), "{body}");
                    reported = Some(t.elapsed());
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let down_after = wait_state(&admin, "h4", "DOWN", Duration::from_secs(LAME_DUCK_SECS));
            assert!(
                t.elapsed() < Duration::from_secs(LAME_DUCK_SECS),
                "haproxy saw the host down only after the lame-duck period"
            );
            assert!(
                matches!(host.get("/whoami"), Ok((200, _))),
                "a lame duck still serves"
            );
            let exit = host.wait_exit(Duration::from_secs(20));
            (reported, down_after, exit)
        },
        Duration::from_millis(500),
    )
    .await;
    println!(
        "[host drained] /healthz said draining {reported:?} after SIGTERM; haproxy marked it DOWN \
         after {down_after:?} (lame duck {LAME_DUCK_SECS} s); master exit {exit:?}"
    );
    assert!(reported.is_some(), "/healthz never reported draining");
    assert_eq!(exit, Some(0), "the drained host must exit 0");
    assert_no_failures("host drained", &o);
    assert_consistent("host drained", &o, gained);
    {
        let (dir_path, url2, prefix2) = (dir.path().to_owned(), url.clone(), prefix.clone());
        let h = hosts.clone();
        tokio::task::spawn_blocking(move || {
            h.lock().unwrap()[2] = Host::start("h4", ips[2], port, &dir_path, &url2, &prefix2);
        })
        .await
        .expect("restart h4");
        lb.wait_state("h4", "UP", Duration::from_secs(10));
    }

    // 5. The Sentinel primary fails over in the middle of the load: figures, and no lost
    // consistency (the bank's transfers are atomic, so a write lost with the old primary is a
    // whole transfer).
    let sentinel = Arc::new(Mutex::new(sentinel));
    let s = sentinel.clone();
    let (o, gained, killed_at) = phase(
        "sentinel failover",
        &base,
        move |start| {
            let mut sentinel = s.lock().unwrap();
            let killed_at = start.elapsed().as_secs_f64();
            sentinel.primary.kill();
            killed_at
        },
        Duration::from_secs(12),
    )
    .await;
    // The outage: the failures from the kill on, up to the first quiet second (a failure after
    // that is a straggler of a loaded machine, counted apart).
    let mut times: Vec<f64> = o.failed.iter().map(|(at, _)| *at).collect();
    times.sort_by(f64::total_cmp);
    let mut end = killed_at;
    let mut outage = 0;
    for &at in times.iter().filter(|&&at| at >= killed_at) {
        if at - end > 1.0 {
            break;
        }
        end = at;
        outage += 1;
    }
    let recovery = end - killed_at;
    let mut per_second = std::collections::BTreeMap::new();
    for at in &times {
        *per_second.entry(*at as u64).or_insert(0) += 1;
    }
    println!("[sentinel failover] failures per second of the phase: {per_second:?}");
    println!(
        "[sentinel failover] primary killed at {killed_at:.2}s: {outage} requests failed in the \
         outage, which ended {recovery:.2}s after the kill ({} failed in all, the last {:.2}s \
         after the kill); hits gained {gained}, acknowledged {}, unknown {}; \
         sessions outside [acknowledged, acknowledged + unknown]: {}",
        o.failed.len(),
        o.last_failure.map_or(0.0, |at| at - killed_at),
        o.hits_ok,
        o.hits_unknown,
        o.session_errors.len()
    );
    assert!(
        o.bank_errors.is_empty(),
        "the bank did not sum to 10000: {:?}",
        &o.bank_errors[..o.bank_errors.len().min(3)]
    );
    assert!(
        recovery < 11.0,
        "the outage lasted {recovery:.1}s after the primary died"
    );
    let promoted = sentinel.lock().unwrap().master_port();
    println!("[sentinel failover] sentinels name port {promoted:?} as the primary");
    println!("whole test: {:?}", suite.elapsed());
}

/// Wait until HAProxy (its admin socket `admin`) sees `server` in `state`; how long it took.
fn wait_state(admin: &Path, server: &str, state: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    support::sentinel::wait(&format!("haproxy to see {server} {state}"), limit, || {
        read_states(admin).get(server).is_some_and(|s| s == state)
    });
    start.elapsed()
}

/// Each server's state as HAProxy sees it (`UP`, `DOWN`, `UP 1/2`, ...), from `show stat`.
fn read_states(admin: &Path) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(admin) else {
        return out;
    };
    let _ = s.write_all(b"show stat\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return out;
    };
    let cols: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
    let (Some(sv), Some(st)) = (
        cols.iter().position(|c| *c == "svname"),
        cols.iter().position(|c| *c == "status"),
    ) else {
        return out;
    };
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        if f.first() == Some(&"app") && f.len() > st.max(sv) {
            out.insert(f[sv].to_owned(), f[st].to_owned());
        }
    }
    out
}

/// Right after a SIGTERM to the flagship at `addr`, for `period` (shorter than its lame duck):
/// `/healthz` turns to 503 draining and stays so, `/whoami` answers 200 throughout. Returns when
/// `/healthz` first said draining and how many requests were served meanwhile.
fn watch_lame_duck(addr: &str, period: Duration) -> (Duration, usize) {
    let t = Instant::now();
    let mut first_503 = None;
    let mut served = 0;
    while t.elapsed() < period {
        let (status, body) = raw_get(addr, "/healthz").expect("healthz during the lame duck");
        if status == 503 {
            assert_eq!(body, r#"{"ok":false,"draining":true}"#);
            first_503.get_or_insert(t.elapsed());
        } else {
            assert!(
                first_503.is_none(),
                "healthy again after draining was reported"
            );
        }
        let (status, _) = raw_get(addr, "/whoami").expect("whoami during the lame duck");
        assert_eq!(status, 200, "a lame duck still serves");
        served += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let first_503 = first_503.expect("/healthz never reported draining");
    (first_503, served)
}

/// One host alone (the flagship as its own master, `HERD_LAME_DUCK_MS`): a rolling reload never
/// reports draining; a SIGTERM does, at once, for the lame-duck period, while every route
/// serves; then the host drains and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lame_duck_reports_draining_while_serving_and_a_reload_does_not() {
    let _serial = SERIAL.lock().await;
    tokio::task::spawn_blocking(|| {
        let redis = RedisServer::start();
        let port = free_port_on_hosts(&["127.0.0.1"]);
        let dir = tempfile::tempdir().expect("temp dir");
        let mut child = Command::new(flagship())
            .args(["--workers", "2", "--port", &port.to_string()])
            .env("REDIS_URL", redis.url())
            .env("HERD_PREFIX", support::unique_prefix("lameduck"))
            .env("HERD_LAME_DUCK_MS", "1500")
            .env("XDG_RUNTIME_DIR", dir.path())
            .env("RUST_LOG", "warn")
            .env_remove("HERD_SECRET")
            .env_remove("LISTEN_FDS")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the flagship");
        let addr = format!("127.0.0.1:{port}");
        let guard = GroupGuard(child.id());
        support::sentinel::wait("the flagship to serve", Duration::from_secs(30), || {
            matches!(raw_get(&addr, "/healthz"), Ok((200, _)))
        });
        // A reload: old workers drain, the host never reports draining.
        let generation = |addr: &str| raw_get(addr, "/whoami").map(|(_, b)| b);
        let before = generation(&addr).expect("whoami");
        launcher_support::kill(child.id(), "HUP");
        let t = Instant::now();
        let mut checks = 0;
        while t.elapsed() < Duration::from_secs(4) {
            let (status, body) = raw_get(&addr, "/healthz").expect("healthz during the reload");
            assert_eq!(status, 200, "a reload made the host report {body}");
            checks += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(checks > 20, "too few checks during the reload: {checks}");
        assert_ne!(generation(&addr).expect("whoami"), before);

        // A stop: draining at once, serving throughout the period, then gone.
        launcher_support::kill(child.id(), "TERM");
        let t = Instant::now();
        let (first_503, served) = watch_lame_duck(&addr, Duration::from_millis(1300));
        println!(
            "lame duck: draining reported {first_503:?} after SIGTERM, {served} requests served \
             during the period"
        );
        assert!(first_503 < Duration::from_millis(500));
        // A stopping host starts no reload (the control socket says why).
        let socket = dir
            .path()
            .join("herd")
            .join(format!("multi_worker-{port}.sock"));
        let r = request(&socket, &Request::Reload, Duration::from_secs(5)).expect("control");
        assert!(!r.ok && r.message.contains("stopping"), "{}", r.message);
        let s = request(&socket, &Request::Status, Duration::from_secs(5))
            .expect("control")
            .status
            .expect("status");
        assert!(s.stopping, "the status says the host is stopping");
        let status = wait_exit(&mut child, Duration::from_secs(20), "the flagship");
        assert!(
            t.elapsed() >= Duration::from_millis(1500),
            "stopped before the lame-duck period ended"
        );
        assert_eq!(status.code(), Some(0));
        assert!(
            raw_get(&addr, "/healthz").is_err(),
            "still listening after the stop"
        );
        drop(guard);
    })
    .await
    .expect("lame duck test");
}

/// The flagship alone under systemd socket activation (one worker, no herd master): on SIGTERM
/// it reports draining for its own lame-duck period (`HERD_LAME_DUCK_MS`) while serving, then
/// stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_a_master_is_a_lame_duck_on_its_own() {
    let _serial = SERIAL.lock().await;
    tokio::task::spawn_blocking(|| {
        let found = Command::new("systemd-socket-activate")
            .arg("--help")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "systemd-socket-activate is needed: install systemd (`apt-get install -y systemd`)"
        );
        let redis = RedisServer::start();
        let port = free_port_on_hosts(&["127.0.0.1"]);
        let addr = format!("127.0.0.1:{port}");
        let mut child = Command::new("systemd-socket-activate")
            .args(["-l", &addr])
            .arg(format!("--setenv=REDIS_URL={}", redis.url()))
            .arg(format!(
                "--setenv=HERD_PREFIX={}",
                support::unique_prefix("lameduck-alone")
            ))
            .arg("--setenv=HERD_LAME_DUCK_MS=1000")
            .arg("--setenv=RUST_LOG=warn")
            .arg(flagship())
            .env_remove("HERD_SECRET")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("systemd-socket-activate");
        let guard = GroupGuard(child.id());
        // The program starts at the first connection and serves it from the inherited socket.
        support::sentinel::wait(
            "the socket-activated flagship",
            Duration::from_secs(30),
            || matches!(raw_get(&addr, "/healthz"), Ok((200, _))),
        );
        launcher_support::kill(child.id(), "TERM");
        let t = Instant::now();
        watch_lame_duck(&addr, Duration::from_millis(800));
        let status = wait_exit(&mut child, Duration::from_secs(20), "the flagship");
        assert!(
            t.elapsed() >= Duration::from_millis(1000),
            "stopped before the period ended"
        );
        assert_eq!(status.code(), Some(0));
        drop(guard);
    })
    .await
    .expect("master-less lame duck test");
}

/// A second stop during the lame-duck period starts the drain at once (`herd run --lame-duck`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_ends_the_lame_duck_at_once() {
    let _serial = SERIAL.lock().await;
    tokio::task::spawn_blocking(|| {
        let mut m = launcher_support::Master::herd_run(
            &["--workers", "2", "--lame-duck", "30"],
            &[launcher_support::hello_bin().to_str().expect("utf-8 path")],
        );
        m.online_pids(2, Duration::from_secs(30));
        let port = m.port();
        launcher_support::kill(m.pid(), "TERM");
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            launcher_support::get(port, "/").is_ok(),
            "a lame duck still serves"
        );
        let t = Instant::now();
        launcher_support::kill(m.pid(), "TERM");
        let status = m.wait_exit(Duration::from_secs(10));
        assert!(status.success(), "{status}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the second SIGTERM did not cut the 30 s lame duck short"
        );
    })
    .await
    .expect("second stop test");
}

/// Kills the process group on drop (a failing assertion must not leave the flagship running).
struct GroupGuard(u32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.0, "KILL");
    }
}

/// The guide shows `deploy/haproxy.cfg` (without its comments): the config this file runs.
#[test]
fn the_guide_shows_the_haproxy_config_the_test_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = std::fs::read_to_string(root.join("deploy/haproxy.cfg")).expect("config");
    let guide = std::fs::read_to_string(root.join("docs/several-machines.md")).expect("guide");
    let shown = guide
        .split("```haproxy\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a ```haproxy block in docs/several-machines.md");
    let meaningful = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        meaningful(shown),
        meaningful(&cfg),
        "docs/several-machines.md and deploy/haproxy.cfg differ"
    );
}
