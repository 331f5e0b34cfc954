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

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::topology::{redact_url, Topology};

mod breaker;
#[cfg(feature = "cluster")]
mod cluster;
mod commands;
mod deadline;
#[cfg(feature = "sentinel")]
mod sentinel;

use breaker::Breaker;
pub(crate) use breaker::Heard;
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

/// The connection [`RedisClient::run`] hands to its closure: use it with `query_async(&mut conn)`,
/// pipelines (`pipe().atomic()` included) and scripts. On a cluster, every command or pipeline must
/// stay within one hash slot (one hash tag).
#[derive(Clone)]
pub(crate) enum Connection {
    Single(ConnectionManager),
    /// With the `wrote` flag of the round trip: a non-atomic pipeline that writes is never re-sent
    /// after a refusal (see [`cluster::pipeline`]).
    #[cfg(feature = "cluster")]
    Cluster(cluster::RoundTrip),
    #[cfg(feature = "sentinel")]
    Sentinel(sentinel::MasterConnection),
}

impl Connection {
    /// Which Sentinel master connection this is (`None` on other topologies).
    fn sentinel_generation(&self) -> Option<u64> {
        match self {
            #[cfg(feature = "sentinel")]
            Connection::Sentinel(c) => Some(c.generation()),
            _ => None,
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            #[cfg(feature = "cluster")]
            Connection::Cluster(c) => Box::pin(cluster::command(c, cmd)),
            #[cfg(feature = "sentinel")]
            Connection::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "cluster")]
            Connection::Cluster(c) => Box::pin(cluster::pipeline(c, pipeline, offset, count)),
            #[cfg(feature = "sentinel")]
            Connection::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            #[cfg(feature = "cluster")]
            Connection::Cluster(c) => c.conn.get_db(),
            #[cfg(feature = "sentinel")]
            Connection::Sentinel(c) => c.get_db(),
        }
    }
}

/// A connection checked out of the pool for `WATCH` (single server or Sentinel). It derefs to a
/// [`redis::aio::MultiplexedConnection`] and goes back to the pool (after `UNWATCH`) when dropped.
pub(crate) enum DedicatedConnection {
    Single(deadpool_redis::Connection),
    #[cfg(feature = "sentinel")]
    Sentinel(deadpool_redis::sentinel::Connection),
}

impl DedicatedConnection {
    /// Takes the connection out of its pool and closes it (for a connection left mid-request).
    pub(crate) fn detach(self) {
        match self {
            DedicatedConnection::Single(c) => drop(deadpool_redis::Connection::take(c)),
            #[cfg(feature = "sentinel")]
            DedicatedConnection::Sentinel(c) => drop(deadpool_redis::sentinel::Connection::take(c)),
        }
    }
}

impl std::ops::Deref for DedicatedConnection {
    type Target = redis::aio::MultiplexedConnection;
    fn deref(&self) -> &Self::Target {
        match self {
            DedicatedConnection::Single(c) => c,
            #[cfg(feature = "sentinel")]
            DedicatedConnection::Sentinel(c) => c,
        }
    }
}

impl std::ops::DerefMut for DedicatedConnection {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            DedicatedConnection::Single(c) => c,
            #[cfg(feature = "sentinel")]
            DedicatedConnection::Sentinel(c) => c,
        }
    }
}

impl ConnectionLike for DedicatedConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        (**self).req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        (**self).req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        (**self).get_db()
    }
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

/// Round trips on the shared connection, bounded by the command timeout and the request's deadline.
impl RedisClient {
    /// The multiplexed connection (connecting it first on a cluster or through Sentinel), for a
    /// round trip that may write or not (`effect`).
    async fn connection(&self, effect: Effect) -> redis::RedisResult<Connection> {
        let _ = effect; // used on a cluster only
        match &self.inner.shared {
            Shared::Single(c) => Ok(Connection::Single(c.clone())),
            #[cfg(feature = "cluster")]
            Shared::Cluster(cluster) => cluster
                .conn
                .get_or_try_init(|| cluster.client.get_async_connection())
                .await
                .map(|c| {
                    Connection::Cluster(cluster::RoundTrip {
                        conn: c.clone(),
                        effect,
                        redirects: Arc::clone(&cluster.redirects),
                    })
                }),
            #[cfg(feature = "sentinel")]
            Shared::Sentinel(master) => master.connection().await.map(Connection::Sentinel),
        }
    }

