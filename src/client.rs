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
//! Every wait is bounded: connecting, each round trip ([`Config::command_timeout`]), waiting for a
//! pooled connection, recycling one. A round trip that times out is an error the caller sees at once
//! ([`Error::Unavailable`] for reads, [`Error::OutcomeUnknown`] for writes), never a hang.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::{redact_url, Config};
use crate::error::{Error, Result};
use crate::keys::Keys;

/// A cheap-to-clone handle on Redis: one multiplexed connection plus a pool of dedicated connections,
/// with the [`Config`] they were made from.
///
/// ```no_run
/// # async fn run() -> herd::Result<()> {
/// let redis = herd::RedisClient::connect(herd::Config::from_env()?).await?;
/// let sessions = herd::SessionLayer::new(redis.clone());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisClient {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    keys: Keys,
    conn: ConnectionManager,
    pool: deadpool_redis::Pool,
    round_trips: AtomicU64,
}

impl std::fmt::Debug for RedisClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClient")
            .field("url", &redact_url(&self.inner.config.redis_url))
            .field("prefix", &self.inner.config.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisClient {
    /// Builds the client without touching the network: connections open on first use, so a worker
    /// starts (and answers 503 where Redis is needed) even while Redis is down. Must be called inside
    /// a tokio runtime.
    ///
    /// # Errors
    /// [`Error::Config`] if the URL cannot be used.
    pub fn new(config: Config) -> Result<RedisClient> {
        let url = redact_url(&config.redis_url);
        let client = redis::Client::open(config.redis_url.as_str())
            .map_err(|e| Error::Config(format!("REDIS_URL `{url}`: {e}")))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.command_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config)
            .map_err(|e| Error::Config(format!("REDIS_URL `{url}`: {e}")))?;

        let mut pool_config = deadpool_redis::Config::from_url(config.redis_url.clone());
        let mut pool = deadpool_redis::PoolConfig::new(config.pool_size);
        pool.timeouts.wait = Some(config.pool_wait_timeout);
        pool.timeouts.create = Some(config.connect_timeout);
        pool.timeouts.recycle = Some(config.command_timeout);
        pool_config.pool = Some(pool);
        let pool = pool_config
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .map_err(|e| Error::Config(format!("REDIS_URL `{url}`: {e}")))?;

        Ok(RedisClient {
            inner: Arc::new(Inner {
                keys: Keys::new(&config.prefix),
                config,
                conn,
                pool,
                round_trips: AtomicU64::new(0),
            }),
        })
    }

    /// [`new`](Self::new), then one `PING` to prove Redis answers.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad URL, [`Error::Unavailable`] if Redis does not answer in time.
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
            .run(false, |mut c| async move {
                redis::cmd("PING").query_async(&mut c).await
            })
            .await?;
        debug_assert_eq!(pong, "PONG");
        Ok(())
    }

    /// The configuration this client was built from.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// How many round trips to Redis this client (and every clone of it) has made. Tests use it to
    /// check the round-trip budget; it is also a cheap metric.
    pub fn round_trips(&self) -> u64 {
        self.inner.round_trips.load(Ordering::Relaxed)
    }

    pub(crate) fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// Runs one round trip on the shared multiplexed connection, bounded by the command timeout.
    /// `wrote` says whether the command can change data (it decides how a lost reply is reported).
    pub(crate) async fn run<T, F, Fut>(&self, wrote: bool, f: F) -> Result<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.count_round_trip();
        let timeout = self.inner.config.command_timeout;
        let started = std::time::Instant::now(); // observe: latency histogram, error counter
        let result = match tokio::time::timeout(timeout, f(self.inner.conn.clone())).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(Error::from_redis(e, wrote, timeout)),
            Err(_elapsed) if wrote => Err(Error::OutcomeUnknown { timeout }),
            Err(_elapsed) => Err(Error::Unavailable {
                reason: format!("no reply from Redis within {timeout:?}"),
                source: None,
            }),
        };
        crate::observe::redis_round_trip(started.elapsed(), result.is_ok());
        result
    }

    /// Checks out a dedicated connection (for `WATCH`), waiting at most the pool wait timeout.
    pub(crate) async fn dedicated(&self) -> Result<deadpool_redis::Connection> {
        let started = std::time::Instant::now(); // observe: pool wait histogram
        let conn = self.inner.pool.get().await;
        crate::observe::pool_wait(started.elapsed());
        conn.map_err(|e| {
            let reason = match &e {
                deadpool_redis::PoolError::Timeout(deadpool_redis::TimeoutType::Wait) => {
                    format!(
                        "no pooled Redis connection became free within {:?}",
                        self.inner.config.pool_wait_timeout
                    )
                }
                other => format!("no pooled Redis connection: {other}"),
            };
            let source = match e {
                deadpool_redis::PoolError::Backend(e) => Some(e),
                _ => None,
            };
            Error::Unavailable { reason, source }
        })
    }

    /// Counts one round trip made outside [`run`](Self::run) (on a dedicated connection).
    pub(crate) fn count_round_trip(&self) {
        self.inner.round_trips.fetch_add(1, Ordering::Relaxed);
        crate::observe::round_trip();
    }
}
