//! Real Redis for tests and local runs (feature `testing`): a private `redis-server` on a free
//! loopback port, a small Redis Cluster, and the "which Redis does this app use" rule of the
//! examples. Tests of your handlers then run against the real thing, no mock:
//!
//! ```no_run
//! # async fn t() -> Result<(), Box<dyn std::error::Error>> {
//! let server = herd::testing::RedisServer::start()?;
//! let config = herd::Config::builder()
//!     .redis_url(server.url())
//!     .prefix("test-checkout")
//!     .build()?;
//! let redis = herd::RedisClient::connect(config).await?;
//! // build the app's Router with herd::SessionLayer::new(redis), send it requests ...
//! server.freeze(); // and see every route that needs Redis answer 503 within the deadline
//! # Ok(()) }
//! ```
//!
//! Each server runs `redis-server` from `PATH` without persistence (`--save "" --appendonly no`),
//! in a process group of its own (a Ctrl-C to the terminal does not stop it before the app that
//! uses it has drained) and, on Linux, is killed if the process that started it dies
//! (`PR_SET_PDEATHSIG`), so that no server outlives a killed test. Dropping the handle kills and
//! reaps it.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A failure to start a server: a sentence saying what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(String);

/// A private `redis-server` on a free port of 127.0.0.1, stopped when dropped.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    dir: Option<PathBuf>,
}

impl RedisServer {
    /// Starts a server and waits (up to 5 s) until it accepts connections.
    ///
    /// # Errors
    /// [`StartError`] when `redis-server` is not installed, no port is free, or it does not start.
    pub fn start() -> Result<RedisServer, StartError> {
        RedisServer::start_with(&[])
    }

    /// [`start`](Self::start) with extra `redis-server` arguments (`["--maxmemory", "1mb"]`).
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub fn start_with(extra: &[&str]) -> Result<RedisServer, StartError> {
        let args: Vec<String> = extra.iter().map(|a| (*a).to_owned()).collect();
        RedisServer::start_on_a_free_port(|_| Ok((args.clone(), None)))
    }