    /// Runs one round trip on the shared multiplexed connection, bounded by the command timeout and
    /// the request's deadline; refused at once while the breaker is open (see the module docs).
    /// `effect` says whether the command can change data (it decides how a lost reply is reported).
    /// On a cluster the command or pipeline must stay within one hash slot.
    ///
    /// Not an `async fn` of its own (nor is [`run_alongside`](Self::run_alongside)): the future
    /// is the round trip's, one level less in every handler's future (rustc's layout depth limit).
    pub(crate) fn run<'a, T, F, Fut>(
        &'a self,
        effect: Effect,
        f: F,
    ) -> impl Future<Output = Result<T>> + 'a
    where
        F: FnOnce(Connection) -> Fut + 'a,
        Fut: Future<Output = redis::RedisResult<T>> + 'a,
        T: 'a,
    {
        self.shared_round_trip(effect, Gate::Counted, f)
    }

    /// [`run`](Self::run) for a request sent at the same time as another, counted one (on a cluster,
    /// commands for other slots that travel in parallel): not counted as a round trip of its own.
    pub(crate) fn run_alongside<'a, T, F, Fut>(
        &'a self,
        effect: Effect,
        f: F,
    ) -> impl Future<Output = Result<T>> + 'a
    where
        F: FnOnce(Connection) -> Fut + 'a,
        Fut: Future<Output = redis::RedisResult<T>> + 'a,
        T: 'a,
    {
        self.shared_round_trip(effect, Gate::Uncounted, f)
    }

    /// A round trip on the shared connection: refused at once while the breaker is open (except a
    /// probe), counted (or not), bounded, and fed to the breaker.
    async fn shared_round_trip<T, F, Fut>(&self, effect: Effect, gate: Gate, f: F) -> Result<T>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if gate != Gate::Probe && !self.inner.breaker.admits() {
            return Err(circuit_open());
        }
        if gate == Gate::Counted {
            self.count_round_trip();
        }
        let mut used = None; // the Sentinel connection the round trip went out on
        let used_slot = &mut used;
        let round_trip = async move {
            let conn = self.connection(effect).await?;
            *used_slot = conn.sentinel_generation();
            f(conn).await
        };
        let bound = self.bound()?;
        let outcome = tokio::time::timeout_at(bound.limit, round_trip).await;
        if outcome.is_err() {
            self.forget_after_timeout(used);
        }
        self.settle(effect, &bound, outcome)
    }

    /// Sends commands that may belong to different hash slots: one pipeline on a single server or
    /// Sentinel (one round trip), one command each and all at once on a cluster (one round trip of
    /// latency, one per node in load). The replies come back in order. Only for commands that are
    /// independent of each other: on a cluster their order of execution is not defined.
    pub(crate) async fn run_each(&self, effect: Effect, cmds: Vec<Cmd>) -> Result<Vec<Value>> {
        if !self.is_cluster() {
            let mut pipe = redis::pipe();
            for cmd in cmds {
                pipe.add_command(cmd);
            }
            return self
                .run(
                    effect,
                    |mut c| async move { pipe.query_async(&mut c).await },
                )
                .await;
        }
        // They go out together: one round trip of latency.
        self.count_round_trip();
        let each = cmds.into_iter().map(|cmd| async move {
            self.run_alongside(effect, |mut c| async move {
                cmd.query_async::<Value>(&mut c).await
            })
            .await
        });
        let replies = futures_util::future::join_all(each).await;
        replies.into_iter().collect()
    }

    /// Starts a bounded round trip: its limit is the earlier of the command timeout and the
    /// request's deadline (a call made once the deadline passed fails at once, nothing sent).
    /// Sync, with [`settle`](Self::settle), so that the callers await the round trip themselves:
    /// one async layer less in every handler's future.
    #[inline]
    fn bound(&self) -> Result<Bound> {
        let started = std::time::Instant::now(); // observe: latency histogram, error counter
        let (limit, by_deadline) = self.limit(started, self.inner.config.command_timeout);
        if by_deadline && limit <= started {
            return Err(deadline_passed());
        }
        Ok(Bound {
            started,
            limit: limit.into(),
            budget: limit - started,
            by_deadline,
        })
    }

    /// Classifies a bounded round trip's outcome and feeds it to the breaker.
    fn settle<T>(
        &self,
        effect: Effect,
        bound: &Bound,
        outcome: std::result::Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T> {
        let ended = std::time::Instant::now();
        let started = bound.started;
        let waited = ended - started;
        let breaker = &self.inner.breaker;
        let result = match outcome {
            Ok(Ok(value)) => {
                breaker.record(started, ended, Heard::Answer);
                Ok(value)
            }
            Ok(Err(e)) => {
                breaker.record(started, ended, heard(&e));
                Err(Error::from_redis(e, effect, bound.budget))
            }
            Err(_elapsed) => {
                breaker.record(started, ended, Heard::Silence);
                Err(no_reply(effect, waited, bound.by_deadline))
            }
        };
        crate::observe::redis_round_trip(waited, result.is_ok());
        result
    }

    /// When a wait that began at `now` and may last `own` must end: the earlier of `now + own` and
    /// the request's deadline; `true` when the deadline is the bound.
    #[inline]
    fn limit(&self, now: std::time::Instant, own: Duration) -> (std::time::Instant, bool) {
        let own = now + own;
        match deadline::current() {
            Some(deadline) if deadline < own => (deadline, true),
            _ => (own, false),
        }
    }

    /// After a round trip timed out: through Sentinel, drops the master connection it went out on
    /// (`generation`), so the next request asks the sentinels again. A frozen or partitioned master
    /// answers nothing at all — no error ever reaches [`sentinel::MasterConnection`]'s own checks,
    /// because the timeout drops the request first — and without this herd would keep sending to
    /// it after the sentinels promoted its replica, until it thawed.
    fn forget_after_timeout(&self, generation: Option<u64>) {
        #[cfg(feature = "sentinel")]
        if let (Shared::Sentinel(master), Some(generation)) = (&self.inner.shared, generation) {
            master.forget(generation, "no reply within the command timeout");
        }
        let _ = generation;
    }
}

