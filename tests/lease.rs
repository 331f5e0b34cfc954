//! Leases against a real Redis: a reference model driven by proptest (acquire / renew / release /
//! expire programs), the background keeper, and OS processes competing for one lease
//! (`examples/lease_worker.rs`) through releases, a SIGKILLed holder, a SIGSTOPped holder, a Redis
//! restart, a rolling reload under the launcher, and a Redis Cluster.
//!
//! The processes share a log file; every check is made on it (see [`History`]):
//! * holding intervals never overlap: every `HOLD` instant of token `k` comes before every `HOLD`
//!   instant of the next token (each instant is taken before the holder checks it still holds);
//! * fencing: the fenced counter `work` gives each accepted write a unique number, and in that
//!   order the tokens never decrease; a write refused by token is what a late holder gets.

mod launcher_support;
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use herd::globals::{FencingToken, LeaseGuard};
use herd::{Globals, RedisClient};
use support::RedisServer;

const TTL_MS: u64 = 1000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

// ---------------------------------------------------------------------------------------------
// In one process.

async fn globals(server: &RedisServer, name: &str) -> Globals {
    let client = RedisClient::connect(support::config(server, name))
        .await
        .expect("connect");
    Globals::new(client)
}

#[tokio::test]
async fn tokens_increase_release_frees_at_once_and_renew_needs_the_token() {
    let server = RedisServer::start();
    let globals = globals(&server, "lease-basic").await;
    let lease = globals
        .lease("job", Duration::from_secs(30))
        .expect("lease");
    let a = lease.try_acquire().await.expect("acquire").expect("free");
    assert!(a.is_held());
    assert!(
        lease.try_acquire().await.expect("acquire").is_none(),
        "held"
    );
    assert_eq!(lease.holder().await.expect("holder"), Some(a.token()));
    let token_a = a.token();
    assert!(a.release().await.expect("release"));
    assert_eq!(lease.holder().await.expect("holder"), None);
    // Free at once, with a greater token.
    let mut b = lease.try_acquire().await.expect("acquire").expect("free");
    assert!(b.token() > token_a);
    assert!(b.renew().await.expect("renew"));
    // A token from elsewhere (a forged or stale one) renews nothing.
    let key = format!("{}:l:{{job}}", globals.prefix());
    server.cmd::<()>(&["DEL", &key]);
    assert!(!b.renew().await.expect("renew"), "renewed a lease it lost");
    assert!(!b.is_held());
    assert!(!b.release().await.expect("release"));
}

#[tokio::test]
async fn fenced_writes_refuse_an_older_token() {
    let server = RedisServer::start();
    let globals = globals(&server, "lease-fenced").await;
    let group = globals.group("jobs").expect("group");
    let old = FencingToken::new(10);
    let new = FencingToken::new(11);
    assert_eq!(group.incr_fenced("n", 1, old).await.expect("incr"), Some(1));
    assert_eq!(group.incr_fenced("n", 1, new).await.expect("incr"), Some(2));
    assert_eq!(group.incr_fenced("n", 1, old).await.expect("incr"), None);
    assert!(!group.set_fenced("n", &99, old).await.expect("set"));
    assert!(group.set_fenced("n", &7, new).await.expect("set"));
    assert_eq!(group.get::<i64>("n").await.expect("get"), Some(7));
    // A refused write changes nothing, and a failing one does not raise the mark.
    group.set("text", &"x").await.expect("set");
    let e = group
        .incr_fenced("text", 1, FencingToken::new(50))
        .await
        .expect_err("not an integer");
    assert!(matches!(e, herd::Error::NotAnInteger { .. }), "{e:?}");
    assert_eq!(
        group
            .incr_fenced("text", 0, FencingToken::new(49))
            .await
            .ok(),
        None
    );
    assert!(group
        .set_fenced("text", &"y", FencingToken::new(1))
        .await
        .expect("set"));
}

