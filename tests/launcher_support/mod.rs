//! Helpers for the launcher tests: build the example, spawn masters, plain HTTP over fresh
//! connections, process inspection, and guards that kill everything on drop.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use herd::launcher::{request, Request, Status};

// Every test binary that uses these helpers also has `mod support;` (the harness).
pub use crate::support::example_bin::example_bin;

/// Tests spawn several processes each and two measure times: run them one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn herd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_herd"))
}

/// `target/<profile>/examples/launcher_hello`, built once with the same profile as this test.
pub fn hello_bin() -> PathBuf {
    example_bin("launcher_hello")
}

/// A port that is free now, chosen below the usual ephemeral range (32768+) so that the many
/// client connections of the load threads cannot take it before the server binds it. Masters
/// started by [`Master`] bind port 0 instead and report the real port in their status.
/// Whether an external tool that some tests drive (not Redis, which every test needs and which is
/// never optional) may be used: `true` when `program` runs; otherwise, `false` with a note on
/// stderr saying which test part is skipped and how to install it — unless `HERD_TEST_STRICT=1`
/// (CI sets it), which makes a missing tool a failure.
pub fn optional_tool(program: &str, probe: &[&str], install: &str, what: &str) -> bool {
    let found = Command::new(program)
        .args(probe)
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return true;
    }
    let strict = std::env::var("HERD_TEST_STRICT").is_ok_and(|v| v == "1");
    assert!(
        !strict,
        "{program} is needed by {what}: {install} (HERD_TEST_STRICT=1 makes this a failure)"
    );
    eprintln!("NOTE: {program} is not installed: {what} is skipped ({install}; CI runs it)");
    false
}

pub fn free_port() -> u16 {
    let start = 20000 + (std::process::id() % 10000) as u16;
    (0..10000)
        .map(|i| 20000 + (start - 20000 + i) % 12000)
        .find(|&port| TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("free port")
}

/// One GET over a fresh connection; the body on 200.
pub fn get(port: u16, path: &str) -> Result<String, String> {
    get_timeout(port, path, Duration::from_secs(10))
}

pub fn get_timeout(port: u16, path: &str, timeout: Duration) -> Result<String, String> {
    let mut stream = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().expect("addr"),
        Duration::from_secs(2),
    )
    .map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(timeout)).ok();
    stream.set_write_timeout(Some(timeout)).ok();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("bad response {response:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("status: {head}"));
    }
    Ok(body.to_owned())
}

/// `pid=.. index=.. generation=..` of the hello example.
pub fn field(body: &str, name: &str) -> Option<u64> {
    body.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn alive(pid: u32) -> bool {
    // A zombie is not running anymore.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Pids whose parent is `ppid`.
pub fn children_of(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            if let Some((_, rest)) = stat.rsplit_once(')') {
                let fields: Vec<&str> = rest.split_whitespace().collect();
                if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(ppid)
                    && fields.first() != Some(&"Z")
                {
                    out.push(pid);
                }
            }
        }
    }
    out
}

/// Zombie children of `ppid` (exited, not reaped).
pub fn zombies_of(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            if let Some((_, rest)) = stat.rsplit_once(')') {
                let fields: Vec<&str> = rest.split_whitespace().collect();
                if fields.first() == Some(&"Z")
                    && fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(ppid)
                {
                    out.push(pid);
                }
            }
        }
    }
    out
}

/// Number of threads of `pid`.
pub fn threads_of(pid: u32) -> Option<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Threads:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn pgid_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(2)?.parse().ok()
}

pub fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status();
}

/// A master process (the example or `herd run`), its captured output, and everything it started.
pub struct Master {
    pub child: Child,
    pub socket: PathBuf,
    port: u16,
    pub output: Arc<Mutex<Vec<String>>>,
    /// The master's stderr lines only (also in `output`).
    pub stderr: Arc<Mutex<Vec<String>>>,
    pub seen: Arc<Mutex<HashSet<u32>>>,
    _dir: tempfile::TempDir,
    exited: Option<ExitStatus>,
}

impl Master {
    /// Start `herd run ARGS -- PROGRAM...` with a control socket in a temp dir.
    pub fn herd_run(herd_args: &[&str], program: &[&str]) -> Master {
        Master::herd_run_env(herd_args, program, &[])
    }

    /// [`herd_run`](Self::herd_run) with extra environment for the master.
    pub fn herd_run_env(herd_args: &[&str], program: &[&str], env: &[(&str, &str)]) -> Master {
        let port = 0;
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("control.sock");
        let mut cmd = Command::new(herd_bin());
        cmd.arg("run")
            .args(["--bind", &format!("127.0.0.1:{port}")])
            .arg("--socket")
            .arg(&socket)
            .args(herd_args)
            .arg("--")
            .args(program);
        Master::start_with(cmd, socket, port, dir, env)
    }

