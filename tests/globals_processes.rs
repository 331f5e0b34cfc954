//! Shared globals across several OS processes, each with its own `RedisClient` (its own shared
//! connection and its own pool), against one real Redis.
//!
//! How: a parent test re-executes this test binary as child processes
//! (`<this binary> --exact child_process --ignored --nocapture`), telling each child its role in
//! environment variables. Children print `RESULT name=value` lines and `READY`-style markers on
//! stdout; the parent reads them, waits for every child with a deadline, and kills all children if
//! anything fails (the `Children` guard). `child_process` does nothing when run without the role
//! variable, so `cargo test -- --ignored` stays harmless.

// `pub(crate)`: the binaries that run this suite on other topologies use it too.
pub(crate) mod support;

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use herd::globals::{Received, UpdateError};
use herd::{Globals, RedisClient};
use support::topology::{TestRedis as RedisServer, Topology};
use support::unique_prefix;

/// The Redis this suite runs on. `globals_processes_cluster.rs` and `globals_processes_sentinel.rs` include this file as a
/// module and declare their own `TOPOLOGY` at their crate root, which is the one the tests read
/// (`crate::TOPOLOGY`); this one is unused there.
#[allow(dead_code)]
const TOPOLOGY: Topology = Topology::Single;

const ROLE: &str = "HERD_GLOBALS_ROLE";
const URL: &str = "HERD_GLOBALS_URL";
const PREFIX: &str = "HERD_GLOBALS_PREFIX";
const INDEX: &str = "HERD_GLOBALS_INDEX";
const WORK: &str = "HERD_GLOBALS_WORK";

const ACCOUNTS: usize = 10;
const TOTAL: i64 = 10_000;

fn child_config(url: &str, prefix: &str) -> herd::Config {
    herd::Config::builder()
        .redis_url(url)
        .prefix(prefix)
        // Several processes share two cores: be patient, but bounded.
        .command_timeout(Duration::from_secs(3))
        .pool_wait_timeout(Duration::from_secs(10))
        .build()
        .expect("config")
}

fn account_names() -> Vec<String> {
    (0..ACCOUNTS).map(|i| format!("acct-{i}")).collect()
}

// ---------------------------------------------------------------------------------------------
// The parent side.

/// Child processes of one test; every one still running is killed (and reaped) on drop.
struct Children {
    children: Vec<(String, Child)>,
    readers: Vec<Option<std::thread::JoinHandle<()>>>,
    lines_tx: mpsc::Sender<(usize, String)>,
    lines_rx: mpsc::Receiver<(usize, String)>,
    lines: Vec<Vec<String>>,
}

impl Children {
    fn new() -> Children {
        let (lines_tx, lines_rx) = mpsc::channel();
        Children {
            children: Vec::new(),
            readers: Vec::new(),
            lines_tx,
            lines_rx,
            lines: Vec::new(),
        }
    }

