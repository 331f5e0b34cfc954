//! A private 3-primary Redis Cluster on free loopback ports (a suite picks it with
//! [`Topology::Cluster`], see [`super::topology`]).
//!
//! The cluster is three [`RedisServer`]s started with `--cluster-enabled yes`, joined by
//! `redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes`; [`RedisCluster::start`]
//! returns once every node reports `cluster_state:ok`. Each node keeps its `nodes.conf` in its own
//! temp dir, so [`RedisCluster::restart`] brings the same cluster back (empty). Nodes are killed on
//! drop and their logs printed when the test is failing.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use super::topology::{config, TestRedis, Topology};
use super::RedisServer;

/// Three cluster-enabled primaries holding all 16384 slots.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

const NODE_ARGS: [&str; 6] = [
    "--cluster-enabled",
    "yes",
    "--cluster-config-file",
    "nodes.conf",
    "--cluster-node-timeout",
    "2000",
];

impl RedisCluster {
    /// Starts three nodes and creates the cluster; panics with the logs if that fails.
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| RedisServer::start_with(&NODE_ARGS))
            .collect();
        let cluster = RedisCluster { nodes };
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli (it comes with redis-server) must be on PATH");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ok();
        cluster
    }

    /// Waits until every node says `cluster_state:ok` and knows all three primaries.
    fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = self.nodes.iter().all(|n| {
                let Ok(mut c) = redis::Client::open(n.url())
                    .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                else {
                    return false;
                };
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut c)
                    .unwrap_or_default();
                info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3")
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not reach cluster_state:ok in 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// The nodes (all primaries).
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Runs one command on the node owning its key (`args[1]`), following `MOVED`.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut port = self.nodes[0].port();
        for _ in 0..4 {
            let mut cmd = redis::cmd(args[0]);
            for a in &args[1..] {
                cmd.arg(*a);
            }
            let url = format!("redis://127.0.0.1:{port}");
            let mut conn = redis::Client::open(url)
                .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
                .expect("connect to a cluster node");
            match cmd.query::<T>(&mut conn) {
                Ok(v) => return v,
                Err(e) => match e.redirect_node() {
                    Some((addr, _)) => {
                        port = addr
                            .rsplit_once(':')
                            .and_then(|(_, p)| p.parse().ok())
                            .expect("MOVED address")
                    }
                    None => panic!("{args:?} failed: {e}"),
                },
            }
        }
        panic!("{args:?}: too many redirects");
    }

    /// The node (index) that owns `slot` now, as node 0 sees it.
    pub fn owner_of(&self, slot: u16) -> usize {
        let slots: Vec<(u16, u16, Vec<redis::Value>)> = self.nodes[0].cmd(&["CLUSTER", "SLOTS"]);
        let port = slots
            .iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .and_then(|(_, _, primary)| match primary.get(1) {
                Some(redis::Value::Int(port)) => Some(*port as u16),
                _ => None,
            })
            .expect("every slot is served");
        self.nodes
            .iter()
            .position(|n| n.port() == port)
            .expect("a known node")
    }

    /// The slot of a key.
    pub fn slot_of(&self, key: &str) -> u16 {
        self.nodes[0].cmd::<u16>(&["CLUSTER", "KEYSLOT", key])
    }

    /// Moves `slot` and its keys from node `from` to node `to` the way `redis-cli --cluster reshard`
    /// does (`IMPORTING`/`MIGRATING`, `MIGRATE`, `SETSLOT NODE`), pausing `pause` after each step so
    /// that clients meet `ASK` (keys already moved, slot not yet handed over) and then `MOVED`.
    pub fn migrate_slot(&self, slot: u16, from: usize, to: usize, pause: Duration) {
        let (src, dst) = (&self.nodes[from], &self.nodes[to]);
        let src_id: String = src.cmd(&["CLUSTER", "MYID"]);
        let dst_id: String = dst.cmd(&["CLUSTER", "MYID"]);
        let slot = slot.to_string();
        let _: () = dst.cmd(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &src_id]);
        let _: () = src.cmd(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &dst_id]);
        std::thread::sleep(pause);
        loop {
            let keys: Vec<String> = src.cmd(&["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
            if keys.is_empty() {
                break;
            }
            let port = dst.port().to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            let _: String = src.cmd(&args);
        }
        std::thread::sleep(pause);
        for node in [dst, src] {
            let _: () = node.cmd(&["CLUSTER", "SETSLOT", &slot, "NODE", &dst_id]);
        }
        for node in &self.nodes {
            // The third node learns it by gossip; tell it at once.
            let _: redis::RedisResult<()> = redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(&slot)
                .arg("NODE")
                .arg(&dst_id)
                .query(&mut node.conn());
        }
    }

    /// Keys matching a pattern, from every node.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        self.nodes.iter().flat_map(|n| n.keys(pattern)).collect()
    }

    /// Keys in all nodes.
    pub fn dbsize(&self) -> i64 {
        self.nodes.iter().map(RedisServer::dbsize).sum()
    }

    /// `INFO commandstats` summed over the nodes.
    pub fn command_calls(&self) -> HashMap<String, u64> {
        let mut all = HashMap::new();
        for n in &self.nodes {
            for (k, v) in n.command_calls() {
                *all.entry(k).or_insert(0) += v;
            }
        }
        all
    }

    /// Resets `INFO commandstats` on every node.
    pub fn reset_stats(&self) {
        self.nodes.iter().for_each(RedisServer::reset_stats);
    }

    /// Kills every node.
    pub fn kill(&mut self) {
        self.nodes.iter_mut().for_each(RedisServer::kill);
    }

    /// Starts every node again on its port with its `nodes.conf`: the same cluster, empty.
    pub fn restart(&mut self) {
        self.nodes.iter_mut().for_each(RedisServer::restart);
        self.wait_ok();
    }
}

/// The guard of a suite declared for a cluster (`*_cluster.rs`): proves that the harness starts a
/// cluster for it and that herd routes by slot through the cluster URL (keys of several groups
/// land on several nodes).
pub async fn assert_suite_runs_on_a_cluster() {
    let redis = TestRedis::start(Topology::Cluster);
    let TestRedis::Cluster(cluster) = &redis else {
        panic!("the harness started something else than a cluster")
    };
    assert!(
        redis.url().starts_with("redis+cluster://"),
        "{}",
        redis.url()
    );
    for node in cluster.nodes() {
        let info: String = node.cmd(&["CLUSTER", "INFO"]);
        assert!(
            info.contains("cluster_state:ok") && info.contains("cluster_size:3"),
            "{info}"
        );
    }
    let client = herd::RedisClient::connect(config(&redis, "guard"))
        .await
        .expect("connect");
    let globals = herd::Globals::new(client.clone());
    for g in 0..12 {
        globals
            .group(&format!("g{g}"))
            .expect("group")
            .set("v", &g)
            .await
            .expect("set through the cluster");
    }
    let pattern = format!("{}:g:*", client.config().prefix());
    let nodes_with_keys = cluster
        .nodes()
        .iter()
        .filter(|n| !n.keys(&pattern).is_empty())
        .count();
    assert!(
        nodes_with_keys >= 2,
        "12 groups all landed on one node: not routed by slot"
    );
}
