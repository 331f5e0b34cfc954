//! The driver: starts a private `redis-server` and every app as its own process, makes a pool of
//! existing sessions per app, then runs `wrk` against app × route × connections, interleaved
//! (A B C A B C ...) for several rounds, and prints medians, ratios, CPU and Redis commands per request.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::proc_stat;

type Error = Box<dyn std::error::Error>;

pub const APPS: [&str; 7] = [
    "herd",
    "herd-observed",
    "tower-sessions",
    "limit",
    "getset",
    "checked",
    "plain",
];
pub const ROUTES: [&str; 5] = ["counter", "rmw", "read", "untouched", "limited"];

/// Which apps serve which route (the others answer 404).
fn serves(app: &str, route: &str) -> bool {
    match app {
        "plain" => route == "untouched",
        // herd's rate limiter: only herd's apps have it.
        _ if route == "limited" => app.starts_with("herd"),
        "limit" => route != "rmw",
        _ => true,
    }
}

/// The reference a route's figures are divided by.
fn reference(route: &str) -> &'static str {
    match route {
        "counter" | "read" => "limit",
        "rmw" => "getset",
        "limited" => "herd",
        _ => "plain",
    }
}

/// Redis round trips per request that herd's design allows.
fn herd_budget(route: &str) -> f64 {
    match route {
        "counter" | "read" | "limited" => 1.0,
        "rmw" => 2.0,
        _ => 0.0,
    }
}

