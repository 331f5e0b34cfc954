//! A private Sentinel setup on free loopback ports: one primary, one replica, three sentinels
//! (`redis-server sentinel.conf --sentinel`) watching the primary as `herdmaster` with quorum 2,
//! `down-after-milliseconds 1000` and `failover-timeout 5000`, so a failover completes in a few
//! seconds. [`SentinelSetup::start`] returns once every sentinel knows the replica and the other two
//! sentinels (so a failover can be agreed). Everything is killed on drop; logs are printed when the
//! test is failing.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::topology::{config, TestRedis, Topology};
use super::RedisServer;

/// The master name the sentinels use.
pub const MASTER: &str = "herdmaster";

/// One sentinel process.
struct Sentinel {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

/// A primary, its replica and three sentinels.
pub struct SentinelSetup {
    /// The first primary (killed by the failover tests).
    pub primary: RedisServer,
    /// Its replica, promoted by the failover.
    pub replica: RedisServer,
    sentinels: Vec<Sentinel>,
}

fn query<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> redis::RedisResult<T> {
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_connection_with_timeout(Duration::from_millis(300))?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut conn)
}

impl Sentinel {
    fn start(primary_port: u16) -> Sentinel {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = super::free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {dir}/sentinel.log\n\
                 sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2\n\
                 sentinel down-after-milliseconds {MASTER} 1000\n\
                 sentinel failover-timeout {MASTER} 5000\n\
                 sentinel parallel-syncs {MASTER} 1\n",
                dir = dir.path().display()
            ),
        )
        .expect("write sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel");
        Sentinel {
            port,
            child: Some(child),
            dir,
        }
    }

    /// [`start`](Self::start), retried on another port when the sentinel does not come up (its
    /// free port can be taken by another test between the probe and the bind).
    fn start_answering(primary_port: u16) -> Sentinel {
        for _ in 0..5 {
            let mut sentinel = Sentinel::start(primary_port);
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if query::<String>(sentinel.port, &["PING"]).is_ok() {
                    return sentinel;
                }
                let exited = sentinel
                    .child
                    .as_mut()
                    .is_some_and(|c| c.try_wait().ok().flatten().is_some());
                if exited || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("no sentinel came up in 5 attempts");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sentinel.log")).unwrap_or_default()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- sentinel log (port {}) ----\n{}---- end ----",
                self.port,
                self.log()
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl SentinelSetup {
    /// Starts the primary, the replica (waits for its link), then the sentinels (waits until each
    /// knows the replica and the two other sentinels).
    pub fn start() -> SentinelSetup {
        let primary = RedisServer::start();
        let port = primary.port().to_string();
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
        wait("the replica to sync", Duration::from_secs(10), || {
            query::<String>(replica.port(), &["INFO", "replication"])
                .is_ok_and(|i| i.contains("master_link_status:up"))
        });
        let sentinels: Vec<Sentinel> = (0..3)
            .map(|_| Sentinel::start_answering(primary.port()))
            .collect();
        for s in &sentinels {
            wait(
                "a sentinel to see its peers",
                Duration::from_secs(40),
                || {
                    let peers =
                        query::<Vec<redis::Value>>(s.port, &["SENTINEL", "SENTINELS", MASTER])
                            .map(|v| v.len())
                            .unwrap_or(0);
                    let replicas =
                        query::<Vec<redis::Value>>(s.port, &["SENTINEL", "REPLICAS", MASTER])
                            .map(|v| v.len())
                            .unwrap_or(0);
                    peers == 2 && replicas == 1
                },
            );
        }
        SentinelSetup {
            primary,
            replica,
            sentinels,
        }
    }

    /// `redis+sentinel://127.0.0.1:S1,127.0.0.1:S2,127.0.0.1:S3/herdmaster`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/{MASTER}", hosts.join(","))
    }

    /// The port of the master as the first sentinel that answers names it now.
    pub fn master_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|s| {
            query::<(String, u16)>(s.port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER])
                .ok()
                .map(|(_, port)| port)
        })
    }
}

/// Polls `ready` every 50 ms; panics after `limit`.
pub fn wait(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The guard of a suite declared for Sentinel (`*_sentinel.rs`): proves that the harness starts a
/// Sentinel setup for it, that the sentinels answer and that herd writes to the master they name.
pub async fn assert_suite_runs_through_sentinel() {
    let redis = TestRedis::start(Topology::Sentinel);
    let TestRedis::Sentinel(setup) = &redis else {
        panic!("the harness started something else than a Sentinel setup")
    };
    assert!(
        redis.url().starts_with("redis+sentinel://"),
        "{}",
        redis.url()
    );
    assert_eq!(
        setup.master_port(),
        Some(setup.primary.port()),
        "the sentinels answer and name the primary"
    );
    let client = herd::RedisClient::connect(config(&redis, "guard"))
        .await
        .expect("connect through the sentinels");
    herd::Globals::new(client.clone())
        .group("guard")
        .expect("group")
        .set("v", &1)
        .await
        .expect("set through Sentinel");
    let pattern = format!("{}:g:*", client.config().prefix());
    assert_eq!(
        setup.primary.keys(&pattern).len(),
        1,
        "written on the master"
    );
}
