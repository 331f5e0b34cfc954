//! Test harness: a private `redis-server` per test (or per test file), on a free loopback port.
//!
//! * starts `redis-server` with `--save "" --appendonly no`, its log in a temp dir, waits for `PING`;
//! * fails (never skips) with an install hint when `redis-server` is not on `PATH`;
//! * kills and reaps the server on drop, and prints its log when the test is failing;
//! * can stop, restart (same port), freeze (`SIGSTOP`) and thaw (`SIGCONT`) the server for fault tests;
//! * gives each test its own key prefix ([`unique_prefix`]).
//!
//! Set `HERD_TEST_REDIS_SERVER` to use another `redis-server` binary.
#![allow(dead_code, unreachable_pub)]

pub mod cluster;
pub mod example_bin;
pub mod sentinel;
pub mod tls;
pub mod topology;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A `redis-server` owned by one test.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    extra_args: Vec<String>,
}

fn server_binary() -> String {
    std::env::var("HERD_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

impl RedisServer {
    /// Starts a server with the default test settings.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments (e.g. `["--maxmemory", "1mb"]`).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let extra_args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut last_err = String::new();
        // A free port can be taken between our probe and the server's bind: try a few.
        for _ in 0..5 {
            let mut extra_args = extra_args.clone();
            // A cluster node's bus port defaults to its port + 10000: over 65535 (Redis refuses to
            // start) for a fifth of the ephemeral ports, and possibly taken. Pick it free as well.
            if extra_args.iter().any(|a| a == "--cluster-enabled")
                && !extra_args.iter().any(|a| a == "--cluster-port")
            {
                extra_args.extend(["--cluster-port".to_owned(), free_port().to_string()]);
            }
            let mut server = RedisServer {
                port: free_port(),
                child: None,
                dir: tempfile::tempdir().expect("temp dir"),
                extra_args,
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last_err = e,
            }
        }
        panic!("could not start redis-server: {last_err}");
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn spawn(&mut self) -> Result<(), String> {
        let port = self.port.to_string();
        let log = self.log_path();
        let mut cmd = Command::new(server_binary());
        cmd.args([
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--dir", &self.dir.path().to_string_lossy()])
        .args(["--logfile", &log.to_string_lossy()])
        .args(["--daemonize", "no", "--protected-mode", "no"])
        .args(&self.extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "`{}` was not found on PATH. herd's tests need a real Redis server: install it with \
                 `sudo apt-get install redis-server` (Debian/Ubuntu), `brew install redis` (macOS), or \
                 point HERD_TEST_REDIS_SERVER at a redis-server binary.",
                server_binary()
            ),
            Err(e) => return Err(format!("spawn failed: {e}")),
        };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("redis-server exited with {status}: {}", self.log()));
                }
            }
            if self.ping() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        Err(format!(
            "redis-server did not answer PING within 10 s: {}",
            self.log()
        ))
    }

    fn ping(&self) -> bool {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok()
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A synchronous connection for assertions.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .unwrap_or_else(|e| panic!("cannot connect to the test redis-server: {e}"))
    }

    /// Runs one command and returns its reply.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut self.conn())
            .unwrap_or_else(|e| panic!("{args:?} failed: {e}"))
    }

    /// Number of keys in db 0.
    pub fn dbsize(&self) -> i64 {
        self.cmd(&["DBSIZE"])
    }

    /// Keys matching a pattern (tests only: KEYS is fine on a private server).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        self.cmd(&["KEYS", pattern])
    }

    /// `INFO commandstats` as command → calls (`hgetall` → 3, ...).
    pub fn command_calls(&self) -> HashMap<String, u64> {
        let info: String = self.cmd(&["INFO", "commandstats"]);
        info.lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("cmdstat_")?;
                let (name, stats) = rest.split_once(':')?;
                let calls = stats
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("calls="))?
                    .parse()
                    .ok()?;
                Some((name.to_owned(), calls))
            })
            .collect()
    }

    /// Resets `INFO commandstats`.
    pub fn reset_stats(&self) {
        let _: () = self.cmd(&["CONFIG", "RESETSTAT"]);
    }

    /// Kills the server (SIGKILL) and reaps it. The port stays reserved for [`restart`](Self::restart).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (after [`kill`](Self::kill)); data is gone.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("restart failed: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Thaws a frozen server (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.pid().expect("server not running").to_string();
        let status = Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill(1)");
        assert!(status.success(), "kill {sig} {pid} failed");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- redis-server log (port {}) ----\n{}---- end of redis-server log ----",
                self.port,
                self.log()
            );
        }
        if let Some(child) = self.child.as_ref() {
            // A frozen server ignores SIGTERM but not SIGKILL; SIGCONT first anyway so it can die cleanly.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}

/// A key prefix no other test uses (tests of one file share a process; servers may be shared too).
pub fn unique_prefix(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        name
    )
}

