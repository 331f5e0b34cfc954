//! Dedicated (pooled) connections for `WATCH`: a bounded checkout that gives up as soon as the
//! breaker opens, and bounded round trips on the connection checked out.

use std::future::Future;

use super::breaker::Heard;
use super::connection::DedicatedConnection;
use super::round_trip::{circuit_open, deadline_passed, heard};
use super::{DedicatedPool, Effect, RedisClient};
use crate::error::{Error, Result};

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