    /// Starts one child with `role`; returns its index.
    fn spawn(&mut self, role: &str, url: &str, prefix: &str, work: u64) -> usize {
        let index = self.children.len();
        // The child test's full name: this file also runs as a module of the cluster suite.
        let child_test = match module_path!().split_once("::") {
            Some((_, module)) => format!("{module}::child_process"),
            None => "child_process".to_owned(),
        };
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                child_test.as_str(),
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE, role)
            .env(URL, url)
            .env(PREFIX, prefix)
            .env(INDEX, index.to_string())
            .env(WORK, work.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let tx = self.lines_tx.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((index, line)).is_err() {
                    break;
                }
            }
        });
        self.children.push((format!("{role}#{index}"), child));
        self.readers.push(Some(reader));
        self.lines.push(Vec::new());
        index
    }

    fn drain(&mut self) {
        while let Ok((i, line)) = self.lines_rx.try_recv() {
            self.lines[i].push(line);
        }
    }

    /// Waits until each child in `which` printed a line equal to `marker`.
    fn wait_for_line(&mut self, which: &[usize], marker: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain();
            let missing: Vec<usize> = which
                .iter()
                .copied()
                .filter(|&i| !self.lines[i].iter().any(|l| l == marker))
                .collect();
            if missing.is_empty() {
                return;
            }
            for &i in &missing {
                if let Ok(Some(status)) = self.children[i].1.try_wait() {
                    panic!(
                        "{} exited ({status}) before printing {marker:?}",
                        self.children[i].0
                    );
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "children {missing:?} did not print {marker:?} in {timeout:?}"
            );
            if let Ok((i, line)) = self
                .lines_rx
                .recv_timeout(left.min(Duration::from_millis(50)))
            {
                self.lines[i].push(line);
            }
        }
    }

    /// Waits for the children in `which` to exit successfully.
    fn wait(&mut self, which: &[usize], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for &i in which {
            loop {
                let (name, child) = &mut self.children[i];
                match child.try_wait().expect("try_wait") {
                    Some(status) => {
                        assert!(status.success(), "{name} failed: {status}");
                        break;
                    }
                    None if Instant::now() > deadline => {
                        panic!("{name} did not finish within {timeout:?}")
                    }
                    None => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        // The children exited, so their stdout is closed: the reader threads deliver the last lines
        // and end.
        for &i in which {
            if let Some(reader) = self.readers[i].take() {
                reader.join().expect("reader thread");
            }
        }
        self.drain();
    }

    /// The values of `RESULT name=value` lines printed by the children in `which`.
    fn results(&self, which: &[usize], name: &str) -> Vec<i64> {
        let prefix = format!("RESULT {name}=");
        which
            .iter()
            .flat_map(|&i| self.lines[i].iter())
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.parse().expect("number"))
            .collect()
    }

    fn sum(&self, which: &[usize], name: &str) -> i64 {
        self.results(which, name).iter().sum()
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn parent_globals(rt: &tokio::runtime::Runtime, server: &RedisServer, prefix: &str) -> Globals {
    let cfg = child_config(&server.url(), prefix);
    Globals::new(rt.block_on(RedisClient::connect(cfg)).expect("connect"))
}

/// 4 processes make 5 000 random transfers between 10 accounts with `update` while a fifth process
/// takes `get_many` snapshots: every snapshot and the final state hold exactly 10 000, no balance
/// is ever negative, and a refused transfer changes nothing.
#[test]
fn bank_invariant_holds_across_processes() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let prefix = unique_prefix("bank");
    let rt = runtime();
    let globals = parent_globals(&rt, &server, &prefix);
    let bank = globals.group("bank").unwrap();
    let names = account_names();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut init = bank.atomic();
    for name in &refs {
        init = init.set(name, &(TOTAL / ACCOUNTS as i64));
    }
    rt.block_on(init.apply()).unwrap();

    let mut children = Children::new();
    let workers: Vec<usize> = (0..4)
        .map(|_| children.spawn("bank-transfers", &server.url(), &prefix, 1_250))
        .collect();
    let reader = children.spawn("bank-snapshots", &server.url(), &prefix, 0);
    children.wait(&workers, Duration::from_secs(90));
    let control = globals.group("control").unwrap();
    rt.block_on(control.set("stop", &true)).unwrap();
    children.wait(&[reader], Duration::from_secs(30));

    let done = children.sum(&workers, "transfers");
    let refused = children.sum(&workers, "refused");
    let gave_up = children.sum(&workers, "conflicts");
    let snapshots = children.sum(&[reader], "snapshots");
    eprintln!(
        "bank: {done} transfers, {refused} refused, {gave_up} gave up after conflicts, \
         {snapshots} snapshots; retries: {}",
        children.sum(&workers, "extra_attempts")
    );
    assert_eq!(done + refused + gave_up, 5_000);
    assert!(
        done > 2_500 && refused > 0,
        "the run did not exercise both paths"
    );
    assert!(snapshots > 50, "too few snapshots: {snapshots}");
    let balances = rt.block_on(bank.get_many::<i64>(&refs)).unwrap();
    let balances: Vec<i64> = balances.into_iter().map(|b| b.expect("account")).collect();
    assert_eq!(balances.iter().sum::<i64>(), TOTAL, "{balances:?}");
    assert!(balances.iter().all(|&b| b >= 0), "{balances:?}");
}

/// Writers in two processes apply `{a = i, b = i}` as atomic groups; readers in two other processes
/// never see `a ≠ b`.
#[test]
fn grouped_writes_appear_together_in_other_processes() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let prefix = unique_prefix("pairs");
    let rt = runtime();
    let globals = parent_globals(&rt, &server, &prefix);
    let mut children = Children::new();
    let writers: Vec<usize> = (0..2)
        .map(|_| children.spawn("pair-writer", &server.url(), &prefix, 3_000))
        .collect();
    let readers: Vec<usize> = (0..2)
        .map(|_| children.spawn("pair-reader", &server.url(), &prefix, 0))
        .collect();
    children.wait(&writers, Duration::from_secs(60));
    rt.block_on(globals.group("control").unwrap().set("stop", &true))
        .unwrap();
    children.wait(&readers, Duration::from_secs(30));
    let reads = children.sum(&readers, "reads");
    let changes = children.sum(&readers, "changes_seen");
    eprintln!("pairs: {reads} reads saw {changes} different pairs, never a != b");
    assert!(
        reads > 100 && changes > 10,
        "the readers saw too little: {reads} reads, {changes} changes"
    );
}

/// `incr` from 4 processes × 1 000 is exact.
#[test]
fn incr_from_four_processes_is_exact() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let prefix = unique_prefix("incr");
    let rt = runtime();
    let globals = parent_globals(&rt, &server, &prefix);
    let mut children = Children::new();
    let all: Vec<usize> = (0..4)
        .map(|_| children.spawn("incr", &server.url(), &prefix, 1_000))
        .collect();
    children.wait(&all, Duration::from_secs(60));
    let total = rt
        .block_on(globals.group("counters").unwrap().get::<i64>("hits"))
        .unwrap();
    assert_eq!(total, Some(4_000));
    // The values the 4 000 increments returned are exactly 1..=4000: none lost, none seen twice.
    let mut seen = children.results(&all, "seen");
    seen.sort_unstable();
    assert_eq!(seen, (1..=4_000).collect::<Vec<i64>>());
}