#[tokio::test]
async fn set_if_absent_writes_once() {
    let server = RedisServer::start();
    let globals = globals(&server, "lease-nx").await;
    let group = globals.group("g").expect("group");
    assert!(group.set_if_absent("v", &1).await.expect("nx"));
    assert!(!group.set_if_absent("v", &2).await.expect("nx"));
    assert_eq!(group.get::<i64>("v").await.expect("get"), Some(1));
    assert!(group
        .set_if_absent_with_ttl("t", &1, Duration::from_secs(60))
        .await
        .expect("nx"));
    let key = format!("{}:g:{{g}}:t", globals.prefix());
    let ttl: i64 = server.cmd(&["PTTL", &key]);
    assert!((1..=60_000).contains(&ttl), "{ttl}");
}

#[tokio::test]
async fn the_keeper_renews_and_reports_a_loss_and_a_release() {
    let server = RedisServer::start();
    let globals = globals(&server, "lease-keeper").await;
    let lease = globals
        .lease("kept", Duration::from_millis(300))
        .expect("lease");
    let kept = lease
        .try_acquire()
        .await
        .expect("acquire")
        .expect("free")
        .keep();
    // Renewed past several TTLs.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(kept.is_held());
    assert_eq!(lease.holder().await.expect("holder"), Some(kept.token()));
    // Taken away (as an expiry or a failover would): noticed at the next renewal.
    let key = format!("{}:l:{{kept}}", globals.prefix());
    server.cmd::<()>(&["DEL", &key]);
    let mut watch = kept.watch();
    tokio::time::timeout(Duration::from_secs(2), kept.lost())
        .await
        .expect("loss noticed within a renew interval (100 ms) plus slack");
    assert!(!kept.is_held());
    assert!(!*watch.borrow_and_update());
    assert!(!kept.release().await.expect("release"));
    // A release frees the lease at once.
    let kept = lease
        .try_acquire()
        .await
        .expect("acquire")
        .expect("free")
        .keep();
    assert!(kept.release().await.expect("release"));
    assert!(lease.try_acquire().await.expect("acquire").is_some());
}

#[tokio::test]
async fn run_exclusive_runs_one_job_at_a_time() {
    let server = RedisServer::start();
    let globals = globals(&server, "lease-exclusive").await;
    let lease = globals
        .lease("exclusive", Duration::from_millis(500))
        .expect("lease")
        .with_retry_every(Duration::from_millis(10));
    let running = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let jobs = (0..4).map(|_| {
        let lease = lease.clone();
        let running = running.clone();
        async move {
            lease
                .run_exclusive(|token| async move {
                    use std::sync::atomic::Ordering::SeqCst;
                    assert_eq!(running.fetch_add(1, SeqCst), 0, "two jobs at once");
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    running.fetch_sub(1, SeqCst);
                    token
                })
                .await
                .expect("finished while held")
        }
    });
    let mut tokens = futures::future::join_all(jobs).await;
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 4, "each run had its own acquisition");
}

#[tokio::test]
async fn every_keeps_its_schedule_across_a_handover() {
    let server = RedisServer::start();
    let globals = globals(&server, "lease-every").await;
    let lease = globals
        .lease("every", Duration::from_millis(300))
        .expect("lease")
        .with_retry_every(Duration::from_millis(10));
    let interval = Duration::from_millis(100);
    // (task, token, when) of every run.
    let runs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks: Vec<_> = (0..3)
        .map(|i| {
            let (lease, runs) = (lease.clone(), runs.clone());
            tokio::spawn(async move {
                lease
                    .every(interval, move |token| {
                        runs.lock()
                            .unwrap()
                            .push((i, token, tokio::time::Instant::now()));
                        async {}
                    })
                    .await
            })
        })
        .collect();
    // Stop whichever task holds the lease, twice: its lease is released, another continues.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let holder = runs.lock().unwrap().last().expect("a run").0;
        tasks[holder].abort();
        let _ = (&mut tasks[holder]).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    for t in &tasks {
        t.abort();
    }
    let runs = runs.lock().unwrap().clone();
    let holders: std::collections::HashSet<usize> = runs.iter().map(|r| r.0).collect();
    assert_eq!(holders.len(), 3, "the job did not move on: {holders:?}");
    // The schedule is kept on Redis' clock; a run is seen here after its record's round trip, so
    // allow that much jitter. A new holder that ran at once would come within `retry_every`
    // (10 ms) of the last run.
    for pair in runs.windows(2) {
        let gap = pair[1].2 - pair[0].2;
        assert!(
            gap >= interval - Duration::from_millis(25),
            "two runs {gap:?} apart (interval {interval:?}), across tasks {} → {}",
            pair[0].0,
            pair[1].0
        );
        assert!(pair[0].1 <= pair[1].1, "tokens go back");
    }
}

