//! Smoke tests of the examples, so that they cannot rot: `counter` and `bank` run as the user runs
//! them, against a harness Redis given by `REDIS_URL`, and their answers and output are checked.
//! Without `REDIS_URL` and with nothing on 127.0.0.1:6379 they start a private `redis-server`;
//! that path runs in an empty network namespace (`unshare -rn`, only a loopback), so that no
//! test ever talks to a Redis on the machine's 6379.
//!
//! The examples are built first with `cargo build --example …` and this test binary's own
//! features and profile: a no-op after `cargo test` (which builds them), and never a stale binary
//! when only this file is run.

mod support;

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::RedisServer;

/// The path of example `name`, built from the current sources (see `support::example_bin`).
fn example(name: &str) -> PathBuf {
    support::example_bin::example_bin(name)
}

/// A free loopback port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A running `counter`, stopped (SIGKILL) on drop if the test did not stop it.
struct Counter {
    child: Child,
    lines: mpsc::Receiver<String>,
    output: Vec<String>,
    base: String,
}

impl Counter {
    fn start(redis_url: &str) -> Counter {
        let port = free_port();
        let mut child = Command::new(example("counter"))
            .env("REDIS_URL", redis_url)
            .env("ADDR", format!("127.0.0.1:{port}"))
            .env("HERD_SECRET", support::test_secret())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the counter example");
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        let mut counter = Counter {
            child,
            lines,
            output: Vec::new(),
            base: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !counter
            .output
            .iter()
            .any(|l| l.contains("counter: listening on http://127.0.0.1:"))
        {
            let left = deadline.saturating_duration_since(Instant::now());
            match counter.lines.recv_timeout(left) {
                Ok(line) => counter.output.push(line),
                Err(_) => panic!("counter did not start in 30 s: {:?}", counter.output),
            }
        }
        counter
    }

    /// SIGTERM, then the exit code (waiting at most `within`).
    fn stop(&mut self, within: Duration) -> Option<i32> {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill(1)");
        assert!(status.success());
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                self.output.extend(self.lines.try_iter());
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn counter_counts_per_visitor_on_the_redis_at_redis_url() {
    let server = RedisServer::start();
    let mut counter = Counter::start(&server.url());
    let visitor = || {
        reqwest::Client::builder()
            .cookie_store(true)
            .timeout(Duration::from_secs(10))
            .build()
            .expect("http client")
    };
    let (alice, bob) = (visitor(), visitor());
    for (client, expected) in [(&alice, 1), (&alice, 2), (&bob, 1), (&alice, 3)] {
        let res = client.get(&counter.base).send().await.expect("request");
        assert_eq!(res.status(), reqwest::StatusCode::OK);
        assert_eq!(
            res.text().await.expect("body"),
            format!("You have been here {expected} time(s).\n")
        );
    }
    // Two sessions, in the harness Redis, under the default prefix.
    let mut counts: Vec<String> = server
        .keys("herd:s:*")
        .iter()
        .map(|k| server.cmd(&["HGET", k, "counter"]))
        .collect();
    counts.sort();
    assert_eq!(counts, ["1", "3"]);

    let code = counter.stop(Duration::from_secs(10));
    assert_eq!(
        code,
        Some(0),
        "SIGTERM must stop it cleanly: {:?}",
        counter.output
    );
    let text = counter.output.join("\n");
    assert!(!text.contains("private redis-server"), "{text}");
    assert!(!text.contains("HERD_SECRET is not set"), "{text}");
}

#[test]
fn counter_with_nothing_at_redis_url_says_so_and_starts_nothing() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let out = Command::new(example("counter"))
        .env("REDIS_URL", &url)
        .env("ADDR", format!("127.0.0.1:{}", free_port()))
        .env("HERD_SECRET", support::test_secret())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run counter");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must fail: {stdout}{stderr}");
    assert!(
        stderr.contains("counter: no answer from the Redis at REDIS_URL"),
        "{stderr}"
    );
    assert!(!stdout.contains("private redis-server"), "{stdout}");
}

#[test]
fn bank_keeps_the_total_on_the_redis_at_redis_url() {
    let server = RedisServer::start();
    let out = Command::new(example("bank"))
        .env("REDIS_URL", server.url())
        .output()
        .expect("run bank");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bank failed: {stdout}{stderr}");
    for line in [
        "opened: [Some(100), Some(50), Some(0)]",
        "refused: carol has 0 and cannot pay 500",
        "total: 150 (always 150)",
    ] {
        assert!(stdout.contains(line), "`{line}` missing: {stdout}");
    }
    // "N transfers, R refused for insufficient funds, B gave up after conflicts": 8 × 200 tries.
    let tally = stdout
        .lines()
        .find(|l| l.contains(" transfers, "))
        .unwrap_or_else(|| panic!("no tally: {stdout}"));
    let numbers: Vec<u64> = tally
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    assert_eq!(numbers.len(), 3, "{tally}");
    assert_eq!(numbers.iter().sum::<u64>(), 1600, "{tally}");
    assert!(numbers[0] > 0, "no transfer went through: {tally}");
    // It ran on this Redis (WATCH/EXEC), and closed its accounts at the end.
    let calls = server.command_calls();
    assert!(
        calls.get("watch").copied().unwrap_or(0) >= numbers[0],
        "{calls:?}"
    );
    assert!(
        calls.get("exec").copied().unwrap_or(0) >= numbers[0],
        "{calls:?}"
    );
    assert!(server.keys("bank-example:*").is_empty());
    assert!(!stdout.contains("private redis-server"), "{stdout}");
}

/// Runs `script` with `sh` in a fresh network namespace (only a loopback: nothing answers on
/// 127.0.0.1:6379 there), with `$COUNTER` and `$BANK` set to the examples and no `REDIS_URL`.
fn in_empty_network(script: &str) -> (bool, String) {
    let out = Command::new("unshare")
        .args(["-rn", "sh", "-c", &format!("ip link set lo up\n{script}")])
        .env("COUNTER", example("counter"))
        .env("BANK", example("bank"))
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

/// The port of the private server named in an example's line, and whether a redis-server with
/// that port is still running.
fn private_server_left(out: &str) -> (String, bool) {
    let port = out
        .split("a private redis-server runs on redis://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("the example must say it started a private Redis: {out}"))
        .to_owned();
    std::thread::sleep(Duration::from_millis(300));
    let running = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|cmd| {
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                cmd.contains("redis-server") && cmd.contains(&format!("--port {port} "))
            })
        });
    (port, running)
}