/// A message published by one process reaches subscribers in three others, also after Redis
/// restarts.
#[test]
fn pubsub_reaches_other_processes_and_survives_a_restart() {
    let mut server = RedisServer::start(crate::TOPOLOGY);
    let prefix = unique_prefix("pubsub");
    let rt = runtime();
    let globals = parent_globals(&rt, &server, &prefix);
    let channel = globals.channel::<String>("news").unwrap();
    let mut children = Children::new();
    let subs: Vec<usize> = (0..3)
        .map(|_| children.spawn("subscriber", &server.url(), &prefix, 0))
        .collect();
    children.wait_for_line(&subs, "READY", Duration::from_secs(30));

    // PUBLISH counts the receivers on the node that took it: all of them on one server or the
    // master, those connected to that node on a cluster (the message reaches every node).
    let topology = server.topology();
    let receivers = |n: u64| match topology {
        Topology::Cluster => assert!(n <= 3, "{n} receivers on one node of three subscribers"),
        Topology::Single | Topology::Sentinel => assert_eq!(n, 3, "receivers"),
    };
    receivers(rt.block_on(channel.publish(&"before".into())).unwrap() as u64);
    children.wait_for_line(&subs, "GOT before", Duration::from_secs(10));

    server.kill();
    server.restart();
    children.wait_for_line(&subs, "RECONNECTED", Duration::from_secs(20));
    let publish = |msg: &str| {
        for _ in 0..50 {
            if let Ok(n) = rt.block_on(channel.publish(&msg.to_owned())) {
                return n;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("cannot publish after the restart");
    };
    receivers(publish("after") as u64);
    children.wait_for_line(&subs, "GOT after", Duration::from_secs(10));
    receivers(publish("stop") as u64);
    children.wait(&subs, Duration::from_secs(10));
}

// ---------------------------------------------------------------------------------------------
// The child side.

#[test]
#[ignore = "a child process of the multi-process tests, started by them"]
fn child_process() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    // libtest has printed "test child_process ... " without a newline: end that line first.
    println!();
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"));
    let url = var(URL);
    let prefix = var(PREFIX);
    let index: u64 = var(INDEX).parse().unwrap();
    let work: u64 = var(WORK).parse().unwrap();
    let rt = runtime();
    let _runtime = rt.enter(); // RedisClient::new spawns its connection tasks on the runtime
    let globals =
        Globals::new(RedisClient::new(child_config(&url, &prefix)).unwrap()).with_max_attempts(50);
    let results = rt.block_on(async move {
        let run = async {
            match role.as_str() {
                "bank-transfers" => bank_transfers(&globals, index, work).await,
                "bank-snapshots" => bank_snapshots(&globals).await,
                "pair-writer" => pair_writer(&globals, index, work).await,
                "pair-reader" => pair_reader(&globals).await,
                "incr" => incr(&globals, work).await,
                "subscriber" => subscriber(&globals).await,
                other => panic!("unknown role {other}"),
            }
        };
        tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .expect("child timed out")
    });
    for (name, value) in results {
        println!("RESULT {name}={value}");
    }
}

async fn stopped(globals: &Globals) -> bool {
    let control = globals.group("control").unwrap();
    control.get::<bool>("stop").await.unwrap() == Some(true)
}

#[derive(Debug)]
struct InsufficientFunds;

async fn bank_transfers(globals: &Globals, index: u64, work: u64) -> HashMap<&'static str, i64> {
    let bank = globals.group("bank").unwrap();
    // Two concurrent tasks per process: 8 writers in all, on 10 accounts.
    let tasks: Vec<_> = (0..2_u64)
        .map(|t| {
            let bank = bank.clone();
            tokio::spawn(async move {
                use rand::{Rng as _, SeedableRng as _};
                let mut rng = rand::rngs::StdRng::seed_from_u64(index * 100 + t);
                let names = account_names();
                let mut stats: HashMap<&'static str, i64> = HashMap::new();
                for _ in 0..work / 2 {
                    let from = rng.random_range(0..ACCOUNTS);
                    let to = (from + rng.random_range(1..ACCOUNTS)) % ACCOUNTS;
                    let amount: i64 = rng.random_range(1..=800);
                    let mut attempts = 0;
                    let r = bank
                        .update(&[&names[from], &names[to]], |b: &mut [Option<i64>]| {
                            attempts += 1;
                            let (f, t) = (b[0].expect("account"), b[1].expect("account"));
                            assert!(f >= 0 && t >= 0, "negative balance read: {f}, {t}");
                            if f < amount {
                                return Err(InsufficientFunds);
                            }
                            b[0] = Some(f - amount);
                            b[1] = Some(t + amount);
                            Ok(())
                        })
                        .await;
                    *stats.entry("extra_attempts").or_default() += attempts - 1;
                    let stat = match r {
                        Ok(()) => "transfers",
                        Err(UpdateError::Aborted(InsufficientFunds)) => "refused",
                        Err(e) if e.is_conflict() => "conflicts",
                        Err(e) => panic!("transfer failed: {e:?}"),
                    };
                    *stats.entry(stat).or_default() += 1;
                }
                stats
            })
        })
        .collect();
    let mut total: HashMap<&'static str, i64> = HashMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *total.entry(k).or_default() += v;
        }
    }
    total
}