/// A herd config pointing at `server`, with a unique prefix.
pub fn config(server: &RedisServer, name: &str) -> herd::Config {
    config_at(&server.url(), name)
}

/// A herd config pointing at `url`, with a unique prefix and short timeouts.
pub fn config_at(url: &str, name: &str) -> herd::Config {
    herd::Config::builder()
        .redis_url(url)
        .prefix(unique_prefix(name))
        .command_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_millis(500))
        .pool_wait_timeout(Duration::from_millis(500))
        .build()
        .expect("test config")
}

/// The cookie key of the tests' session layers: 64 fixed bytes, [`test_secret`] decoded.
pub fn test_key() -> herd::cookie::Key {
    herd::cookie::Key::from(&[42u8; 64])
}

/// A fixed base64 secret of 64 bytes for tests (`HERD_SECRET` of the processes they start).
pub fn test_secret() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode([42u8; 64])
}

impl RedisServer {
    /// Closes every client connection of the server (`CLIENT KILL TYPE normal`), as a network cut
    /// would. Returns how many were closed.
    pub fn kill_clients(&self) -> i64 {
        self.cmd(&["CLIENT", "KILL", "TYPE", "normal"])
    }

    /// Makes the server a replica of a dead address: it stays up and answers reads, writes fail
    /// with `READONLY`. Undo with [`make_writable`](Self::make_writable).
    pub fn make_read_only(&self) {
        let _: () = self.cmd(&["REPLICAOF", "127.0.0.1", "1"]);
    }

    /// Undoes [`make_read_only`](Self::make_read_only).
    pub fn make_writable(&self) {
        let _: () = self.cmd(&["REPLICAOF", "NO", "ONE"]);
    }
}

/// A TCP proxy between the app and Redis that can add latency to every reply, to simulate a slow
/// network or an overloaded server. Runs on its own threads; stops when dropped.
pub struct LatencyProxy {
    port: u16,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl LatencyProxy {
    /// Starts a proxy on a free loopback port forwarding to `127.0.0.1:target_port`.
    pub fn start(target_port: u16) -> LatencyProxy {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (delay_ms.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target_port))
                        else {
                            continue;
                        };
                        let (c2, s2) = (
                            client.try_clone().expect("clone"),
                            server.try_clone().expect("clone"),
                        );
                        let stop = s.clone();
                        std::thread::spawn(move || pump(client, server, None, &stop));
                        let (delay, stop) = (d.clone(), s.clone());
                        std::thread::spawn(move || pump(s2, c2, Some(&delay), &stop));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        LatencyProxy {
            port,
            delay_ms,
            stop,
        }
    }

    /// `redis://127.0.0.1:PROXY_PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Delay added before each chunk of bytes from Redis reaches the app.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    delay_ms: Option<&std::sync::atomic::AtomicU64>,
    stop: &std::sync::atomic::AtomicBool,
) {
    use std::io::{Read, Write};
    let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(d) = delay_ms {
                    let ms = d.load(Ordering::Relaxed);
                    if ms > 0 {
                        std::thread::sleep(Duration::from_millis(ms));
                    }
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}
