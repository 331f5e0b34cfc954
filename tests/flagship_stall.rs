//! The flagship's `/stall` route and the launcher's hang timeout, black-box: a worker whose
//! runtime is blocked on every thread stops its heartbeat and is replaced while the other workers
//! serve. Real processes, a harness Redis.
#![cfg(all(unix, feature = "cli"))]

mod launcher_support;
mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use herd::launcher::{request, Request, Status};
use launcher_support::{alive, example_bin, get_timeout, serial, wait_until};
use support::RedisServer;

/// The example as its own master, with its control socket in a private `XDG_RUNTIME_DIR`.
struct Flagship {
    child: Child,
    port: u16,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Flagship {
    fn start(redis: &RedisServer, workers: usize, hang_timeout: &str) -> Flagship {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new(example_bin("multi_worker"))
            .args([
                "--workers",
                &workers.to_string(),
                "--port",
                &port.to_string(),
            ])
            .env("REDIS_URL", redis.url())
            .env("HERD_PREFIX", support::unique_prefix("stall"))
            .env("HERD_HANG_TIMEOUT", hang_timeout)
            .env("XDG_RUNTIME_DIR", dir.path())
            .env("RUST_LOG", "warn")
            .env_remove("HERD_SECRET")
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the example");
        let socket = dir
            .path()
            .join("herd")
            .join(format!("multi_worker-{port}.sock"));
        let f = Flagship {
            child,
            port,
            socket,
            _dir: dir,
        };
        wait_until("every worker online", Duration::from_secs(60), || {
            let s = f.status()?;
            (s.workers.len() == workers && s.workers.iter().all(|w| w.state == "online"))
                .then_some(())
        });
        f
    }

    fn status(&self) -> Option<Status> {
        request(&self.socket, &Request::Status, Duration::from_secs(5))
            .ok()?
            .status
    }
}

impl Drop for Flagship {
    fn drop(&mut self) {
        let pids: Vec<u32> = self
            .status()
            .map(|s| s.workers.iter().filter_map(|w| w.pid).collect())
            .unwrap_or_default();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in pids {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// One GET on a kept-alive connection: the status code and the body.
fn get_on(stream: &mut TcpStream, path: &str) -> std::io::Result<(u16, String)> {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let code = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut length = 0;
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

fn pid_of(body: &str) -> u32 {
    let v: serde_json::Value = serde_json::from_str(body).expect("json");
    v["pid"].as_u64().expect("pid") as u32
}

#[test]
fn stall_answers_and_refuses_bad_input() {
    let _serial = serial();
    let redis = RedisServer::start();
    let f = Flagship::start(&redis, 2, "30");
    let mut conn = TcpStream::connect(("127.0.0.1", f.port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    for bad in [
        "/stall",
        "/stall?ms=60001",
        "/stall?ms=-1",
        "/stall?ms=abc",
        "/stall?ms=1.5",
    ] {
        let (code, body) = get_on(&mut conn, bad).unwrap();
        assert_eq!(code, 400, "{bad}: {body}");
        assert!(body.contains("error"), "{bad}: {body}");
    }
    let (code, body) = get_on(&mut conn, "/stall?ms=0").unwrap();
    assert_eq!((code, body.as_str()), (200, r#"{"stalled":0}"#));
    // A short stall, well under the hang timeout: the worker lives and answers.
    let (_, before) = get_on(&mut conn, "/whoami").unwrap();
    let started = Instant::now();
    let (code, body) = get_on(&mut conn, "/stall?ms=300").unwrap();
    assert_eq!((code, body.as_str()), (200, r#"{"stalled":300}"#));
    assert!(started.elapsed() >= Duration::from_millis(300));
    let (_, after) = get_on(&mut conn, "/whoami").unwrap();
    assert_eq!(pid_of(&before), pid_of(&after), "same worker, still alive");
    let s = f.status().unwrap();
    assert!(s.workers.iter().all(|w| w.hangs == 0), "{s:?}");
}

#[test]
fn a_worker_stalled_20s_is_replaced_within_6s_while_the_others_serve() {
    let _serial = serial();
    let redis = RedisServer::start();
    let f = Flagship::start(&redis, 3, "3");
    // The stall goes to the worker that answered /whoami on the same connection.
    let mut conn = TcpStream::connect(("127.0.0.1", f.port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let (_, me) = get_on(&mut conn, "/whoami").unwrap();
    let victim = pid_of(&me);
    let slot = f
        .status()
        .unwrap()
        .workers
        .iter()
        .find(|w| w.pid == Some(victim))
        .expect("the victim's row")
        .index;
    let stalled = Instant::now();
    let stall = std::thread::spawn(move || get_on(&mut conn, "/stall?ms=20000"));
    // The stall request travels on an open connection and blocks the victim's threads as soon as
    // it is read; a fresh request sent before that may still be answered by the victim, which says
    // nothing about the hang. Half a second is far more than a loopback write and a handler start.
    std::thread::sleep(Duration::from_millis(500));
    // Fresh requests meanwhile, one at a time, until the replacement is online.
    let (mut served, mut failed) = (0, Vec::new());
    let replaced = loop {
        match get_timeout(f.port, "/whoami", Duration::from_secs(5)) {
            Ok(body) => {
                served += 1;
                assert_ne!(
                    pid_of(&body),
                    victim,
                    "a fresh request reached the stalled worker"
                );
            }
            Err(e) => failed.push(e),
        }
        let s = f.status().expect("status");
        let row = s.workers.iter().find(|w| w.index == slot).unwrap();
        if row.state == "online" && row.pid.is_some_and(|p| p != victim) {
            break (stalled.elapsed(), s);
        }
        assert!(
            stalled.elapsed() < Duration::from_secs(15),
            "not replaced after 15 s: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let (took, s) = replaced;
    wait_until("the stalled worker killed", Duration::from_secs(5), || {
        (!alive(victim)).then_some(())
    });
    let killed = stalled.elapsed();
    eprintln!(
        "MEASURE stall: 20 s stall, hang timeout 3 s -> replacement online after {took:?}, \
         stalled worker gone after {killed:?}; fresh requests meanwhile ok={served} failed={}",
        failed.len()
    );
    assert!(took < Duration::from_secs(6), "replaced after {took:?}");
    // The silence counts from the last heartbeat, up to one period (750 ms) before the stall.
    assert!(
        took >= Duration::from_millis(2250),
        "judged too early: {took:?}"
    );
    assert!(served > 0);
    assert!(failed.is_empty(), "fresh requests failed: {failed:?}");
    let row = s.workers.iter().find(|w| w.index == slot).unwrap();
    assert_eq!(row.hangs, 1, "{s:?}");
    // The stalled request dies with its worker: no answer.
    let answer = stall.join().unwrap();
    assert!(
        answer.is_err() || answer.as_ref().is_ok_and(|(c, _)| *c != 200),
        "{answer:?}"
    );
    assert!(
        stalled.elapsed() < Duration::from_secs(20),
        "the stall was not cut short"
    );
}