    /// Starts a server on a port free now, with the arguments (and the directory to remove on
    /// drop) `setup` gives for that port. Another process may take the port between the check
    /// and the server's bind: then the server exits, and another port is tried (5 in all).
    fn start_on_a_free_port(
        setup: impl Fn(u16) -> Result<(Vec<String>, Option<PathBuf>), StartError>,
    ) -> Result<RedisServer, StartError> {
        let mut last = StartError("no attempt".into());
        for _ in 0..5 {
            let port = free_port()?;
            let (args, dir) = setup(port)?;
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut server = RedisServer {
                port,
                child: Some(spawn_server(port, &args)?),
                dir,
            };
            match server.wait_until_up() {
                Ok(()) => return Ok(server),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id (`None` once killed).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Freezes the server (`SIGSTOP`): connections stay open, nothing answers, as a hung host.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Thaws a frozen server (`SIGCONT`).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    /// Kills the server (`SIGKILL`) and reaps it; [`restart`](Self::restart) brings it back on the
    /// same port, empty.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (after [`kill`](Self::kill)).
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub fn restart(&mut self) -> Result<(), StartError> {
        self.kill();
        self.child = Some(spawn_server(self.port, &[])?);
        self.wait_until_up()
    }

    fn wait_until_up(&mut self) -> Result<(), StartError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !answers(self.port, Duration::from_millis(100)) {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                return Err(StartError(format!(
                    "the private redis-server on port {} did not start",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A small Redis Cluster on free ports of 127.0.0.1: `n` masters, no replicas, the 16384 slots
/// split evenly; stopped when dropped.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `n` (at least 1) cluster nodes, joins them and waits (up to 10 s) until every node
    /// reports `cluster_state:ok`.
    ///
    /// # Errors
    /// [`StartError`] as for [`RedisServer::start`], or when the cluster does not form.
    pub fn start(n: usize) -> Result<RedisCluster, StartError> {
        let n = n.max(1);
        let mut nodes = Vec::with_capacity(n);
        for _ in 0..n {
            nodes.push(RedisServer::start_on_a_free_port(|port| {
                let dir = std::env::temp_dir()
                    .join(format!("herd-cluster-{}-{port}", std::process::id()));
                let _ = std::fs::create_dir_all(&dir);
                let dir_arg = dir.to_string_lossy().into_owned();
                // The bus port defaults to port + 10000: over 65535 (Redis refuses to start) for
                // a fifth of the ephemeral ports, and possibly taken. Pick it free as well.
                let bus = free_port()?.to_string();
                let args = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus,
                    "--dir",
                    &dir_arg,
                ];
                Ok((args.map(str::to_owned).to_vec(), Some(dir)))
            })?);
        }
        let cluster = RedisCluster { nodes };
        cluster.form()?;
        Ok(cluster)
    }

    fn form(&self) -> Result<(), StartError> {
        let fail = |what: &str, e: redis::RedisError| StartError(format!("{what}: {e}"));
        let n = self.nodes.len();
        let (_, first_bus): (String, u16) = node_conn(self.nodes[0].port)
            .and_then(|mut c| {
                redis::cmd("CONFIG")
                    .arg("GET")
                    .arg("cluster-port")
                    .query(&mut c)
            })
            .map_err(|e| fail("CONFIG GET cluster-port", e))?;
        for (i, node) in self.nodes.iter().enumerate() {
            let mut conn = node_conn(node.port).map_err(|e| fail("connect", e))?;
            let first = i * 16384 / n;
            let last = (i + 1) * 16384 / n - 1;
            redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(first)
                .arg(last)
                .query::<()>(&mut conn)
                .map_err(|e| fail("CLUSTER ADDSLOTSRANGE", e))?;
            if i > 0 {
                redis::cmd("CLUSTER")
                    .arg("MEET")
                    .arg("127.0.0.1")
                    .arg(self.nodes[0].port)
                    .arg(first_bus)
                    .query::<()>(&mut conn)
                    .map_err(|e| fail("CLUSTER MEET", e))?;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ready = self.nodes.iter().all(|node| {
                node_conn(node.port)
                    .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query::<String>(&mut c))
                    .is_ok_and(|info| {
                        info.contains("cluster_state:ok")
                            && info.contains(&format!("cluster_known_nodes:{n}\r"))
                    })
            });
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(StartError(
                    "the Redis Cluster did not form within 10 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...` (herd's `cluster` feature reads it).
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// The nodes, to freeze or kill one.
    pub fn nodes(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }
}

fn node_conn(port: u16) -> redis::RedisResult<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_connection_with_timeout(Duration::from_secs(2))
}

/// The Redis an app run from a terminal uses, as the examples decide it:
///
/// * `REDIS_URL` set (not blank): that Redis, as given (nothing is started);
/// * else, something answers on `127.0.0.1:6379`: that one;
/// * else: a private [`RedisServer`] started for this run (one line on stdout says so), stopped
///   when this is dropped. Its data is not kept.
#[derive(Debug)]
pub struct LocalRedis {
    url: String,
    source: &'static str,
    private: Option<RedisServer>,
}

impl LocalRedis {
    /// Finds or starts the Redis for the app named `app` (named in the one line printed when a
    /// private server is started).
    ///
    /// # Errors
    /// [`StartError`] with a sentence saying what to do when nothing answers on the default
    /// address and `redis-server` cannot be started.
    pub fn find_or_start(app: &str) -> Result<LocalRedis, StartError> {
        if let Some(url) = std::env::var("REDIS_URL")
            .ok()
            .filter(|u| !u.trim().is_empty())
        {
            return Ok(LocalRedis {
                url,
                source: "REDIS_URL",
                private: None,
            });
        }
        if answers(6379, Duration::from_millis(300)) {
            return Ok(LocalRedis {
                url: "redis://127.0.0.1:6379".into(),
                source: "the default address redis://127.0.0.1:6379",
                private: None,
            });
        }
        let server = RedisServer::start()?;
        println!(
            "{app}: no Redis on 127.0.0.1:6379 and REDIS_URL is unset, so a private redis-server \
             runs on {} for this run (data is not kept; it stops with {app})",
            server.url()
        );
        Ok(LocalRedis {
            url: server.url(),
            source: "the private redis-server",
            private: Some(server),
        })
    }

    /// The URL to connect to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where the URL came from, for messages (never the URL itself: it may hold a password).
    pub fn source(&self) -> &'static str {
        self.source
    }

    /// True when a private server was started for this run.
    pub fn is_private(&self) -> bool {
        self.private.is_some()
    }
}

fn free_port() -> Result<u16, StartError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| StartError(format!("no free port for a private redis-server: {e}")))
}

/// Starts `redis-server` on `127.0.0.1:port` without persistence, in its own process group and,
/// on Linux, killed when the thread that started it dies.
fn spawn_server(port: u16, extra: &[&str]) -> Result<Child, StartError> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .process_group(0);
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id();
        // SAFETY: runs in the forked child before exec and only makes async-signal-safe calls
        // (prctl, getppid) on plain integers, allocating nothing. The death signal is tied to the
        // thread that forks: start servers from a thread that lives as long as they should.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || {
                use nix::libc;
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died before the prctl: nobody would ever stop this Redis.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
    cmd.spawn().map_err(|e| {
        StartError(if e.kind() == std::io::ErrorKind::NotFound {
            "no Redis answers on 127.0.0.1:6379 and redis-server is not installed. Install it \
             (`sudo apt-get install redis-server`, `brew install redis`) or set REDIS_URL to a \
             running Redis."
                .to_owned()
        } else {
            format!("cannot start redis-server: {e}")
        })
    })
}

/// True when something accepts connections on `127.0.0.1:port`.
fn answers(port: u16, timeout: Duration) -> bool {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    TcpStream::connect_timeout(&addr, timeout).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_server_answers_and_is_gone_after_drop() {
        let server = RedisServer::start().expect("redis-server");
        let mut conn = node_conn(server.port()).expect("connect");
        let pong: String = redis::cmd("PING").query(&mut conn).expect("ping");
        assert_eq!(pong, "PONG");
        let port = server.port();
        drop(server);
        assert!(!answers(port, Duration::from_millis(200)));
    }

    #[test]
    fn a_small_cluster_forms_and_splits_the_slots() {
        let mut cluster = RedisCluster::start(3).expect("cluster");
        assert_eq!(
            cluster.url().matches("127.0.0.1:").count(),
            3,
            "{}",
            cluster.url()
        );
        // Each node owns a third of the slots: a key is refused (MOVED) by all nodes but one.
        let ports: Vec<u16> = cluster.nodes().iter().map(RedisServer::port).collect();
        let accepted = ports
            .iter()
            .filter(|port| {
                let mut conn = node_conn(**port).expect("connect");
                redis::cmd("SET")
                    .arg("k")
                    .arg("v")
                    .query::<()>(&mut conn)
                    .is_ok()
            })
            .count();
        assert_eq!(accepted, 1);
    }
}