#[test]
fn without_redis_url_and_nothing_on_6379_the_examples_start_a_private_redis() {
    let (ok, out) = in_empty_network(
        r#"
        ADDR=127.0.0.1:3000 HERD_SECRET="$SECRET" "$COUNTER" &
        pid=$!
        jar=$(mktemp)
        for i in $(seq 1 300); do
            curl -sf -c "$jar" -b "$jar" localhost:3000/ && break
            sleep 0.1
        done
        curl -sf -c "$jar" -b "$jar" localhost:3000/
        rm -f "$jar"
        kill -TERM $pid
        wait $pid
        echo "counter exit=$?"
        "#
        .replace("$SECRET", &support::test_secret())
        .as_str(),
    );
    assert!(ok, "{out}");
    assert!(out.contains("You have been here 1 time(s)."), "{out}");
    assert!(out.contains("You have been here 2 time(s)."), "{out}");
    assert!(out.contains("counter exit=0"), "{out}");
    let private_lines = out
        .lines()
        .filter(|l| l.contains("private redis-server"))
        .count();
    assert_eq!(
        private_lines, 1,
        "one clear line about the private Redis: {out}"
    );
    let (port, left) = private_server_left(&out);
    assert!(!left, "the private redis-server on {port} outlived counter");

    let (ok, out) = in_empty_network(r#""$BANK""#);
    assert!(ok, "{out}");
    assert!(out.contains("total: 150 (always 150)"), "{out}");
    let (port, left) = private_server_left(&out);
    assert!(!left, "the private redis-server on {port} outlived bank");

    // No Redis anywhere and no redis-server to start: a sentence saying what to do.
    let (ok, out) = in_empty_network(r#"PATH=/nonexistent exec "$COUNTER""#);
    assert!(!ok, "must fail without Redis: {out}");
    assert!(
        out.contains(
            "counter: no Redis answers on 127.0.0.1:6379 and redis-server is not installed"
        ) && out.contains("REDIS_URL"),
        "{out}"
    );
}