/// Dedicated (pooled) connections for `WATCH`.
impl RedisClient {
    /// Checks out a dedicated connection (for `WATCH`): waits at most the pool wait timeout for a
    /// free slot, then at most one connect or command timeout to make a connection usable — the
    /// whole checkout is bounded by their sum. (deadpool pings an idle connection before lending
    /// it and, when the ping fails, moves on to the next idle one, each with its own timeout: with
    /// Redis frozen and `n` idle connections that alone was `n` command timeouts.)
    ///
    /// On a Redis Cluster there is none ([`Error::Unsupported`]): a `WATCH` must run on a connection to the
    /// node owning the slot, which the cluster client does not lend out. Use
    /// the compare-and-swap script of `globals` there (it works on every topology).
    pub(crate) async fn dedicated(&self) -> Result<DedicatedConnection> {
        // Registered before the check, so that an opening in between is not missed.
        let opening = self.inner.breaker.opening();
        tokio::pin!(opening);
        opening.as_mut().enable();
        if !self.inner.breaker.admits() {
            return Err(circuit_open());
        }
        let config = &self.inner.config;
        let pool_wait = config.pool_wait_timeout;
        let started = std::time::Instant::now(); // observe: pool wait histogram
        let (limit, by_deadline) = self.limit(
            started,
            pool_wait + config.connect_timeout.max(config.command_timeout),
        );
        if by_deadline && limit <= started {
            return Err(deadline_passed());
        }
        let breaker = &self.inner.breaker;
        let unavailable = |e: deadpool_redis::PoolError| match e {
            deadpool_redis::PoolError::Timeout(deadpool_redis::TimeoutType::Wait) => {
                Error::Unavailable {
                    reason: format!("no pooled Redis connection became free within {pool_wait:?}"),
                    source: None,
                }
            }
            // Opening or checking a connection got no answer.
            deadpool_redis::PoolError::Timeout(_) => {
                let now = std::time::Instant::now();
                breaker.record(started, now, Heard::Silence);
                Error::Unavailable {
                    reason: "no answer from Redis while opening or checking a pooled connection"
                        .into(),
                    source: None,
                }
            }
            // Opening a connection failed: the same words as for the shared connection (an
            // untrusted TLS certificate says so), always "unavailable".
            deadpool_redis::PoolError::Backend(e) => {
                breaker.record(started, std::time::Instant::now(), heard(&e));
                match Error::from_redis(e, Effect::ReadOnly, config.command_timeout) {
                    Error::Redis(e) => Error::Unavailable {
                        reason: "cannot open a pooled Redis connection".into(),
                        source: Some(e),
                    },
                    other => other,
                }
            }
            other => Error::Unavailable {
                reason: format!("no pooled Redis connection: {other}"),
                source: None,
            },
        };
        // Boxed: deadpool's checkout future is large (kilobytes), and it would otherwise sit in the
        // future of every `update` (clippy's `large_futures`). One allocation per checkout.
        let checkout = Box::pin(async {
            match &self.inner.pool {
                DedicatedPool::Single(pool) => pool
                    .get()
                    .await
                    .map(DedicatedConnection::Single)
                    .map_err(unavailable),
                #[cfg(feature = "sentinel")]
                DedicatedPool::Sentinel(pool) => pool
                    .get()
                    .await
                    .map(DedicatedConnection::Sentinel)
                    .map_err(unavailable),
                #[cfg(feature = "cluster")]
                DedicatedPool::None => Err(Error::Unsupported(
                    "WATCH is not available on a Redis Cluster; herd uses compare-and-swap scripts there"
                        .into(),
                )),
            }
        });
        // Dropping the checkout midway is clean: deadpool discards a connection it was checking.
        // A wait cut short is not fed to the breaker: it may be a queue for a free connection.
        // The breaker opening while it waits ends the wait at once. So does a checkout that is
        // still pending after a command timeout with no answer from Redis to anyone meanwhile:
        // deadpool checks idle connections one by one (each check up to a command timeout), and
        // against a frozen Redis that is silence like any other.
        let silence = async {
            loop {
                tokio::time::sleep(config.command_timeout).await;
                if !breaker.answered_since(started) {
                    breaker.record(started, std::time::Instant::now(), Heard::Silence);
                    if !breaker.admits() {
                        return;
                    }
                }
            }
        };
        let checkout = async {
            tokio::select! {
                conn = checkout => conn,
                () = opening => Err(circuit_open()),
                () = silence => Err(circuit_open()),
            }
        };
        let conn = tokio::time::timeout_at(limit.into(), checkout)
            .await
            .unwrap_or_else(|_elapsed| {
                let waited = started.elapsed();
                Err(Error::Unavailable {
                    reason: if by_deadline {
                        format!("no usable pooled Redis connection before the request's deadline ({waited:?})")
                    } else {
                        format!("no usable pooled Redis connection within {waited:?}")
                    },
                    source: None,
                })
            });
        crate::observe::pool_wait(started.elapsed());
        conn
    }

