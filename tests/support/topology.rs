//! Which Redis a suite runs on. Each test binary that runs on more than one topology says so at its
//! crate root with `const TOPOLOGY: Topology`: `tests/session.rs` declares [`Topology::Single`],
//! and `tests/session_cluster.rs` includes the same file as a module and declares
//! [`Topology::Cluster`]; the suite starts its Redis with `TestRedis::start(crate::TOPOLOGY)`, so
//! the crate root's declaration is the one that counts.

use std::collections::HashMap;

use super::cluster::RedisCluster;
use super::sentinel::SentinelSetup;
use super::RedisServer;

/// The kinds of Redis a suite can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// One `redis-server`.
    Single,
    /// A private 3-primary Redis Cluster ([`RedisCluster`]).
    Cluster,
    /// A primary, a replica and three sentinels ([`SentinelSetup`]); herd connects through the
    /// sentinels.
    Sentinel,
}

/// A running Redis of one [`Topology`], and what the suites ask of it whatever the topology.
pub enum TestRedis {
    /// One `redis-server`.
    Single(RedisServer),
    /// A 3-primary cluster.
    Cluster(RedisCluster),
    /// A primary, a replica and three sentinels; herd connects through the sentinels.
    Sentinel(Box<SentinelSetup>),
}

impl TestRedis {
    /// A fresh Redis of the given topology (a suite passes its `crate::TOPOLOGY`).
    pub fn start(topology: Topology) -> TestRedis {
        match topology {
            Topology::Single => TestRedis::Single(RedisServer::start()),
            Topology::Cluster => TestRedis::Cluster(RedisCluster::start()),
            Topology::Sentinel => TestRedis::Sentinel(Box::new(SentinelSetup::start())),
        }
    }

    /// The topology it is.
    pub fn topology(&self) -> Topology {
        match self {
            TestRedis::Single(_) => Topology::Single,
            TestRedis::Cluster(_) => Topology::Cluster,
            TestRedis::Sentinel(_) => Topology::Sentinel,
        }
    }

    /// The URL herd connects with.
    pub fn url(&self) -> String {
        match self {
            TestRedis::Single(s) => s.url(),
            TestRedis::Cluster(c) => c.url(),
            TestRedis::Sentinel(t) => t.url(),
        }
    }

    /// One command (on the key's node on a cluster).
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        match self {
            TestRedis::Single(s) => s.cmd(args),
            TestRedis::Cluster(c) => c.cmd(args),
            TestRedis::Sentinel(t) => t.primary.cmd(args),
        }
    }

    /// Keys matching a pattern.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        match self {
            TestRedis::Single(s) => s.keys(pattern),
            TestRedis::Cluster(c) => c.keys(pattern),
            TestRedis::Sentinel(t) => t.primary.keys(pattern),
        }
    }

    /// Number of keys.
    pub fn dbsize(&self) -> i64 {
        match self {
            TestRedis::Single(s) => s.dbsize(),
            TestRedis::Cluster(c) => c.dbsize(),
            TestRedis::Sentinel(t) => t.primary.dbsize(),
        }
    }

    /// `INFO commandstats` (summed over the nodes).
    pub fn command_calls(&self) -> HashMap<String, u64> {
        match self {
            TestRedis::Single(s) => s.command_calls(),
            TestRedis::Cluster(c) => c.command_calls(),
            TestRedis::Sentinel(t) => t.primary.command_calls(),
        }
    }

    /// Resets `INFO commandstats`.
    pub fn reset_stats(&self) {
        match self {
            TestRedis::Single(s) => s.reset_stats(),
            TestRedis::Cluster(c) => c.reset_stats(),
            TestRedis::Sentinel(t) => t.primary.reset_stats(),
        }
    }

    /// Kills the server (every node).
    pub fn kill(&mut self) {
        match self {
            TestRedis::Single(s) => s.kill(),
            TestRedis::Cluster(c) => c.kill(),
            TestRedis::Sentinel(t) => {
                t.primary.kill();
                t.replica.kill();
            }
        }
    }

    /// Starts it again, empty.
    pub fn restart(&mut self) {
        match self {
            TestRedis::Single(s) => s.restart(),
            TestRedis::Cluster(c) => c.restart(),
            TestRedis::Sentinel(t) => {
                t.primary.restart();
                t.replica.restart();
            }
        }
    }
}

/// A herd config pointing at `redis`, with a unique prefix (as [`super::config`]).
pub fn config(redis: &TestRedis, name: &str) -> herd::Config {
    super::config_at(&redis.url(), name)
}

/// Sends one request with an optional cookie through `app`; returns the status, the body as text
/// and the `name=value` of a cookie it sets.
pub async fn request(
    app: &axum::Router,
    method: &str,
    path: &str,
    cookie: Option<&str>,
) -> (http::StatusCode, String, Option<String>) {
    use tower::ServiceExt;
    let mut req = http::Request::builder().method(method).uri(path);
    if let Some(c) = cookie {
        req = req.header(http::header::COOKIE, c);
    }
    let res = app
        .clone()
        .oneshot(req.body(axum::body::Body::empty()).expect("request"))
        .await
        .expect("infallible");
    let status = res.status();
    let set_cookie = res
        .headers()
        .get(http::header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_owned);
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        String::from_utf8_lossy(&body).into_owned(),
        set_cookie,
    )
}

/// A small app for load tests: `GET /incr` increments the session counter `n` and answers its
/// value, `GET /get` answers it (0 when absent), `POST /login` writes `user` and cycles the id.
pub fn counter_app(client: &herd::RedisClient) -> axum::Router {
    use axum::routing::{get, post};
    use herd::{Session, SessionLayer};
    axum::Router::new()
        .route(
            "/incr",
            get(|s: Session| async move { s.incr("n", 1).await.map(|n| n.to_string()) }),
        )
        .route(
            "/get",
            get(|s: Session| async move {
                s.get::<i64>("n").await.map(|n| n.unwrap_or(0).to_string())
            }),
        )
        .route(
            "/login",
            post(|s: Session| async move {
                s.insert("user", "carol").await?;
                s.cycle_id().await;
                Ok::<_, herd::Error>("ok")
            }),
        )
        .layer(SessionLayer::new(client.clone()).with_key(super::test_key()).with_secure(false))
}