    /// Start the example as its own master (library mode), `workers` workers.
    pub fn hello(workers: usize) -> Master {
        let port = 0;
        let dir = tempfile::tempdir().expect("tempdir");
        // Library mode derives the socket from the name; a private XDG_RUNTIME_DIR isolates it.
        let socket = dir.path().join("herd").join("launcher_hello.sock");
        let mut cmd = Command::new(hello_bin());
        cmd.arg(format!("127.0.0.1:{port}"))
            .arg(workers.to_string())
            .env("XDG_RUNTIME_DIR", dir.path());
        Master::start_with(cmd, socket, port, dir, &[])
    }

    fn start_with(
        mut cmd: Command,
        socket: PathBuf,
        port: u16,
        dir: tempfile::TempDir,
        env: &[(&str, &str)],
    ) -> Master {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("HERD_SECRET")
            .env_remove("LISTEN_FDS")
            .env_remove("NOTIFY_SOCKET");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn master");
        let output = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        for (stream, only) in [
            (
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn Read + Send>),
                None,
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn Read + Send>),
                Some(stderr.clone()),
            ),
        ] {
            let Some(stream) = stream else { continue };
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("HERD_TEST_VERBOSE").is_some() {
                        eprintln!("  | {line}");
                    }
                    if let Some(only) = &only {
                        only.lock().unwrap().push(line.clone());
                    }
                    output.lock().unwrap().push(line);
                }
            });
        }
        Master {
            child,
            socket,
            port,
            output,
            stderr,
            seen: Arc::default(),
            _dir: dir,
            exited: None,
        }
    }

    /// The port the master bound; panics before [`wait_online`](Self::wait_online).
    pub fn port(&self) -> u16 {
        assert_ne!(self.port, 0, "the port is known after wait_online");
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    pub fn status(&self) -> Option<Status> {
        let r = request(&self.socket, &Request::Status, Duration::from_secs(5)).ok()?;
        r.status
    }

    /// Wait until `n` workers are online (no starting/draining rows), return the status.
    /// [`wait_online`](Self::wait_online), then the workers' pids.
    pub fn online_pids(&mut self, n: usize, timeout: Duration) -> Vec<u32> {
        self.wait_online(n, timeout)
            .workers
            .iter()
            .filter_map(|w| w.pid)
            .collect()
    }

    pub fn wait_online(&mut self, n: usize, timeout: Duration) -> Status {
        let status = wait_until(&format!("{n} workers online"), timeout, || {
            self.assert_running();
            let s = self.status()?;
            let online = s.workers.iter().filter(|w| w.state == "online").count();
            (online == n && s.workers.len() == n && !s.reloading).then_some(s)
        });
        self.remember(&status);
        self.port = status
            .listen
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .expect("port in status");
        status
    }

    pub fn remember(&self, status: &Status) {
        let mut seen = self.seen.lock().unwrap();
        seen.extend(status.workers.iter().filter_map(|w| w.pid));
    }

    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            self.exited = Some(status);
            panic!("master exited early ({status}); output:\n{}", self.output());
        }
    }

    /// Wait for the master to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(status);
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "master did not exit; output:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        if self.exited.is_none() {
            if let Ok(None) = self.child.try_wait() {
                let mut seen = self.seen.lock().unwrap();
                seen.extend(children_of(self.child.id()));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for pid in self.seen.lock().unwrap().iter() {
            if alive(*pid) {
                kill(*pid, "KILL");
            }
        }
        if std::thread::panicking() {
            eprintln!("--- master output ---\n{}", self.output());
        }
    }
}

/// Threads hammering `path` over fresh connections until stopped; counts oks and failures.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicUsize>,
    pub failed: Arc<AtomicUsize>,
    pub errors: Arc<Mutex<Vec<String>>>,
    pub pids: Arc<Mutex<HashSet<u64>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    pub fn start(port: u16, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let pids = Arc::new(Mutex::new(HashSet::new()));
        let threads = (0..threads)
            .map(|_| {
                let (stop, ok, failed, errors, pids) = (
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                    errors.clone(),
                    pids.clone(),
                );
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match get(port, "/") {
                            Ok(body) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                if let Some(pid) = field(&body, "pid") {
                                    pids.lock().unwrap().insert(pid);
                                }
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                errors.lock().unwrap().push(e);
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            errors,
            pids,
            threads,
        }
    }

    /// Stop and return (ok, failed).
    pub fn finish(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A child process killed and reaped when the guard drops (a failed assertion included).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