async fn bank_snapshots(globals: &Globals) -> HashMap<&'static str, i64> {
    let bank = globals.group("bank").unwrap();
    let names = account_names();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut snapshots = 0;
    while !stopped(globals).await {
        for _ in 0..10 {
            let balances = bank.get_many::<i64>(&refs).await.unwrap();
            let balances: Vec<i64> = balances.into_iter().map(|b| b.expect("account")).collect();
            assert_eq!(
                balances.iter().sum::<i64>(),
                TOTAL,
                "torn snapshot: {balances:?}"
            );
            assert!(
                balances.iter().all(|&b| b >= 0),
                "negative balance: {balances:?}"
            );
            snapshots += 1;
        }
    }
    HashMap::from([("snapshots", snapshots)])
}

async fn pair_writer(globals: &Globals, index: u64, work: u64) -> HashMap<&'static str, i64> {
    let g = globals.group("pair").unwrap();
    for i in 1..=work {
        let v = index * 1_000_000 + i;
        g.atomic().set("a", &v).set("b", &v).apply().await.unwrap();
    }
    HashMap::from([("writes", work as i64)])
}

async fn pair_reader(globals: &Globals) -> HashMap<&'static str, i64> {
    let g = globals.group("pair").unwrap();
    let (mut reads, mut changes, mut last) = (0, 0, None);
    while !stopped(globals).await {
        for _ in 0..10 {
            let pair = g.get_many::<u64>(&["a", "b"]).await.unwrap();
            assert_eq!(pair[0], pair[1], "a group was seen half-applied");
            if pair[0] != last {
                changes += 1;
                last = pair[0];
            }
            reads += 1;
        }
    }
    HashMap::from([("reads", reads), ("changes_seen", changes)])
}

async fn incr(globals: &Globals, work: u64) -> HashMap<&'static str, i64> {
    let g = globals.group("counters").unwrap();
    for _ in 0..work {
        let n = g.incr("hits", 1).await.unwrap();
        println!("RESULT seen={n}");
    }
    HashMap::new()
}

async fn subscriber(globals: &Globals) -> HashMap<&'static str, i64> {
    use futures::StreamExt as _;
    let mut sub = globals
        .channel::<String>("news")
        .unwrap()
        .subscribe()
        .await
        .unwrap();
    println!("READY");
    let mut got = 0;
    while let Some(event) = sub.next().await {
        match event {
            Received::Message(m) => {
                println!("GOT {m}");
                got += 1;
                if m == "stop" {
                    break;
                }
            }
            Received::Reconnected => println!("RECONNECTED"),
        }
    }
    HashMap::from([("messages", got)])
}
