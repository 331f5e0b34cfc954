//! The connection to Redis that sessions and globals share.
//!
//! Two kinds of connection, each for what it does best:
//!
//! * **one multiplexed connection** ([`redis::aio::ConnectionManager`]) for plain commands, pipelines,
//!   scripts and `MULTI`/`EXEC` blocks sent as one pipeline. Concurrent requests share it and their
//!   commands are pipelined on the wire, which is what makes a one-round-trip request cheap. It
//!   reconnects by itself after Redis comes back.
//! * **a pool of dedicated connections** (deadpool-redis) for `WATCH`, which is connection state and
//!   must never be shared. deadpool-redis sends `UNWATCH` when it recycles a connection.
//!
//! The same two kinds work on every topology the URL names (see [`Config`], and the guide
//! `docs/scaling-out.md` in the repository):
//!
//! | topology | multiplexed connection | dedicated connections (`WATCH`) |
//! |---|---|---|
//! | one server, `redis://` or `rediss://` (TLS) | [`ConnectionManager`] | deadpool-redis pool |
//! | Redis Cluster, `redis+cluster://` | redis-rs `cluster_async` connection (routes by slot, follows `MOVED`/`ASK`) | none: `WATCH` cannot span a cluster client; herd uses a compare-and-swap script instead (`globals/compare_and_swap.lua`) |
//! | Sentinel, `redis+sentinel://.../<master>` | a multiplexed connection to the master the sentinels name, looked up again after an error | deadpool-redis' sentinel pool |
//!
//! **Retries on a cluster.** redis-rs' own retries are turned off (`retries(0)`) because redis-rs
//! re-sends a request whose connection dropped or failed with an I/O error — a write whose outcome is
//! unknown. herd re-sends only what the server refused before running it: `MOVED` (after the slot
//! map refresh redis-rs starts on its own), `ASK` (a command goes to the named node after `ASKING`;
//! a pipeline waits until the slot is handed over), `TRYAGAIN`,
//! `CLUSTERDOWN`, `MASTERDOWN` and `LOADING`, with a short backoff, all within the command timeout.
//! There is no per-node response timeout inside redis-rs: herd's own timeout drops the request, and a
//! dropped request is never retried by redis-rs.
//!
//! # Deadlines and fail-fast: what Redis trouble costs a request
//!
//! Every wait is bounded: connecting, each round trip ([`Config::command_timeout`]), waiting for a
//! pooled connection, recycling one. A round trip that times out is an error the caller sees at once
//! ([`Error::Unavailable`] for reads, [`Error::OutcomeUnknown`] for writes), never a hang. Two rules
//! on top of those bounds make Redis trouble cheap for the requests that meet it:
//!
//! **One deadline per request.** [`SessionLayer`](crate::SessionLayer) (and, for apps that use only
//! globals, [`RequestDeadlineLayer`]) gives each request a deadline: the time it reached the layer
//! plus [`Config::request_timeout`] (`HERD_REQUEST_TIMEOUT_MS`, default 2 s). Every Redis call made
//! for that request — session load and save, globals, the wait for a pooled connection, `WATCH`,
//! `EXEC`, the compare-and-swap script — ends by the earlier of its own timeout and that deadline,
//! so a request that makes three round trips during a stall fails after one deadline, not three. A
//! call made once the deadline has passed fails at once, without sending anything. The deadline is
//! an instant kept in a tokio task-local: no timer is armed per request, only the one a round trip
//! arms while it actually waits for Redis. Outside a request (a spawned task, a job) only the
//! per-call timeouts apply, or a deadline of your own with [`with_deadline`].
//!
//! **A circuit breaker per client.** Each [`RedisClient`] (and its clones) keeps a breaker fed by
//! its own traffic:
//!
//! | state | calls | leaves it when |
//! |---|---|---|
//! | closed | go out | calls get no answer (timeout, connection refused or dropped, I/O error) for 500 ms, **and no call was answered since the first of them began**: then open |
//! | open | fail at once with [`Error::Unavailable`] (503 + `Retry-After`), nothing sent; calls waiting for a pooled connection stop waiting and fail too | the probe task's next tick (every 200 ms): half-open |
//! | half-open | fail at once; one `PING` (the probe) is in flight, bounded by the command timeout | the probe is answered: closed; it is not: open again |
//!
//! "No call answered since the first began" is what tells a stopped or frozen Redis from a busy
//! one: under a burst a slow reply times out while others keep arriving, and the breaker stays
//! closed. The 500 ms of silence keep one dropped connection (redis-rs reconnects at once), a call
//! cut short by a nearly spent deadline, or a distant Redis from opening it.
//! Any answer (a value or an error reply) closes the breaker, and so does a call already in flight
//! that is answered late. A wait for a pooled connection that lasts a command timeout with no
//! answer from Redis to anyone meanwhile counts as silence too (deadpool checks idle connections
//! one by one before lending one). While closed and idle (no answer for 2 s), the probe task sends a `PING`
//! too, so that an idle worker learns about an outage before its next visitor does. Probes are not
//! counted in [`round_trips`](RedisClient::round_trips). Nothing is retried by the breaker: a call
//! that failed is reported as it failed (a write whose reply never came stays
//! [`Error::OutcomeUnknown`]), and a call refused by an open breaker was never sent. The state is
//! visible through [`RedisClient::health`], the `herd_redis_breaker_open` gauge and
//! `herd_redis_breaker_opened_total` counter (feature `metrics`, see [`observe`](crate::observe)),
//! and, under the launcher with `--metrics` or `--dashboard`, in the `redis` column of
//! `herd status` and on the dashboard (`closed`, or `open` and since when). Without a tokio
//! runtime at [`RedisClient::new`] there is no probe task, and the breaker never opens.
//!
//! **Choosing the deadline.** The breaker makes outages cheap whatever the deadline: against a
//! stopped or frozen Redis, a request fails within about one command timeout, the next ones at
//! once. The deadline bounds what a *slow but answering* Redis may cost: a request queueing for a
//! pooled connection behind a burst of `WATCH` transactions, or retrying a contended update. Raise
//! it for routes that may wait (the flagship example allows 15 s for its transfers), lower it to
//! shed load sooner.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::topology::{redact_url, Topology};

