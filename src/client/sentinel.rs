//! Sentinel: a multiplexed connection to the master the sentinels name, looked up again after an
//! error.
//!
//! The connection is made on first use by asking the sentinels for the master's address. Any
//! sign that the master may have moved forgets it, so the next request asks the sentinels again
//! and connects to the promoted replica:
//!
//! * an error on the connection: dropped or refused, an I/O error, or `READONLY` (the old master
//!   came back as a replica);
//! * **no reply within the command timeout** (a frozen or partitioned master answers nothing, and
//!   the timeout drops the request before any error could be seen here: the client's
//!   `forget_after_timeout` does it then).
//!
//! The request that saw it fails (`503`, or "outcome unknown" for a write); herd never re-sends
//! it. Forgetting costs one look-up (the sentinels, then `ROLE` on the master they name) and one
//! new connection; requests already in flight on the old connection finish on it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{AsyncConnectionConfig, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Value};

use crate::config::Config;

/// The master of one sentinel-monitored service, and the current connection to it.
pub(crate) struct Master {
    sentinels: tokio::sync::Mutex<SentinelClient>,
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    generation: AtomicU64,
    conn_config: AsyncConnectionConfig,
}

impl Master {
    pub(super) fn new(
        config: &Config,
        sentinels: &[String],
        master: &str,
        node: deadpool_redis::sentinel::SentinelNodeConnectionInfo,
    ) -> redis::RedisResult<Master> {
        // `build` takes a String without redis' TLS feature, `impl AsRef<str>` with it.
        #[allow(clippy::unnecessary_to_owned)]
        let client = SentinelClient::build(
            sentinels.to_vec(),
            master.to_owned(),
            Some(node.into()),
            SentinelServerType::Master,
        )?;
        Ok(Master {
            sentinels: tokio::sync::Mutex::new(client),
            current: Mutex::new(None),
            generation: AtomicU64::new(0),
            // herd's own timeout around each round trip (`RedisClient::run`) is the one that
            // counts, and it forgets this connection when it fires. The connection's own timeout
            // is only a backstop: equal to the command timeout it would race the outer one (and
            // usually win, tokio polling the inner future first), which hid a missing `forget`.
            conn_config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(config.connect_timeout))
                .set_response_timeout(Some(config.command_timeout.saturating_mul(2))),
        })
    }

    fn cached(self: &Arc<Self>) -> Option<MasterConnection> {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        current.as_ref().map(|(generation, conn)| MasterConnection {
            conn: conn.clone(),
            generation: *generation,
            master: Arc::clone(self),
        })
    }

    /// The current connection, or a new one to the master the sentinels name now.
    pub(super) async fn connection(self: &Arc<Self>) -> redis::RedisResult<MasterConnection> {
        if let Some(conn) = self.cached() {
            return Ok(conn);
        }
        let mut sentinels = self.sentinels.lock().await;
        if let Some(conn) = self.cached() {
            return Ok(conn); // another request reconnected meanwhile
        }
        let conn = sentinels
            .get_async_connection_with_config(&self.conn_config)
            .await?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some((generation, conn.clone()));
        tracing::debug!(
            generation,
            "herd: connected to the master named by Sentinel"
        );
        Ok(MasterConnection {
            conn,
            generation,
            master: Arc::clone(self),
        })
    }

    /// A client for the master the sentinels name now (for pub/sub connections, which are not
    /// multiplexed).
    pub(super) async fn client_now(&self) -> redis::RedisResult<redis::Client> {
        self.sentinels.lock().await.async_get_client().await
    }

    /// Drops the connection of `generation` (if still current) so the next request asks again.
    pub(super) fn forget(&self, generation: u64, why: &str) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(&*current, Some((g, _)) if *g == generation) {
            *current = None;
            tracing::info!(
                generation,
                why,
                "herd: Redis master connection dropped; asking the sentinels again"
            );
        }
    }
}

/// A clone of the current master connection.
#[derive(Clone)]
pub(crate) struct MasterConnection {
    conn: MultiplexedConnection,
    generation: u64,
    master: Arc<Master>,
}

fn master_may_have_moved(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_unrecoverable_error()
        || matches!(
            err.kind(),
            ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        )
        || err.to_string().contains("READONLY")
}

impl MasterConnection {
    /// Which connection to the master this is a clone of (each new connection gets the next
    /// number).
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    fn check<T>(&self, reply: redis::RedisResult<T>) -> redis::RedisResult<T> {
        if let Err(e) = &reply {
            if master_may_have_moved(e) {
                self.master
                    .forget(self.generation, "the master may have moved");
            }
        }
        reply
    }
}

impl ConnectionLike for MasterConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let reply = self.conn.req_packed_command(cmd).await;
            self.check(reply)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let reply = self.conn.req_packed_commands(pipeline, offset, count).await;
            self.check(reply)
        })
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}
