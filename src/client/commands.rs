//! Raw commands: an app's own commands, pipelines and scripts through herd's client, with herd's
//! timeouts, topology handling and "outcome unknown" semantics, so an app needs no second Redis
//! client.
//!
//! ```no_run
//! # async fn run(redis: herd::RedisClient) -> herd::Result<()> {
//! // A read: a lost reply is `Unavailable` (safe to retry).
//! let members: Vec<String> = redis.query_read_only(redis::cmd("SMEMBERS").arg("app:tags")).await?;
//! // A write: a lost reply is `OutcomeUnknown` (herd never re-sends it).
//! let added: i64 = redis.query(redis::cmd("SADD").arg("app:tags").arg("new")).await?;
//! // A transaction, one round trip.
//! let (n, _): (i64, ()) = redis
//!     .query_pipeline(redis::pipe().atomic().incr("app:n", 1).expire("app:n", 60))
//!     .await?;
//! // A script (sent as EVALSHA, loaded on first use).
//! let script = redis::Script::new("return redis.call('GET', KEYS[1])");
//! let v: Option<String> = redis.query_script(&script.key("app:n")).await?;
//! # let _ = (members, added, n, v);
//! # Ok(()) }
//! ```
//!
//! Each call is one round trip on the shared multiplexed connection, bounded by
//! [`Config::command_timeout`](crate::Config::command_timeout), and counted in
//! [`round_trips`](RedisClient::round_trips). On a Redis Cluster each command, pipeline or script
//! must stay within one hash slot (use a hash tag, `{...}`, in its keys); herd follows `MOVED` and
//! `ASK` and re-sends only what the cluster refused before running it. Through Sentinel the
//! master is looked up again after a failover. Connection state (`WATCH`, `SELECT`,
//! `SUBSCRIBE`, `CLIENT` settings) has no place on a shared connection: use
//! [`Group::update`](crate::globals::Group::update) and [`Channel`](crate::globals::Channel).
//! Keys are yours to name: keep them outside herd's prefix (see `src/keys.rs`'s table).

use redis::{Cmd, FromRedisValue, Pipeline, ScriptInvocation};

use super::{Effect, RedisClient};
use crate::error::Result;

impl RedisClient {
    /// Runs one command that may write. A reply lost to the timeout or a dropped connection is
    /// [`Error::OutcomeUnknown`](crate::Error::OutcomeUnknown): the command may have run.
    ///
    /// # Errors
    /// [`Error::Unavailable`](crate::Error::Unavailable) (nothing was sent or Redis refused
    /// before running it), [`Error::OutcomeUnknown`](crate::Error::OutcomeUnknown),
    /// [`Error::Redis`](crate::Error::Redis) (Redis answered with an error, or the reply does not
    /// convert to `T`).
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        self.run(Effect::MayWrite, |mut c| async move {
            cmd.query_async(&mut c).await
        })
        .await
    }

    /// Runs one command that only reads: a lost reply is
    /// [`Error::Unavailable`](crate::Error::Unavailable) (safe to retry).
    ///
    /// # Errors
    /// As [`query`](Self::query), never `OutcomeUnknown`.
    pub async fn query_read_only<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        self.run(Effect::ReadOnly, |mut c| async move {
            cmd.query_async(&mut c).await
        })
        .await
    }

    /// Runs a pipeline in one round trip (`redis::pipe().atomic()` for `MULTI`/`EXEC`), as a
    /// write: a lost reply is [`Error::OutcomeUnknown`](crate::Error::OutcomeUnknown). In an
    /// atomic pipeline, a command that fails while `EXEC` runs does not undo the others (Redis
    /// does not roll back): its error comes back as [`Error::Redis`](crate::Error::Redis).
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn query_pipeline<T: FromRedisValue>(&self, pipeline: &Pipeline) -> Result<T> {
        self.run(Effect::MayWrite, |mut c| async move {
            pipeline.query_async(&mut c).await
        })
        .await
    }

    /// Runs a Lua script (`EVALSHA`, with `SCRIPT LOAD` on first use on each server), as a write.
    /// Its keys must share a hash slot on a cluster.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn query_script<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T> {
        self.run(Effect::MayWrite, |mut c| async move {
            invocation.invoke_async(&mut c).await
        })
        .await
    }
}