// ---------------------------------------------------------------------------------------------
// The reference model.

/// What Redis should hold, and what each handle holds.
#[derive(Debug, Default)]
struct Model {
    /// The handle holding the lease now, if any.
    holder: Option<usize>,
}

#[derive(Clone, Debug)]
enum Op {
    Acquire(usize),
    Renew(usize),
    Release(usize),
    /// The TTL runs out (the key expires in Redis).
    Expire,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        3 => (0..3usize).prop_map(Op::Acquire),
        2 => (0..3usize).prop_map(Op::Renew),
        2 => (0..3usize).prop_map(Op::Release),
        1 => Just(Op::Expire),
    ]
}

/// Runs one program against Redis and the model; panics on the first difference.
async fn check_program(globals: &Globals, name: &str, program: &[Op]) {
    let lease = globals.lease(name, Duration::from_secs(60)).expect("lease");
    let key = format!("{}:l:{{{name}}}", globals.prefix());
    let client = globals.client().clone();
    let mut guards: Vec<Option<LeaseGuard>> = vec![None, None, None];
    let mut model = Model::default();
    let mut last_token = FencingToken::new(0);
    for op in program {
        match *op {
            Op::Acquire(h) => {
                let got = lease.try_acquire().await.expect("acquire");
                assert_eq!(got.is_some(), model.holder.is_none(), "{op:?}");
                if let Some(guard) = got {
                    assert!(guard.token() > last_token, "tokens strictly increase");
                    last_token = guard.token();
                    model.holder = Some(h);
                    guards[h] = Some(guard);
                }
            }
            Op::Renew(h) => {
                if let Some(guard) = guards[h].as_mut() {
                    let renewed = guard.renew().await.expect("renew");
                    let holds = model.holder == Some(h) && guard.token() == last_token;
                    assert_eq!(renewed, holds, "{op:?}");
                }
            }
            Op::Release(h) => {
                if let Some(guard) = guards[h].take() {
                    let holds = model.holder == Some(h) && guard.token() == last_token;
                    assert_eq!(guard.release().await.expect("release"), holds, "{op:?}");
                    if holds {
                        model.holder = None;
                    }
                }
            }
            Op::Expire => {
                // Redis' own expiry, shortened: a 1 ms TTL, then wait past it.
                let key = key.clone();
                client
                    .query::<i64>(redis::cmd("PEXPIRE").arg(&key).arg(1))
                    .await
                    .expect("pexpire");
                tokio::time::sleep(Duration::from_millis(3)).await;
                model.holder = None;
            }
        }
        let holder = lease.holder().await.expect("holder");
        let expected = model.holder.map(|_| last_token);
        assert_eq!(holder, expected, "after {op:?}");
    }
}

#[test]
fn lease_matches_the_reference_model() {
    use proptest::prelude::*;
    let server = RedisServer::start();
    let rt = runtime();
    let globals = rt.block_on(globals(&server, "lease-model"));
    let n = std::sync::atomic::AtomicU32::new(0);
    let config = ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(program in proptest::collection::vec(op(), 1..40))| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        rt.block_on(check_program(&globals, &format!("m{i}"), &program));
    });
}

/// Regression: a guard whose lease expired and was taken by another handle renews nothing.
#[test]
fn a_stale_guard_does_not_renew_its_successors_lease() {
    let server = RedisServer::start();
    let rt = runtime();
    let globals = rt.block_on(globals(&server, "lease-regress"));
    rt.block_on(check_program(
        &globals,
        "r",
        &[
            Op::Acquire(0),
            Op::Expire,
            Op::Acquire(1),
            Op::Renew(0),
            Op::Release(0),
            Op::Renew(1),
            Op::Release(1),
            Op::Acquire(0),
        ],
    ));
}

// ---------------------------------------------------------------------------------------------
// Across OS processes.

fn worker_bin() -> PathBuf {
    launcher_support::example_bin("lease_worker")
}

/// Lease worker processes (standalone), killed and reaped on drop.
struct Workers {
    children: Vec<Child>,
}