mod breaker;
#[cfg(feature = "cluster")]
mod cluster;
mod commands;
mod connection;
mod deadline;
mod dedicated;
mod pubsub;
mod round_trip;

pub(crate) use connection::DedicatedConnection;
use round_trip::Gate;
#[cfg(feature = "sentinel")]
mod sentinel;

use breaker::Breaker;
pub use breaker::{BreakerState, RedisHealth};
pub use deadline::{with_deadline, RequestDeadline, RequestDeadlineLayer, WithDeadline};

/// Whether a call may change data in Redis. It decides what a call that got no reply reports: a
/// read is [`Error::Unavailable`], but a write may have been applied before its reply was lost, so
/// it is [`Error::OutcomeUnknown`] (never retried blindly). On a cluster it also decides whether a
/// refused pipeline may be re-sent (see `client/cluster.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Reads only: a lost reply means Redis was unavailable.
    ReadOnly,
    /// May write: a lost reply leaves the outcome unknown.
    MayWrite,
}

/// A cheap-to-clone handle on Redis: one multiplexed connection plus a pool of dedicated connections,
/// with the [`Config`] they were made from.
///
/// ```no_run
/// # async fn run() -> herd::Result<()> {
/// let redis = herd::RedisClient::connect(herd::Config::from_env()?).await?;
/// let sessions = herd::SessionLayer::from_env(redis.clone())?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisClient {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    keys: Keys,
    shared: Shared,
    pool: DedicatedPool,
    round_trips: AtomicU64,
    breaker: Breaker,
}

/// The multiplexed connection of each topology.
enum Shared {
    Single(ConnectionManager),
    #[cfg(feature = "cluster")]
    Cluster(Box<ClusterShared>),
    #[cfg(feature = "sentinel")]
    Sentinel(Arc<sentinel::Master>),
}

/// A cluster client and its connection, made on first use.
#[cfg(feature = "cluster")]
struct ClusterShared {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::OnceCell<redis::cluster_async::ClusterConnection>,
    /// Requests re-sent after `MOVED` or `ASK` ([`RedisClient::cluster_redirects`]).
    redirects: Arc<AtomicU64>,
}

/// The pool of dedicated connections of each topology.
enum DedicatedPool {
    Single(deadpool_redis::Pool),
    #[cfg(feature = "cluster")]
    None,
    #[cfg(feature = "sentinel")]
    Sentinel(deadpool_redis::sentinel::Pool),
}

