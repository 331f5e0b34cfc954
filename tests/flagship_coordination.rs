//! The flagship's coordination routes (`examples/multi_worker.rs`): `GET /ticks`, a job run under
//! a lease that adds 1 per second in total, through a rolling reload and a killed holder; and
//! `GET /limited`, 50 requests per client IP per 10 s across all workers (a burst of 50, then one
//! per 200 ms), 429 with `Retry-After` beyond.

mod launcher_support;
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::RedisServer;

/// The flagship as its own master, killed with its workers on drop.
struct Flagship {
    child: Child,
    port: u16,
    prefix: String,
    /// Worker pids seen, killed on drop (they also die with their master).
    pids: std::sync::Mutex<Vec<u64>>,
}

impl Flagship {
    fn start(redis: &RedisServer, workers: usize) -> Flagship {
        let port = launcher_support::free_port();
        let prefix = support::unique_prefix("flagship-coord");
        let child = Command::new(launcher_support::example_bin("multi_worker"))
            .args([
                "--workers",
                &workers.to_string(),
                "--port",
                &port.to_string(),
            ])
            .env("REDIS_URL", redis.url())
            .env("HERD_PREFIX", &prefix)
            .env_remove("HERD_SECRET")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the flagship");
        let flagship = Flagship {
            child,
            port,
            prefix,
            pids: std::sync::Mutex::new(Vec::new()),
        };
        flagship.wait_for_workers(workers);
        flagship
    }