    /// One round trip on a dedicated connection (`WATCH`, `MULTI`/`EXEC`): refused at once while
    /// the breaker is open, bounded like every round trip (command timeout, request deadline),
    /// its outcome fed to the breaker. The caller counts the round trip.
    ///
    /// # Errors
    /// [`Error::Unavailable`], [`Error::OutcomeUnknown`] (a write timed out), or the error Redis
    /// answered, classified as [`Error::from_redis`] does.
    pub(crate) async fn on_dedicated<T>(
        &self,
        effect: Effect,
        round_trip: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        if !self.inner.breaker.admits() {
            return Err(circuit_open());
        }
        let bound = self.bound()?;
        let outcome = tokio::time::timeout_at(bound.limit, round_trip).await;
        self.settle(effect, &bound, outcome)
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

/// Pub/sub: connections of their own.
impl RedisClient {
    /// Clients for pub/sub connections (each subscription has its own connection): the server
    /// itself; on a cluster every node, tried in turn (a `PUBLISH` reaches subscribers on every node).
    ///
    /// # Errors
    /// [`Error::Config`] if a node's URL cannot be used.
    pub(crate) fn pubsub_clients(&self) -> Result<Vec<redis::Client>> {
        let config = &self.inner.config;
        let urls = match &config.topology {
            Topology::Single(url) => vec![url.clone()],
            Topology::Cluster(nodes) => nodes.clone(),
            // Through Sentinel the master is asked for at each (re)connection: see
            // `pubsub_master_client`.
            Topology::Sentinel { .. } => Vec::new(),
        };
        urls.iter()
            .map(|url| {
                single_client(config, url)
                    .map_err(|e| Error::Config(format!("REDIS_URL `{}`: {e}", redact_url(url))))
            })
            .collect()
    }

    /// Through Sentinel: a client for the current master (asked of the sentinels now), for a
    /// pub/sub connection. `None` for other topologies.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when no sentinel names a reachable master.
    pub(crate) async fn pubsub_master_client(&self) -> Result<Option<redis::Client>> {
        match &self.inner.shared {
            #[cfg(feature = "sentinel")]
            Shared::Sentinel(master) => {
                master
                    .client_now()
                    .await
                    .map(Some)
                    .map_err(|e| Error::Unavailable {
                        reason: "no master named by the sentinels".into(),
                        source: Some(e),
                    })
            }
            _ => Ok(None),
        }
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

/// How a round trip on the shared connection passes the breaker and the round-trip count.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// A round trip of its own: refused while the breaker is open, counted.
    Counted,
    /// Sent alongside a counted one: refused while open, not counted.
    Uncounted,
    /// The breaker's probe: always sent, never counted.
    Probe,
}

/// A round trip under way: when it began, when it must end, and whether the request's deadline
/// (rather than the command timeout) is what ends it.
struct Bound {
    started: std::time::Instant,
    limit: tokio::time::Instant,
    /// How long it may wait (reported by a write whose reply is lost).
    budget: Duration,
    by_deadline: bool,
}

/// The error of a call refused by an open breaker: nothing was sent.
fn circuit_open() -> Error {
    Error::Unavailable {
        reason: "Redis is not answering (circuit breaker open): failing fast until a probe gets an answer".into(),
        source: None,
    }
}

/// The error of a call made after its request's deadline: nothing was sent.
fn deadline_passed() -> Error {
    Error::Unavailable {
        reason: "the request's deadline for Redis calls has passed".into(),
        source: None,
    }
}

/// A round trip that got no reply within `waited`.
fn no_reply(effect: Effect, waited: Duration, by_deadline: bool) -> Error {
    match (effect, by_deadline) {
        (Effect::MayWrite, _) => Error::OutcomeUnknown { timeout: waited },
        (Effect::ReadOnly, true) => Error::Unavailable {
            reason: format!("no reply from Redis before the request's deadline ({waited:?})"),
            source: None,
        },
        (Effect::ReadOnly, false) => Error::Unavailable {
            reason: format!("no reply from Redis within {waited:?}"),
            source: None,
        },
    }
}

/// Whether an error means Redis answered (an error reply) or did not (no reply, no connection).
fn heard(e: &redis::RedisError) -> Heard {
    if e.is_timeout() || e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        Heard::Silence
    } else {
        Heard::Answer
    }
}