impl std::fmt::Debug for RedisClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClient")
            .field("url", &redact_url(&self.inner.config.redis_url))
            .field("prefix", &self.inner.config.prefix)
            .finish_non_exhaustive()
    }
}

/// Construction: nothing touches the network until the first call.
impl RedisClient {
    /// Builds the client without touching the network: connections open on first use, so a worker
    /// starts (and answers 503 where Redis is needed) even while Redis is down. Must be called inside
    /// a tokio runtime.
    ///
    /// # Errors
    /// [`Error::Config`] if the URL cannot be used; [`Error::Unsupported`] for a CA file
    /// (`HERD_REDIS_CA_FILE`) together with Sentinel.
    pub fn new(config: Config) -> Result<RedisClient> {
        let url = redact_url(&config.redis_url);
        let bad = |e: &dyn std::fmt::Display| Error::Config(format!("REDIS_URL `{url}`: {e}"));
        let (shared, pool) = match config.topology.clone() {
            Topology::Single(u) => {
                let client = single_client(&config, &u).map_err(|e| bad(&e))?;
                let manager_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(config.connect_timeout))
                    // No timer of its own: every round trip is already bounded by herd's
                    // (`run_alongside`), and a second timer per request is measurable. (redis-rs
                    // does not reconnect on a response timeout either way.)
                    .set_response_timeout(None)
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(20))
                    .set_max_delay(Duration::from_millis(200));
                let manager = deadpool_redis::Manager::new(client.get_connection_info().clone())
                    .map_err(|e| bad(&e))?;
                let conn = ConnectionManager::new_lazy_with_config(client, manager_config)
                    .map_err(|e| bad(&e))?;
                let pool = deadpool_redis::Pool::builder(manager)
                    .config(pool_config(&config))
                    .runtime(deadpool_redis::Runtime::Tokio1)
                    .build()
                    .map_err(|e| bad(&e))?;
                (Shared::Single(conn), DedicatedPool::Single(pool))
            }
            #[cfg(feature = "cluster")]
            Topology::Cluster(nodes) => {
                #[allow(unused_mut)]
                let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
                    // redis-rs would re-send requests that failed with an I/O error (outcome
                    // unknown); herd retries only refusals itself (see the module docs).
                    .retries(0)
                    .connection_timeout(config.connect_timeout);
                #[cfg(feature = "tls")]
                if let Some(ca) = &config.ca_pem {
                    builder = builder.certs(redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(ca.clone()),
                    });
                }
                let client = builder.build().map_err(|e| bad(&e))?;
                let shared = ClusterShared {
                    client,
                    conn: tokio::sync::OnceCell::new(),
                    redirects: Arc::new(AtomicU64::new(0)),
                };
                (Shared::Cluster(Box::new(shared)), DedicatedPool::None)
            }
            #[cfg(feature = "sentinel")]
            Topology::Sentinel {
                sentinels,
                master,
                tls,
                username,
                password,
                db,
            } => {
                if config.ca_pem.is_some() {
                    return Err(Error::Unsupported(
                        "HERD_REDIS_CA_FILE is not supported with Sentinel yet: install the CA in the system roots".into(),
                    ));
                }
                let node = deadpool_redis::sentinel::SentinelNodeConnectionInfo {
                    tls_mode: tls.then_some(deadpool_redis::sentinel::TlsMode::Secure),
                    redis_connection_info: Some(deadpool_redis::RedisConnectionInfo {
                        db,
                        username,
                        password,
                        protocol: Default::default(),
                    }),
                };
                let shared = sentinel::Master::new(&config, &sentinels, &master, node.clone())
                    .map_err(|e| bad(&e))?;
                let manager = deadpool_redis::sentinel::Manager::new(
                    sentinels,
                    master,
                    Some(node),
                    deadpool_redis::sentinel::SentinelServerType::Master,
                )
                .map_err(|e| bad(&e))?;
                let pool = deadpool_redis::sentinel::Pool::builder(manager)
                    .config(pool_config(&config))
                    .runtime(deadpool_redis::Runtime::Tokio1)
                    .build()
                    .map_err(|e| bad(&e))?;
                (
                    Shared::Sentinel(Arc::new(shared)),
                    DedicatedPool::Sentinel(pool),
                )
            }
            #[allow(unreachable_patterns)]
            _ => return Err(bad(&"this topology needs a cargo feature of herd")),
        };

        let client = RedisClient {
            inner: Arc::new(Inner {
                keys: Keys::new(&config.prefix),
                config,
                shared,
                pool,
                round_trips: AtomicU64::new(0),
                breaker: Breaker::new(tokio::runtime::Handle::try_current().is_ok()),
            }),
        };
        client.spawn_probe();
        Ok(client)
    }

    /// [`new`](Self::new), then one `PING` to prove Redis answers.
    ///
    /// # Errors
    /// As [`new`](Self::new); [`Error::Unavailable`] if Redis does not answer in time.
    pub async fn connect(config: Config) -> Result<RedisClient> {
        let client = RedisClient::new(config)?;
        client.ping().await?;
        Ok(client)
    }

    /// One `PING` round trip: a health check.
    ///
    /// # Errors
    /// [`Error::Unavailable`] if Redis does not answer within the command timeout.
    pub async fn ping(&self) -> Result<()> {
        let pong: String = self
            .run(Effect::ReadOnly, |mut c| async move {
                redis::cmd("PING").query_async(&mut c).await
            })
            .await?;
        debug_assert_eq!(pong, "PONG");
        Ok(())
    }
}