pub struct Options {
    smoke: bool,
    rounds: usize,
    duration: u64,
    warmup: u64,
    connections: Vec<usize>,
    apps: Vec<String>,
    routes: Vec<String>,
    sessions: usize,
    threads: usize,
    wrk: String,
    redis_server: String,
    multi_worker_bin: Option<PathBuf>,
    multi_workers: Vec<usize>,
    out: Option<PathBuf>,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options, Error> {
        let mut o = Options {
            smoke: false,
            rounds: 3,
            duration: 5,
            warmup: 1,
            connections: vec![64, 256],
            apps: APPS.iter().map(|s| s.to_string()).collect(),
            routes: ROUTES.iter().map(|s| s.to_string()).collect(),
            sessions: 0,
            threads: 2,
            wrk: "wrk".into(),
            redis_server: "redis-server".into(),
            multi_worker_bin: None,
            multi_workers: vec![1, 2, 4],
            out: None,
        };
        let mut explicit = Vec::new();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if flag == "--smoke" {
                o.smoke = true;
                continue;
            }
            let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            explicit.push(flag.clone());
            let list = |v: &str| {
                v.split(',')
                    .map(|s| s.trim().to_owned())
                    .collect::<Vec<_>>()
            };
            match flag.as_str() {
                "--rounds" => o.rounds = v.parse()?,
                "--duration" => o.duration = v.parse()?,
                "--warmup" => o.warmup = v.parse()?,
                "--connections" => {
                    o.connections = list(v)
                        .iter()
                        .map(|s| s.parse())
                        .collect::<Result<_, _>>()?
                }
                "--apps" => o.apps = list(v),
                "--routes" => o.routes = list(v),
                "--sessions" => o.sessions = v.parse()?,
                "--threads" => o.threads = v.parse()?,
                "--wrk" => o.wrk = v.clone(),
                "--redis-server" => o.redis_server = v.clone(),
                "--multi-worker-bin" => o.multi_worker_bin = Some(v.into()),
                "--multi-workers" => {
                    o.multi_workers = list(v)
                        .iter()
                        .map(|s| s.parse())
                        .collect::<Result<_, _>>()?
                }
                "--out" => o.out = Some(v.into()),
                _ => return Err(format!("unknown flag {flag}").into()),
            }
        }
        if o.smoke {
            let set = |f: &str| explicit.iter().any(|e| e == f);
            if !set("--rounds") {
                o.rounds = 1;
            }
            if !set("--duration") {
                o.duration = 1;
            }
            if !set("--warmup") {
                o.warmup = 0;
            }
            if !set("--connections") {
                o.connections = vec![64];
            }
        }
        for a in &o.apps {
            if !APPS.contains(&a.as_str()) {
                return Err(format!("unknown app {a}").into());
            }
        }
        for r in &o.routes {
            if !ROUTES.contains(&r.as_str()) {
                return Err(format!("unknown route {r}").into());
            }
        }
        if o.rounds == 0 || o.duration == 0 || o.connections.is_empty() {
            return Err("--rounds, --duration and --connections must be positive".into());
        }
        if o.sessions == 0 {
            o.sessions = o.connections.iter().copied().max().unwrap_or(64);
        }
        Ok(o)
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

fn free_port() -> Result<u16, Error> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A child process killed (SIGKILL) and reaped on drop.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn check_alive(&mut self) -> Result<(), Error> {
        match self.child.try_wait()? {
            Some(status) => Err(format!("{} exited with {status}", self.name).into()),
            None => Ok(()),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Redis {
    proc: Proc,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    fn start(binary: &str) -> Result<Redis, Error> {
        let dir = std::env::temp_dir().join(format!("herd-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let child = Command::new(binary)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--dir", &dir.to_string_lossy()])
                .args(["--logfile", &dir.join("redis.log").to_string_lossy()])
                .args(["--daemonize", "no", "--protected-mode", "no"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start `{binary}` (install redis-server): {e}"))?;
            let mut redis = Redis {
                proc: Proc {
                    name: "redis-server".into(),
                    child,
                },
                port,
                dir: dir.clone(),
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if redis.proc.check_alive().is_err() {
                    break;
                }
                if redis
                    .conn()
                    .and_then(|mut c| Ok(redis::cmd("PING").query::<String>(&mut c)?))
                    .is_ok()
                {
                    return Ok(redis);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            last = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
        }
        Err(format!("redis-server did not start: {last}").into())
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn conn(&self) -> Result<redis::Connection, Error> {
        Ok(redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(2))?)
    }

    /// `INFO commandstats`: calls per command (commands run by scripts included).
    fn command_calls(&self) -> Result<BTreeMap<String, u64>, Error> {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut self.conn()?)?;
        Ok(info
            .lines()
            .filter_map(|line| {
                let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = stats
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("calls="))?
                    .parse()
                    .ok()?;
                Some((name.to_owned(), calls))
            })
            .collect())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_app(app: &str, redis_url: &str) -> Result<(Proc, u16), Error> {
    let exe = std::env::current_exe()?;
    let port = free_port()?;
    let child = Command::new(exe)
        .args([
            "serve",
            "--app",
            app,
            "--port",
            &port.to_string(),
            "--redis",
            redis_url,
        ])
        .stdin(Stdio::null())
        .spawn()?;
    let mut proc = Proc {
        name: format!("app {app}"),
        child,
    };
    wait_http(&mut proc, port, "/untouched")?;
    Ok((proc, port))
}

/// Waits until `path` answers (any status) or the process dies.
fn wait_http(proc: &mut Proc, port: u16, path: &str) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        proc.check_alive()?;
        if http_get(port, path, None).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{} did not answer on port {port} within 30 s", proc.name).into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client for setup and checks (the load itself comes from wrk).

struct Reply {
    status: u16,
    set_cookie: Option<String>,
    body: String,
}

fn http_get(port: u16, path: &str, cookie: Option<&str>) -> Result<Reply, Error> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{cookie}Connection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").ok_or("malformed HTTP reply")?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or("malformed status line")?;
    let set_cookie = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("set-cookie")
            .then(|| v.trim().split(';').next().unwrap_or("").to_owned())
    });
    Ok(Reply {
        status,
        set_cookie,
        body: body.to_owned(),
    })
}

/// Makes `n` sessions by calling `path` without a cookie; returns the `name=value` cookies.
fn make_sessions(port: u16, path: &str, n: usize) -> Result<Vec<String>, Error> {
    (0..n)
        .map(|_| {
            let r = http_get(port, path, None)?;
            if r.status != 200 {
                return Err(
                    format!("GET {path} without cookie: status {} {}", r.status, r.body).into(),
                );
            }
            r.set_cookie
                .ok_or_else(|| format!("GET {path} without cookie set no cookie").into())
        })
        .collect()
}

/// Honesty checks before any load: an existing session is reused, counted, and not re-issued.
fn check_app(app: &str, port: u16, cookie: &str, routes: &[String]) -> Result<(), Error> {
    for route in routes.iter().filter(|r| serves(app, r)) {
        let path = format!("/{route}");
        let a = http_get(port, &path, Some(cookie))?;
        let b = http_get(port, &path, Some(cookie))?;
        for r in [&a, &b] {
            if r.status != 200 {
                return Err(format!("{app} {path}: status {} {}", r.status, r.body).into());
            }
            // tower-sessions re-sends the same cookie after each change: fine; a new id is not.
            if r.set_cookie.as_deref().is_some_and(|c| c != cookie) {
                return Err(format!("{app} {path}: an existing session got a new cookie").into());
            }
        }
        if route == "counter" || route == "rmw" {
            let (x, y): (i64, i64) = (a.body.trim().parse()?, b.body.trim().parse()?);
            if y != x + 1 || (route == "counter" && x < 2) {
                return Err(format!("{app} {path}: counter went {x} -> {y}").into());
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// wrk

/// A wrk script giving each thread its own slice of the session cookies, used round-robin.
fn write_script(
    dir: &Path,
    name: &str,
    cookies: &[String],
    threads: usize,
) -> Result<PathBuf, Error> {
    let path = dir.join(format!("{name}.lua"));
    let list: Vec<String> = cookies.iter().map(|c| format!("{c:?}")).collect();
    let script = format!(
        r#"local cookies = {{ {list} }}
local next_tid = 0
function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
end
function init(args)
  reqs = {{}}
  count = 0
  for i = tid + 1, #cookies, {threads} do
    count = count + 1
    reqs[count] = wrk.format(nil, nil, {{ ["Cookie"] = cookies[i] }})
  end
  idx = 0
end
function request()
  idx = idx % count + 1
  return reqs[idx]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %.0f %.0f %.0f %.0f %.0f %.0f %.0f %.0f %.0f\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"#,
        list = list.join(", ")
    );
    std::fs::write(&path, script)?;
    Ok(path)
}

struct WrkResult {
    requests: f64,
    rps: f64,
    errors: u64,
    p50_us: f64,
    p99_us: f64,
}

fn run_wrk(
    o: &Options,
    script: &Path,
    port: u16,
    path: &str,
    conns: usize,
    secs: u64,
) -> Result<WrkResult, Error> {
    let out = Command::new(&o.wrk)
        .arg(format!("-t{}", o.threads.min(conns)))
        .arg(format!("-c{conns}"))
        .arg(format!("-d{secs}s"))
        .arg("--timeout")
        .arg("5s")
        .arg("-s")
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `{}` (install wrk): {e}", o.wrk))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .ok_or_else(|| {
            format!(
                "wrk gave no result: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let v: Vec<f64> = line
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(f64::NAN))
        .collect();
    if v.len() != 9 {
        return Err(format!("bad wrk result line: {line}").into());
    }
    Ok(WrkResult {
        requests: v[0],
        rps: v[0] / (v[1] / 1e6),
        errors: v[2..7].iter().sum::<f64>() as u64,
        p50_us: v[7],
        p99_us: v[8],
    })
}

// ---------------------------------------------------------------------------------------------
// Measurement

#[derive(Clone)]
struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    requests: f64,
    app_cpu_us: f64,
    redis_cpu_us: f64,
    redis_calls: f64,
    breakdown: BTreeMap<String, f64>,
    herd_round_trips: Option<f64>,
}

struct Target<'a> {
    name: &'a str,
    port: u16,
    root_pid: u32,
    tree: bool,
    script: &'a Path,
    herd_counter: bool,
}

fn herd_round_trips(port: u16) -> Option<u64> {
    http_get(port, "/__round_trips", None)
        .ok()?
        .body
        .trim()
        .parse()
        .ok()
}

fn measure(
    o: &Options,
    redis: &Redis,
    t: &Target<'_>,
    route: &str,
    conns: usize,
    secs: u64,
    tick_us: f64,
) -> Result<Sample, Error> {
    let cpu = |pid: u32| {
        if t.tree {
            proc_stat::tree_cpu_ticks(pid)
        } else {
            proc_stat::cpu_ticks(pid)
        }
    };
    let calls0 = redis.command_calls()?;
    let rt0 = if t.herd_counter {
        herd_round_trips(t.port)
    } else {
        None
    };
    let (app0, redis0) = (cpu(t.root_pid), proc_stat::cpu_ticks(redis.proc.pid()));
    let w = run_wrk(o, t.script, t.port, &format!("/{route}"), conns, secs)?;
    let (app1, redis1) = (cpu(t.root_pid), proc_stat::cpu_ticks(redis.proc.pid()));
    let rt1 = if t.herd_counter {
        herd_round_trips(t.port)
    } else {
        None
    };
    let calls1 = redis.command_calls()?;
    let n = w.requests.max(1.0);
    let mut breakdown = BTreeMap::new();
    for (cmd, after) in &calls1 {
        // The driver's own INFO calls are not the app's.
        if cmd == "info" {
            continue;
        }
        let d = after - calls0.get(cmd).copied().unwrap_or(0);
        if d > 0 {
            breakdown.insert(cmd.clone(), d as f64 / n);
        }
    }
    Ok(Sample {
        rps: w.rps,
        p50_us: w.p50_us,
        p99_us: w.p99_us,
        errors: w.errors,
        requests: w.requests,
        app_cpu_us: (app1 - app0) as f64 * tick_us / n,
        redis_cpu_us: (redis1 - redis0) as f64 * tick_us / n,
        redis_calls: breakdown.values().sum(),
        breakdown,
        herd_round_trips: match (rt0, rt1) {
            // Minus the driver's own /__round_trips request (which makes none).
            (Some(a), Some(b)) => Some((b - a) as f64 / n),
            _ => None,
        },
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

type Key = (usize, String, String); // (connections, route, app)

// ---------------------------------------------------------------------------------------------

pub fn run(o: Options) -> Result<(), Error> {
    let started = Instant::now();
    let tick_us = 1e6 / proc_stat::ticks_per_second() as f64;
    let redis = Redis::start(&o.redis_server)?;
    eprintln!(
        "bench: redis-server on port {} (pid {})",
        redis.port,
        redis.proc.pid()
    );

    let mut procs: Vec<(String, Proc, u16)> = Vec::new();
    for app in &o.apps {
        let (proc, port) = start_app(app, &redis.url())?;
        eprintln!("bench: app {app} on port {port} (pid {})", proc.pid());
        procs.push((app.clone(), proc, port));
    }

    // Sessions: existing visitors. Plain axum gets herd's cookies (same request size) if herd runs.
    let mut cookies: HashMap<String, Vec<String>> = HashMap::new();
    for (app, _, port) in &procs {
        if app != "plain" {
            cookies.insert(app.clone(), make_sessions(*port, "/counter", o.sessions)?);
        }
    }
    let plain_cookies = cookies.get("herd").cloned().unwrap_or_else(|| {
        (0..o.sessions)
            .map(|i| format!("herd_session=plain{i:028}"))
            .collect()
    });
    cookies.insert("plain".into(), plain_cookies);
    for (app, _, port) in &procs {
        if app != "plain" {
            check_app(app, *port, &cookies[app][0], &o.routes)?;
        }
    }
    eprintln!("bench: {} sessions per app made and checked", o.sessions);

    let mut scripts = HashMap::new();
    for app in &o.apps {
        scripts.insert(
            app.clone(),
            write_script(&redis.dir, app, &cookies[app], o.threads)?,
        );
    }

    let plan: Vec<(String, String)> = o
        .routes
        .iter()
        .flat_map(|r| {
            o.apps
                .iter()
                .filter(|a| serves(a, r))
                .map(move |a| (r.clone(), a.clone()))
        })
        .collect();
    let max_conns = o.connections.iter().copied().max().unwrap_or(64);
    if o.warmup > 0 {
        eprintln!("bench: warm-up, {} s per app and route", o.warmup);
        for (route, app) in &plan {
            let (_, proc, port) = procs.iter().find(|(a, _, _)| a == app).ok_or("app")?;
            let t = Target {
                name: app,
                port: *port,
                root_pid: proc.pid(),
                tree: false,
                script: &scripts[app],
                herd_counter: false,
            };
            measure(&o, &redis, &t, route, max_conns, o.warmup, tick_us)?;
        }
    }

    let mut samples: BTreeMap<Key, Vec<Sample>> = BTreeMap::new();
    let total = o.rounds * o.connections.len() * plan.len();
    let mut done = 0;
    for round in 1..=o.rounds {
        for &conns in &o.connections {
            for route in &o.routes {
                // Interleaved: every app on this route, back to back, then the next route.
                for (r, app) in plan.iter().filter(|(r, _)| r == route) {
                    let (_, proc, port) =
                        procs.iter_mut().find(|(a, _, _)| a == app).ok_or("app")?;
                    proc.check_alive()?;
                    let t = Target {
                        name: app,
                        port: *port,
                        root_pid: proc.pid(),
                        tree: false,
                        script: &scripts[app],
                        herd_counter: app == "herd",
                    };
                    let s = measure(&o, &redis, &t, r, conns, o.duration, tick_us)?;
                    done += 1;
                    eprintln!(
                        "bench: [{done}/{total}] round {round} c={conns} /{r} {:<14} {:>8.0} req/s  p99 {:>6.1} ms  app {:>5.1} µs/req  redis {:>5.1} µs/req  {:.2} cmds/req  errors {}",
                        t.name, s.rps, s.p99_us / 1000.0, s.app_cpu_us, s.redis_cpu_us, s.redis_calls.max(0.0), s.errors
                    );
                    samples
                        .entry((conns, r.clone(), app.clone()))
                        .or_default()
                        .push(s);
                }
            }
        }
    }
    let multi = match &o.multi_worker_bin {
        Some(bin) if bin.exists() => Some(run_multi_worker(&o, &redis, bin, tick_us)?),
        Some(bin) => {
            eprintln!(
                "bench: multi-worker binary {} not found: skipping the multi-worker runs",
                bin.display()
            );
            None
        }
        None => {
            eprintln!("bench: no --multi-worker-bin given: skipping the multi-worker runs");
            None
        }
    };
    drop(procs);

    let report = report(&o, &samples, multi.as_ref(), started.elapsed());
    println!("{report}");
    if let Some(out) = &o.out {
        std::fs::write(out, &report)?;
    }
    let mut failures = Vec::new();
    for ((c, r, a), ss) in &samples {
        let errors: u64 = ss.iter().map(|s| s.errors).sum();
        if errors > 0 || ss.iter().any(|s| s.requests < 1.0) {
            failures.push(format!("{a} /{r} c={c}: {errors} errors"));
        }
    }
    if let Some(m) = &multi {
        for ((c, w), ss) in m {
            let errors: u64 = ss.iter().map(|s| s.errors).sum();
            if errors > 0 || ss.iter().any(|s| s.requests < 1.0) {
                failures.push(format!("multi-worker w={w} c={c}: {errors} errors"));
            }
        }
    }
    eprintln!(
        "bench: finished in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("runs with errors or no requests: {}", failures.join("; ")).into())
    }
}

type MultiSamples = BTreeMap<(usize, usize), Vec<Sample>>; // (connections, workers)

/// The multi-worker example (`--workers N --port P`, env `REDIS_URL`) with 1, 2 and 4 workers
/// (`--multi-workers`) on
/// `/counter`; CPU is the launcher's whole process tree.
fn run_multi_worker(
    o: &Options,
    redis: &Redis,
    bin: &Path,
    tick_us: f64,
) -> Result<MultiSamples, Error> {
    let mut out: MultiSamples = BTreeMap::new();
    for round in 1..=o.rounds {
        for &workers in &o.multi_workers {
            let port = free_port()?;
            let child = Command::new(bin)
                .args([
                    "--workers",
                    &workers.to_string(),
                    "--port",
                    &port.to_string(),
                ])
                .env("REDIS_URL", redis.url())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()?;
            let mut proc = Proc {
                name: format!("multi-worker ({workers} workers)"),
                child,
            };
            let result = (|| -> Result<(), Error> {
                wait_http(&mut proc, port, "/counter")?;
                let cookies = make_sessions(port, "/counter", o.sessions)?;
                let script =
                    write_script(&redis.dir, &format!("multi{workers}"), &cookies, o.threads)?;
                for &conns in &o.connections {
                    let t = Target {
                        name: "multi",
                        port,
                        root_pid: proc.pid(),
                        tree: true,
                        script: &script,
                        herd_counter: false,
                    };
                    let s = measure(o, redis, &t, "counter", conns, o.duration, tick_us)?;
                    eprintln!(
                        "bench: round {round} multi-worker w={workers} c={conns} /counter {:>8.0} req/s  app {:>5.1} µs/req  errors {}",
                        s.rps, s.app_cpu_us, s.errors
                    );
                    out.entry((conns, workers)).or_default().push(s);
                }
                Ok(())
            })();
            // Graceful stop (SIGTERM) so the launcher stops its workers; SIGKILL on drop after that.
            let _ = Command::new("kill")
                .args(["-TERM", &proc.pid().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(proc.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            result?;
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Report

fn report(
    o: &Options,
    samples: &BTreeMap<Key, Vec<Sample>>,
    multi: Option<&MultiSamples>,
    took: Duration,
) -> String {
    let mut s = String::new();
    let mode = if o.smoke { "smoke" } else { "full" };
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    s += &format!(
        "## herd benchmark ({mode}): {} round(s) × {} s per app, route and connection count, interleaved; wrk -t{}; {} sessions per app; {cpus} CPUs; took {:.0} s\n\n",
        o.rounds, o.duration, o.threads, o.sessions, took.as_secs_f64()
    );
    // Per-round ratio to the route's reference, then the median over rounds (adjacent runs share the
    // machine's state, so the ratio is steadier than either figure).
    let ratio = |key: &Key, against: &str, f: &dyn Fn(&Sample) -> f64| -> f64 {
        let (c, r, _) = key;
        let (Some(a), Some(b)) = (
            samples.get(key),
            samples.get(&(*c, r.clone(), against.to_owned())),
        ) else {
            return f64::NAN;
        };
        median(a.iter().zip(b).map(|(x, y)| f(x) / f(y)).collect())
    };
    s += "| conns | route | app | req/s (median) | min–max | ratio to ref | p50 ms | p99 ms | errors | app CPU µs/req | Redis CPU µs/req | Redis cmds/req | herd round trips/req |\n";
    s += "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|\n";
    for (key, ss) in samples {
        let (c, r, a) = key;
        let rps: Vec<f64> = ss.iter().map(|x| x.rps).collect();
        let lo = rps.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = rps.iter().copied().fold(0.0, f64::max);
        let reference = reference(r);
        let ratio_text = if a == reference {
            "1.00 (ref)".to_owned()
        } else {
            format!("{:.2}× {reference}", ratio(key, reference, &|x| x.rps))
        };
        let mut cmds: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for x in ss {
            for (k, v) in &x.breakdown {
                cmds.entry(k.clone()).or_default().push(*v);
            }
        }
        let breakdown: Vec<String> = cmds
            .iter()
            .map(|(k, v)| format!("{k} {:.2}", median(v.clone())))
            .collect();
        let total = median(ss.iter().map(|x| x.redis_calls).collect());
        let rt = median(ss.iter().filter_map(|x| x.herd_round_trips).collect());
        s += &format!(
            "| {c} | /{r} | {a} | {:.0} | {lo:.0}–{hi:.0} | {ratio_text} | {:.2} | {:.2} | {} | {:.1} | {:.1} | {:.2}{} | {} |\n",
            median(rps.clone()),
            median(ss.iter().map(|x| x.p50_us / 1000.0).collect()),
            median(ss.iter().map(|x| x.p99_us / 1000.0).collect()),
            ss.iter().map(|x| x.errors).sum::<u64>(),
            median(ss.iter().map(|x| x.app_cpu_us).collect()),
            median(ss.iter().map(|x| x.redis_cpu_us).collect()),
            total.max(0.0),
            if breakdown.is_empty() { String::new() } else { format!(" ({})", breakdown.join(", ")) },
            if rt.is_nan() { "–".into() } else { format!("{rt:.2}") },
        );
    }

    s += "\n### Targets (herd, ratios of req/s in the same run: median of per-round ratios)\n\n";
    s += "| target | conns | reached | req/s ratio | app CPU/req ratio | met |\n|---|---:|---:|---:|---:|---|\n";
    let targets: [(&str, &str, &str, f64); 5] = [
        (
            "counter via incr ≥ 0.95× limit (HINCRBY+EXPIRE)",
            "counter",
            "limit",
            0.95,
        ),
        (
            "counter via incr ≥ 1.6× tower-sessions",
            "counter",
            "tower-sessions",
            1.6,
        ),
        ("read-then-write ≥ 1.0× GET+SET", "rmw", "getset", 1.0),
        ("read-only ≥ 1.0× limit (HGETALL)", "read", "limit", 1.0),
        (
            "cookie, session untouched ≥ 0.95× plain axum",
            "untouched",
            "plain",
            0.95,
        ),
    ];
    for &c in &o.connections {
        // Observability: herd with metrics enabled against herd without, per route.
        for route in ROUTES {
            let key = (c, route.to_owned(), "herd-observed".to_owned());
            if samples.contains_key(&key)
                && samples.contains_key(&(c, route.to_owned(), "herd".to_owned()))
            {
                let r = ratio(&key, "herd", &|x| x.rps);
                let cpu = ratio(&key, "herd", &|x| x.app_cpu_us);
                s += &format!(
                    "| /{route}: metrics enabled costs < 3% (herd-observed ≥ 0.97× herd) | {c} | {r:.2}× | goal 0.97× | {cpu:.2}× | {} |\n",
                    if r >= 0.97 { "yes" } else { "**no**" }
                );
            }
        }
        // The rate limiter's cost: herd's /limited (the limiter in front of /untouched) against
        // /untouched, round by round.
        let (limited, untouched) = (
            samples.get(&(c, "limited".to_owned(), "herd".to_owned())),
            samples.get(&(c, "untouched".to_owned(), "herd".to_owned())),
        );
        if let (Some(l), Some(u)) = (limited, untouched) {
            let r = median(l.iter().zip(u).map(|(x, y)| x.rps / y.rps).collect());
            let cpu = median(
                l.iter()
                    .zip(u)
                    .map(|(x, y)| x.app_cpu_us / y.app_cpu_us)
                    .collect(),
            );
            let extra = median(
                l.iter()
                    .zip(u)
                    .map(|(x, y)| x.app_cpu_us - y.app_cpu_us)
                    .collect(),
            );
            s += &format!(
                "| rate limit: /limited vs /untouched (herd; +{extra:.1} app CPU µs/req) | {c} | {r:.2}× | – | {cpu:.2}× | – |\n"
            );
        }
        for (name, route, against, goal) in targets {
            let key = (c, route.to_owned(), "herd".to_owned());
            if !samples.contains_key(&key)
                || !samples.contains_key(&(c, route.to_owned(), against.to_owned()))
            {
                continue;
            }
            let r = ratio(&key, against, &|x| x.rps);
            let cpu = ratio(&key, against, &|x| x.app_cpu_us);
            s += &format!(
                "| {name} | {c} | {r:.2}× | goal {goal:.2}× | {cpu:.2}× | {} |\n",
                if r >= goal { "yes" } else { "**no**" }
            );
        }
        // Against the floor with herd's guarantees (signed cookie, checked writes): what herd's
        // abstractions cost on top of what its guarantees cost. Informational, no goal.
        for route in ["counter", "read", "rmw"] {
            let key = (c, route.to_owned(), "herd".to_owned());
            if samples.contains_key(&key)
                && samples.contains_key(&(c, route.to_owned(), "checked".to_owned()))
            {
                let r = ratio(&key, "checked", &|x| x.rps);
                let cpu = ratio(&key, "checked", &|x| x.app_cpu_us);
                let redis = ratio(&key, "checked", &|x| x.redis_cpu_us);
                s += &format!(
                    "| /{route} vs checked, the floor with herd's guarantees (Redis CPU/req {redis:.2}×) | {c} | {r:.2}× | – | {cpu:.2}× | – |\n"
                );
            }
        }
        for route in ROUTES {
            if let Some(ss) = samples.get(&(c, route.to_owned(), "herd".to_owned())) {
                let rt = median(ss.iter().filter_map(|x| x.herd_round_trips).collect());
                let budget = herd_budget(route);
                s += &format!(
                    "| /{route}: herd round trips/req = budget {budget:.0} | {c} | {rt:.2} | – | – | {} |\n",
                    if (rt - budget).abs() < 0.01 { "yes" } else { "**no**" }
                );
            }
        }
    }

    if let Some(m) = multi {
        s += "\n### Multi-worker example, /counter (CPU = launcher + workers)\n\n";
        s += "| conns | workers | req/s (median) | min–max | p99 ms | errors | app CPU µs/req | Redis CPU µs/req | Redis cmds/req |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
        for ((c, w), ss) in m {
            let rps: Vec<f64> = ss.iter().map(|x| x.rps).collect();
            s += &format!(
                "| {c} | {w} | {:.0} | {:.0}–{:.0} | {:.2} | {} | {:.1} | {:.1} | {:.2} |\n",
                median(rps.clone()),
                rps.iter().copied().fold(f64::INFINITY, f64::min),
                rps.iter().copied().fold(0.0, f64::max),
                median(ss.iter().map(|x| x.p99_us / 1000.0).collect()),
                ss.iter().map(|x| x.errors).sum::<u64>(),
                median(ss.iter().map(|x| x.app_cpu_us).collect()),
                median(ss.iter().map(|x| x.redis_cpu_us).collect()),
                median(ss.iter().map(|x| x.redis_calls).collect()),
            );
        }
    } else {
        s += "\n(multi-worker example: not run in this run — pass `--multi-worker-bin target/release/examples/multi_worker`)\n";
    }
    s
}