impl Workers {
    fn start(n: usize, url: &str, prefix: &str, log: &Path, hold_ms: u64) -> Workers {
        let bin = worker_bin();
        let children = (0..n)
            .map(|_| {
                Command::new(&bin)
                    .env("LEASE_STANDALONE", "1")
                    .env("REDIS_URL", url)
                    .env("HERD_PREFIX", prefix)
                    .env("HERD_SECRET", support::test_secret())
                    .env("HERD_REDIS_TIMEOUT_MS", "300")
                    .env("LEASE_LOG", log)
                    .env("LEASE_TTL_MS", TTL_MS.to_string())
                    .env("LEASE_HOLD_MS", hold_ms.to_string())
                    .env("RUST_LOG", "warn")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start lease_worker")
            })
            .collect();
        Workers { children }
    }

    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One `WRITE` line.
#[derive(Debug, Clone)]
struct Write {
    token: u64,
    pid: u32,
    at: u128,
    /// The counter's new value, `None` when refused by token (or failed).
    value: Option<i64>,
    refused: bool,
    held: bool,
}

/// The shared log, parsed.
#[derive(Debug, Default)]
struct History {
    /// token → (pid, first and last instant held, µs).
    holds: BTreeMap<u64, (u32, u128, u128)>,
    writes: Vec<Write>,
}

impl History {
    fn read(path: &Path) -> History {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut h = History::default();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                ["HOLD", token, pid, at] => {
                    let (token, pid, at) = (
                        token.parse().expect("token"),
                        pid.parse().expect("pid"),
                        at.parse().expect("time"),
                    );
                    let e = h.holds.entry(token).or_insert((pid, at, at));
                    assert_eq!(e.0, pid, "token {token} held by two processes");
                    e.1 = e.1.min(at);
                    e.2 = e.2.max(at);
                }
                ["WRITE", token, pid, at, value, held] => h.writes.push(Write {
                    token: token.parse().expect("token"),
                    pid: pid.parse().expect("pid"),
                    at: at.parse().expect("time"),
                    value: value.parse().ok(),
                    refused: *value == "refused",
                    held: *held == "1",
                }),
                _ => panic!("unexpected log line {line:?}"),
            }
        }
        h
    }

    /// No two holding intervals overlap, and tokens grow with time.
    fn assert_no_overlap(&self) {
        let mut previous: Option<(u64, u128)> = None;
        for (&token, &(pid, first, last)) in &self.holds {
            if let Some((prev_token, prev_last)) = previous {
                assert!(
                    prev_last < first,
                    "token {prev_token} was held until {prev_last} µs, after token {token} \
                     (pid {pid}) was held at {first} µs"
                );
            }
            previous = Some((token, last));
        }
    }

    /// In the order the fenced counter accepted them (`from_value`..), tokens never decrease.
    fn assert_fenced_order(&self, writes: &[&Write]) {
        let mut accepted: Vec<(i64, u64)> = writes
            .iter()
            .filter_map(|w| w.value.map(|v| (v, w.token)))
            .collect();
        accepted.sort();
        for pair in accepted.windows(2) {
            assert!(pair[0].0 < pair[1].0, "value {} accepted twice", pair[0].0);
            assert!(
                pair[0].1 <= pair[1].1,
                "write {} (token {}) accepted after write {} (token {})",
                pair[1].0,
                pair[1].1,
                pair[0].0,
                pair[0].1
            );
        }
    }

    /// Both invariants over the whole history (one era of the fenced counter).
    fn assert_invariants(&self) {
        self.assert_no_overlap();
        self.assert_fenced_order(&self.writes.iter().collect::<Vec<_>>());
    }

    fn current_holder(&self) -> Option<(u64, u32)> {
        self.holds
            .iter()
            .next_back()
            .map(|(&token, &(pid, _, _))| (token, pid))
    }

    /// When the history has at least `n` tokens.
    fn tokens(&self) -> usize {
        self.holds.len()
    }
}