/// What the client is and what it has done.
impl RedisClient {
    /// The configuration this client was built from.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// How many round trips to Redis this client (and every clone of it) has made. Tests use it to
    /// check the round-trip budget; it is also a cheap metric.
    pub fn round_trips(&self) -> u64 {
        self.inner.round_trips.load(Ordering::Relaxed)
    }

    /// Counts one round trip made outside [`run`](Self::run) (on a dedicated connection).
    pub(crate) fn count_round_trip(&self) {
        self.inner.round_trips.fetch_add(1, Ordering::Relaxed);
        crate::observe::round_trip();
    }

    pub(crate) fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// True when connected to a Redis Cluster: commands of one request may live in different slots
    /// and must then be sent one slot at a time.
    pub(crate) fn is_cluster(&self) -> bool {
        match &self.inner.shared {
            #[cfg(feature = "cluster")]
            Shared::Cluster(_) => true,
            _ => false,
        }
    }

    /// How many times a request of this client (and its clones) to a Redis Cluster was re-sent
    /// after the server refused it with `MOVED` or `ASK` (for tests and diagnostics; not a stable
    /// API). Always 0 on other topologies.
    #[doc(hidden)]
    pub fn cluster_redirects(&self) -> u64 {
        match &self.inner.shared {
            #[cfg(feature = "cluster")]
            Shared::Cluster(cluster) => cluster.redirects.load(Ordering::Relaxed),
            _ => 0,
        }
    }
}

/// Redis' health: the circuit breaker and its probe.
impl RedisClient {
    /// What this client knows of Redis' health: the breaker's state and since when (see the
    /// [module docs](self)).
    pub fn health(&self) -> RedisHealth {
        self.inner.breaker.health()
    }

    /// Starts the probe task (see the [module docs](self)) if a tokio runtime is running. It holds
    /// the client weakly and ends once every clone of the client is dropped.
    fn spawn_probe(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(breaker::PROBE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let client = RedisClient { inner };
                if client.inner.breaker.wants_probe(std::time::Instant::now()) {
                    let probe = client
                        .shared_round_trip(Effect::ReadOnly, Gate::Probe, |mut c| async move {
                            redis::cmd("PING").query_async::<()>(&mut c).await
                        })
                        .await;
                    // The outcome was fed to the breaker; a half-open breaker that heard nothing
                    // conclusive (the deadline of no request applies here) goes back to open.
                    if probe.is_err() {
                        client.inner.breaker.probe_abandoned();
                    }
                }
            }
        });
    }
}

/// Opens a single-server client, with the configured CA for `rediss://`.
fn single_client(config: &Config, url: &str) -> redis::RedisResult<redis::Client> {
    #[cfg(feature = "tls")]
    if let Some(ca) = &config.ca_pem {
        return redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.clone()),
            },
        );
    }
    let _ = config;
    redis::Client::open(url)
}

fn pool_config(config: &Config) -> deadpool_redis::PoolConfig {
    let mut pool = deadpool_redis::PoolConfig::new(config.pool_size);
    pool.timeouts.wait = Some(config.pool_wait_timeout);
    pool.timeouts.create = Some(config.connect_timeout);
    pool.timeouts.recycle = Some(config.command_timeout);
    pool
}