    /// Waits until `n` distinct worker pids answer `/whoami`; returns them.
    fn wait_for_workers(&self, n: usize) -> Vec<u64> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = std::collections::HashSet::new();
        while Instant::now() < deadline {
            if let Ok((_, body)) = get(self.port, "/whoami", None) {
                if let Some(p) = body["pid"].as_u64() {
                    seen.insert(p);
                }
            }
            if seen.len() >= n {
                let seen: Vec<u64> = seen.into_iter().collect();
                self.pids.lock().unwrap().extend(&seen);
                return seen;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("only workers {seen:?} of {n} answered within 60 s");
    }

    fn ticks(&self) -> i64 {
        let (status, body) = get(self.port, "/ticks", None).expect("GET /ticks");
        assert_eq!(status, 200, "{body}");
        body["ticks"].as_i64().expect("ticks")
    }
}

impl Drop for Flagship {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Workers die with their master; make sure for those seen.
        for pid in self.pids.lock().unwrap().iter() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// One GET over a fresh connection (so requests spread over the workers), optionally from
/// another loopback address: `(status, JSON body)`, plus `Retry-After` in the body under
/// `"_retry_after"` when present.
fn get(port: u16, path: &str, from: Option<std::net::IpAddr>) -> Result<(u16, Value), String> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = match from {
        None => std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| e.to_string())?,
        Some(ip) => {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .map_err(|e| e.to_string())?;
            socket
                .bind(&std::net::SocketAddr::new(ip, 0).into())
                .map_err(|e| e.to_string())?;
            socket
                .connect_timeout(&addr.into(), Duration::from_secs(5))
                .map_err(|e| e.to_string())?;
            socket.into()
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no header end")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    let mut json: Value = serde_json::from_str(body).map_err(|e| format!("{e}: {body:?}"))?;
    for line in head.lines() {
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim().to_ascii_lowercase();
            if ["retry-after", "ratelimit", "ratelimit-policy"].contains(&name.as_str()) {
                json[format!("_{name}")] = Value::String(value.trim().to_owned());
            }
        }
    }
    Ok((status, json))
}

#[test]
fn ticks_grow_once_per_second_in_total_through_a_reload_and_a_killed_holder() {
    let _serial = launcher_support::serial();
    let redis = RedisServer::start();
    let flagship = Flagship::start(&redis, 3);
    let holder_key = format!("{}:g:{{stats}}:ticks-holder", flagship.prefix);
    // (seconds since start, ticks), sampled every 250 ms.
    let started = Instant::now();
    let mut samples: Vec<(f64, i64)> = Vec::new();
    let mut reloaded = false;
    let mut killed = None;
    while started.elapsed() < Duration::from_secs(40) {
        samples.push((started.elapsed().as_secs_f64(), flagship.ticks()));
        let t = started.elapsed();
        if !reloaded && t > Duration::from_secs(8) {
            launcher_support::kill(flagship.child.id(), "HUP");
            reloaded = true;
        }
        if killed.is_none() && t > Duration::from_secs(22) {
            let holder: Option<String> = redis.cmd(&["GET", &holder_key]);
            let pid: u32 = holder.expect("a holder").parse().expect("pid");
            launcher_support::kill(pid, "KILL");
            killed = Some(pid);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // Ticking went on after the kill, in another process.
    let holder: Option<String> = redis.cmd(&["GET", &holder_key]);
    assert_ne!(holder.and_then(|h| h.parse().ok()), killed);
    // Every 10 s window (from the first sample after the job started) grew by 7 to 13.
    let first = samples
        .iter()
        .position(|&(_, n)| n > 0)
        .expect("the job never ticked");
    let mut windows = 0;
    let (mut least, mut most) = (i64::MAX, i64::MIN);
    for (i, &(t0, n0)) in samples.iter().enumerate().skip(first) {
        let Some(&(t1, n1)) = samples[i..].iter().find(|&&(t, _)| t >= t0 + 10.0) else {
            break;
        };
        // The sample 10 s later may be a little over: scale nothing, allow its extra time.
        let grew = n1 - n0;
        let span = t1 - t0;
        assert!(
            (7..=13).contains(&grew),
            "{grew} ticks between {t0:.2} s and {t1:.2} s ({span:.2} s); samples {samples:?}"
        );
        windows += 1;
        least = least.min(grew);
        most = most.max(grew);
    }
    eprintln!("{windows} windows of 10 s: ticks grew by {least} to {most}");
    assert!(windows > 50, "only {windows} windows checked");
}

#[test]
fn limited_allows_a_burst_of_50_per_client_ip_across_workers_then_429() {
    let _serial = launcher_support::serial();
    let redis = RedisServer::start();
    let flagship = Flagship::start(&redis, 4);
    let me: std::net::IpAddr = [127, 0, 0, 2].into();
    let started = Instant::now();
    let mut allowed = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..70 {
        let (status, body) = get(flagship.port, "/limited", Some(me)).expect("GET /limited");
        match status {
            200 => allowed.push(body),
            429 => refused.push(body),
            other => panic!("status {other}: {body}"),
        }
    }
    let elapsed = started.elapsed();
    // A burst of 50, plus one per 200 ms that passed meanwhile.
    let refills = (elapsed.as_millis() / 200) as usize;
    assert!(
        (50..=50 + refills + 1).contains(&allowed.len()),
        "{} allowed in {elapsed:?}",
        allowed.len()
    );
    let workers: std::collections::HashSet<u64> = allowed
        .iter()
        .filter_map(|b| b["worker"].as_u64())
        .collect();
    assert!(workers.len() >= 2, "all answered by {workers:?}");
    // The count goes down by one per request whichever worker answers (one shared budget), or
    // stays when 200 ms passed since the previous request (one unit back).
    let remaining: Vec<u64> = allowed
        .iter()
        .map(|b| b["remaining"].as_u64().expect("remaining"))
        .collect();
    assert_eq!(remaining[0], 49);
    for pair in remaining.windows(2) {
        assert!(
            pair[1] + 1 == pair[0] || pair[1] == pair[0] || pair[0] == 0,
            "{remaining:?}"
        );
    }
    let last = refused.last().expect("some refused");
    assert!(last["error"].is_string(), "{last}");
    let retry: u64 = last["_retry-after"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("Retry-After");
    assert!(retry >= 1, "{last}");
    assert_eq!(last["_ratelimit-policy"], r#""limited";q=50;w=10"#);
    // After waiting Retry-After, the next request passes.
    std::thread::sleep(Duration::from_secs(retry));
    let (status, body) = get(flagship.port, "/limited", Some(me)).expect("GET /limited");
    assert_eq!(status, 200, "{body}");
    // Another client IP has its own budget.
    let (status, body) = get(flagship.port, "/limited", Some([127, 0, 0, 3].into())).expect("GET");
    assert_eq!((status, body["remaining"].as_u64()), (200, Some(49)));
}