fn wait_history(
    log: &Path,
    what: &str,
    timeout: Duration,
    mut f: impl FnMut(&History) -> bool,
) -> History {
    let deadline = Instant::now() + timeout;
    loop {
        let h = History::read(log);
        if f(&h) {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; history: {h:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn now_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_micros()
}

struct Contest {
    dir: tempfile::TempDir,
    prefix: String,
}

impl Contest {
    fn new(name: &str) -> Contest {
        Contest {
            dir: tempfile::tempdir().expect("tempdir"),
            prefix: support::unique_prefix(name),
        }
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("lease.log")
    }

    /// `n` worker processes competing on `url`, each holding `hold_ms` before releasing (0: until
    /// lost); and the log path.
    fn start(&self, n: usize, url: &str, hold_ms: u64) -> (Workers, PathBuf) {
        let log = self.log();
        (Workers::start(n, url, &self.prefix, &log, hold_ms), log)
    }
}

#[test]
fn processes_that_release_take_turns_and_never_overlap() {
    let _serial = launcher_support::serial();
    let server = RedisServer::start();
    let contest = Contest::new("turns");
    let (_workers, log) = contest.start(4, &server.url(), 150);
    let h = wait_history(&log, "12 acquisitions", Duration::from_secs(60), |h| {
        h.tokens() >= 12
    });
    let pids: std::collections::HashSet<u32> = h.holds.values().map(|v| v.0).collect();
    assert!(pids.len() >= 2, "only {pids:?} ever held the lease");
    h.assert_invariants();
    // Releases hand over promptly: no gap of a TTL between two holders.
    let gaps: Vec<u128> = h
        .holds
        .values()
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[1].1 - w[0].2)
        .collect();
    let slow = gaps
        .iter()
        .filter(|g| **g > u128::from(TTL_MS) * 1000)
        .count();
    assert!(
        slow * 4 <= gaps.len(),
        "handovers after a release should not wait for the TTL: gaps {gaps:?} µs"
    );
}

#[test]
fn a_sigkilled_holder_is_replaced_within_the_ttl() {
    let _serial = launcher_support::serial();
    let server = RedisServer::start();
    let contest = Contest::new("sigkill");
    let (workers, log) = contest.start(3, &server.url(), 0);
    let h = wait_history(&log, "a holder", Duration::from_secs(30), |h| {
        h.tokens() >= 1
    });
    let (token, pid) = h.current_holder().expect("holder");
    assert!(workers.pids().contains(&pid));
    launcher_support::kill(pid, "KILL");
    let killed_at = now_us();
    let h = wait_history(&log, "a new holder", Duration::from_secs(10), |h| {
        h.current_holder().is_some_and(|(t, _)| t > token)
    });
    let (next, next_pid) = h.current_holder().expect("holder");
    assert_ne!(next_pid, pid);
    let took_over = h.holds[&next].1;
    let after = took_over.saturating_sub(killed_at);
    // TTL, plus the waiters' retry interval (50 ms), plus scheduling on a shared machine.
    assert!(
        after < u128::from(TTL_MS) * 1000 + 500_000,
        "took over {after} µs after the kill (TTL {TTL_MS} ms)"
    );
    h.assert_invariants();
}

#[test]
fn a_sigstopped_holder_resumed_after_its_ttl_is_refused_by_token() {
    let _serial = launcher_support::serial();
    let server = RedisServer::start();
    let contest = Contest::new("sigstop");
    let (_workers, log) = contest.start(3, &server.url(), 0);
    let h = wait_history(&log, "a holder", Duration::from_secs(30), |h| {
        h.writes.iter().any(|w| w.value.is_some())
    });
    let (token, pid) = h.current_holder().expect("holder");
    launcher_support::kill(pid, "STOP");
    let stopped_at = now_us();
    // The next holder takes over and writes (its token now guards the counter).
    wait_history(&log, "a new holder's write", Duration::from_secs(10), |h| {
        h.writes
            .iter()
            .any(|w| w.token > token && w.value.is_some() && w.at > stopped_at)
    });
    std::thread::sleep(Duration::from_millis(TTL_MS));
    let resumed_at = now_us();
    launcher_support::kill(pid, "CONT");
    let h = wait_history(
        &log,
        "the resumed holder's late write",
        Duration::from_secs(10),
        |h| h.writes.iter().any(|w| w.pid == pid && w.at > resumed_at),
    );
    let late: Vec<&Write> = h
        .writes
        .iter()
        .filter(|w| w.pid == pid && w.token == token && w.at > resumed_at)
        .collect();
    assert!(
        !late.is_empty(),
        "the resumed holder wrote nothing with its old token"
    );
    for w in &late {
        assert!(
            w.refused,
            "a write of the paused holder was accepted: {w:?}"
        );
        assert!(
            !w.held,
            "the paused holder still believed it held the lease: {w:?}"
        );
    }
    // It never logged a HOLD after its TTL ran out (its belief ended in time).
    let (_, _, last) = h.holds[&token];
    assert!(last < stopped_at + u128::from(TTL_MS) * 1000);
    h.assert_invariants();
}

#[test]
fn a_redis_restart_hands_the_lease_on_with_a_greater_token() {
    let _serial = launcher_support::serial();
    let mut server = RedisServer::start();
    let contest = Contest::new("restart");
    let (_workers, log) = contest.start(3, &server.url(), 0);
    let h = wait_history(&log, "a holder", Duration::from_secs(30), |h| {
        h.tokens() >= 1
    });
    let (token, _) = h.current_holder().expect("holder");
    server.kill();
    let killed_at = now_us();
    // Redis comes back empty after one TTL (the restart delay that keeps "one holder at a time"
    // when Redis keeps no data: see docs/coordination.md).
    std::thread::sleep(Duration::from_millis(TTL_MS + 100));
    server.restart();
    let restarted_at = now_us();
    let h = wait_history(
        &log,
        "a holder after the restart",
        Duration::from_secs(20),
        |h| {
            h.holds
                .iter()
                .any(|(&t, &(_, first, _))| t > token && first > restarted_at)
        },
    );
    // The counter was lost with the data; every later token is still greater (Redis' clock).
    let after: Vec<u64> = h
        .holds
        .iter()
        .filter(|(_, &(_, first, _))| first > killed_at)
        .map(|(&t, _)| t)
        .collect();
    assert!(after.iter().all(|&t| t > token), "{after:?} after {token}");
    h.assert_no_overlap();
    // The counter restarted from zero with Redis: check each era on its own.
    let before: Vec<&Write> = h.writes.iter().filter(|w| w.at < killed_at).collect();
    let since: Vec<&Write> = h.writes.iter().filter(|w| w.at > restarted_at).collect();
    h.assert_fenced_order(&before);
    h.assert_fenced_order(&since);
}

#[cfg(feature = "cluster")]
#[test]
fn processes_on_a_redis_cluster_hold_one_at_a_time() {
    let _serial = launcher_support::serial();
    let cluster = support::cluster::RedisCluster::start();
    let contest = Contest::new("cluster");
    let (workers, log) = contest.start(3, &cluster.url(), 150);
    let h = wait_history(&log, "8 acquisitions", Duration::from_secs(60), |h| {
        h.tokens() >= 8
    });
    h.assert_invariants();
    // And a killed holder is replaced there too.
    let (token, pid) = h.current_holder().expect("holder");
    if workers.pids().contains(&pid) {
        launcher_support::kill(pid, "KILL");
    }
    let h = wait_history(&log, "a new holder", Duration::from_secs(10), |h| {
        h.current_holder()
            .is_some_and(|(t, p)| t > token && p != pid)
    });
    h.assert_no_overlap();
    // The lease and its counter share one slot (one script touches both).
    let lease = format!("{}:l:{{contest}}", contest.prefix);
    assert_eq!(
        cluster.slot_of(&lease),
        cluster.slot_of(&format!("{lease}:fence"))
    );
}

/// Needs the `herd` binary (`cli` feature).
#[cfg(feature = "cli")]
#[test]
fn a_rolling_reload_under_the_launcher_keeps_one_holder_at_a_time() {
    let _serial = launcher_support::serial();
    let server = RedisServer::start();
    let contest = Contest::new("reload");
    let log = contest.log();
    let url = server.url();
    let log_text = log.to_string_lossy().into_owned();
    let mut master = launcher_support::Master::herd_run_env(
        &["--workers", "3"],
        &[worker_bin().to_str().expect("utf-8 path")],
        &[
            ("REDIS_URL", &url),
            ("HERD_PREFIX", &contest.prefix),
            ("HERD_SECRET", &support::test_secret()),
            ("HERD_REDIS_TIMEOUT_MS", "300"),
            ("LEASE_LOG", &log_text),
            ("LEASE_TTL_MS", &TTL_MS.to_string()),
            ("LEASE_HOLD_MS", "0"),
            ("RUST_LOG", "warn"),
        ],
    );
    let first = master.online_pids(3, Duration::from_secs(30));
    wait_history(&log, "a holder", Duration::from_secs(30), |h| {
        h.tokens() >= 1
    });
    let mut before = first.clone();
    for round in 0..2 {
        launcher_support::kill(master.pid(), "HUP");
        // Every worker replaced: none of the previous generation's pids left.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let pids = master.online_pids(3, Duration::from_secs(30));
            if pids.iter().all(|p| !before.contains(p)) {
                before = pids;
                break;
            }
            assert!(Instant::now() < deadline, "reload {round} did not finish");
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let now = master.online_pids(3, Duration::from_secs(30));
    let h = wait_history(
        &log,
        "a holder of the new generation",
        Duration::from_secs(10),
        |h| {
            h.current_holder()
                .is_some_and(|(_, pid)| now.contains(&pid))
        },
    );
    let holders: Vec<u32> = h.holds.values().map(|v| v.0).collect();
    assert!(
        holders.iter().any(|p| first.contains(p)) && holders.iter().any(|p| now.contains(p)),
        "the lease did not pass from the first generation to the last: {holders:?}"
    );
    h.assert_invariants();
    master.assert_running();
}

#[tokio::test]
async fn a_lost_token_counter_still_gives_a_greater_token_and_fences_the_old_holder() {
    // What a failover to a replica that missed the last writes, or a restart without persistence,
    // looks like: the lease and its counter are gone.
    let server = RedisServer::start();
    let globals = globals(&server, "lease-lost-counter").await;
    let group = globals.group("jobs").expect("group");
    let lease = globals
        .lease("job", Duration::from_secs(30))
        .expect("lease");
    let old = lease.try_acquire().await.expect("acquire").expect("free");
    assert_eq!(
        group.incr_fenced("n", 1, old.token()).await.expect("w"),
        Some(1)
    );
    let prefix = globals.prefix().to_owned();
    server.cmd::<()>(&[
        "DEL",
        &format!("{prefix}:l:{{job}}"),
        &format!("{prefix}:l:{{job}}:fence"),
    ]);
    let new = lease
        .try_acquire()
        .await
        .expect("acquire")
        .expect("free again");
    assert!(
        new.token() > old.token(),
        "{:?} after {:?}",
        new.token(),
        old.token()
    );
    assert_eq!(
        group.incr_fenced("n", 1, new.token()).await.expect("w"),
        Some(2)
    );
    // The old holder, still believing it holds the lease, is refused.
    assert!(old.is_held());
    assert_eq!(
        group.incr_fenced("n", 1, old.token()).await.expect("w"),
        None
    );
}

#[cfg(feature = "sentinel")]
#[test]
fn through_a_sentinel_failover_the_lease_passes_on_with_a_greater_token() {
    let _serial = launcher_support::serial();
    let mut setup = support::sentinel::SentinelSetup::start();
    let contest = Contest::new("sentinel");
    let (_workers, log) = contest.start(3, &setup.url(), 0);
    let h = wait_history(&log, "a holder writing", Duration::from_secs(30), |h| {
        h.writes.iter().any(|w| w.value.is_some())
    });
    let (token, _) = h.current_holder().expect("holder");
    setup.primary.kill();
    let killed_at = now_us();
    let h = wait_history(
        &log,
        "a write accepted by the promoted replica",
        Duration::from_secs(30),
        |h| {
            h.writes
                .iter()
                .any(|w| w.value.is_some() && w.at > killed_at + 1_000_000)
        },
    );
    assert_ne!(setup.master_port(), Some(setup.primary.port()));
    // Whoever holds the lease now holds a token at least as great, and holding never overlapped.
    let (now_token, _) = h.current_holder().expect("holder");
    assert!(now_token >= token);
    h.assert_no_overlap();
    let before: Vec<&Write> = h.writes.iter().filter(|w| w.at < killed_at).collect();
    let after: Vec<&Write> = h.writes.iter().filter(|w| w.at > killed_at).collect();
    h.assert_fenced_order(&before);
    h.assert_fenced_order(&after);
}
