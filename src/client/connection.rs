//! The connections a round trip runs on: the shared multiplexed one of each topology
//! ([`Connection`]) and one checked out of the pool for `WATCH` ([`DedicatedConnection`]).

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, Pipeline, RedisFuture, Value};

#[cfg(feature = "cluster")]
use super::cluster;
#[cfg(feature = "sentinel")]
use super::sentinel;

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
    pub(super) fn sentinel_generation(&self) -> Option<u64> {
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
