//! Shared globals: process-global variables that live in Redis, so every worker process sees them.
//!
//! ```no_run
//! use herd::{Config, Globals, RedisClient};
//!
//! # async fn run() -> herd::Result<()> {
//! let redis = RedisClient::connect(Config::from_env()?).await?;
//! let globals = Globals::new(redis);
//!
//! let stats = globals.group("stats")?;               // a group: variables that change together
//! let hits = stats.incr("hits", 1).await?;           // atomic counter, one round trip
//! stats.set("motd", &"hello, herd").await?;          // any serde value, stored as JSON
//! let motd: Option<String> = stats.get("motd").await?;
//!
//! // Several writes that every other worker sees all together or not at all (MULTI/EXEC):
//! stats
//!     .atomic()
//!     .set("last-reset", &1_700_000_000_u64)
//!     .set("hits", &0)
//!     .delete("motd")
//!     .apply()
//!     .await?;
//! # let _ = (hits, motd);
//! # Ok(()) }
//! ```
//!
//! # Groups and the hash-tag scheme
//! Every variable belongs to a **group**, and the group is the only way to reach a variable: there
//! is no `globals.get("x")`. The group name is the Redis Cluster *hash tag* of its keys:
//!
//! ```text
//! variable `acct-1` of group `bank`  →  key  {prefix}:g:{bank}:acct-1
//! ```
//!
//! (`{prefix}` is [`Config::prefix`](crate::Config::prefix), `herd` by default, unless
//! [`Globals::with_prefix`] gives globals a prefix of their own; sessions live under `{prefix}:s:`,
//! so the two never collide even with one prefix.) Redis Cluster hashes only the part between the first
//! `{` and `}`, so every variable of a group lives in the same slot. Every multi-key operation of
//! this module ([`get_many`](Group::get_many), [`atomic`](Group::atomic),
//! [`update`](Group::update)) is a method of one [`Group`] and takes variable names, never keys, so
//! a cross-slot `MULTI`/`EXEC` cannot be built by accident. The flip side: a group lives on one
//! Redis node, so put variables that are *not* written together in different groups to spread load.
//! Group and variable names are 1–128 characters of letters, digits and `_.:-` (no braces).
//!
//! # Values
//! Values are serialized with `serde_json`. Integers are stored as their decimal text, which is
//! both valid JSON and what Redis' `INCRBY` works on, so [`incr`](Group::incr) and
//! [`get::<i64>`](Group::get) see the same variable. A value's JSON may be at most
//! [`with_max_value_size`](Globals::with_max_value_size) bytes (default 1 MiB): big values on the
//! shared connection delay every other request of the process.
//!
//! # Operations, their atomicity and round trips
//! | operation | Redis | round trips | atomic because |
//! |---|---|---|---|
//! | [`get`](Group::get) | `GET` | 1 | one command |
//! | [`set`](Group::set), [`set_with_ttl`](Group::set_with_ttl) | `SET [PX]` | 1 | one command |
//! | [`incr`](Group::incr), [`decr`](Group::decr) | `INCRBY` / `DECRBY` | 1 | one command |
//! | [`delete`](Group::delete) | `DEL` | 1 | one command |
//! | [`get_many`](Group::get_many) | `MGET` | 1 | one command over one slot: a consistent snapshot |
//! | [`atomic`](Group::atomic)`…apply` | `MULTI … EXEC` | 1 | a transaction, sent as one pipeline |
//! | [`update`](Group::update) | `WATCH`+`MGET`, then `MULTI … EXEC` | 2 per attempt, on a pooled connection (+1 `UNWATCH`+`PING` the pool sends when it hands out an idle connection) | optimistic: `EXEC` fails if a watched variable changed |
//! | [`set_if_absent`](Group::set_if_absent) | `SET NX [PX]` | 1 | one command |
//! | [`hash`](Group::hash)`…get/set/incr/delete/get_all` | `HGET` / `HSET` / `HINCRBY` / `HDEL` / `HGETALL` on one variable | 1 | one command |
//! | [`set_fenced`](Group::set_fenced), [`incr_fenced`](Group::incr_fenced) | one script | 1 | a script: token check and write in one step |
//! | [`Channel::publish`] | `PUBLISH` | 1 | — |
//!
//! `get_many` uses `MGET` rather than a `MULTI`/`EXEC` of `GET`s: one command is executed atomically
//! by Redis, it is a single reply to decode, and it is legal on a cluster because every key shares the
//! group's slot.
//!
//! Everything except [`update`](Group::update) and subscriptions runs on the client's shared
//! multiplexed connection. An atomic group, `get_many` and `update` may name at most
//! [`MAX_GROUP_LEN`] variables.
//!
//! # Atomic groups
//! [`Group::atomic`] builds a list of writes and [`AtomicWrites::apply`] sends it as
//! `MULTI`, the writes, `EXEC`, in one round trip. Other workers see all of it or none of it. Every
//! element of the `EXEC` reply is checked: Redis does **not** roll back a transaction when one of its
//! commands fails while running (for example `INCRBY` on a variable that holds JSON text), so such a
//! failure is reported as [`Error::GroupCommandFailed`] with the
//! position of the failing write — the other writes *were* applied. When Redis refuses the whole
//! transaction before running it (`EXECABORT`: a write on a read-only replica, an ACL rule, out of
//! memory), nothing was applied and the error is [`Error::Unavailable`] (for
//! the availability cases) or [`Error::GroupAborted`] with the position of
//! the refused command.
//!
//! # Read-modify-write
//! [`Group::update`] reads some variables, lets a closure compute their new values (or refuse, with
//! your own error type), and commits only if none of them changed meanwhile (`WATCH` … `MULTI`/`EXEC`
//! on a dedicated pooled connection). On a conflict it retries after a jittered exponential backoff,
//! at most [`with_max_attempts`](Globals::with_max_attempts) times (default 10), then returns
//! [`Error::Conflict`]. See [`Group::update`] for the details, including why a
//! cancelled update never leaves a dirty connection in the pool.
//!
//! # Lost replies
//! A write whose reply did not arrive within the command timeout may or may not have been applied. It
//! is reported as [`Error::OutcomeUnknown`] and never retried by herd:
//! retrying `incr` or a transfer blindly could apply it twice.
//!
//! # Leases and fenced writes
//! [`Globals::lease`] gives a [`Lease`]: a lock held by one worker of the whole herd at a time,
//! with a [`FencingToken`] per acquisition; [`Lease::every`] runs a job once per interval across
//! every worker. Writes made on behalf of a lease can carry its token
//! ([`Group::set_fenced`], [`Group::incr_fenced`]): Redis refuses them once a newer token has
//! written the variable, so a holder that paused past its TTL cannot overwrite its successor. See
//! the [`lease`] module and `docs/coordination.md`.
//!
//! # Broadcast
//! [`Globals::channel`] gives a typed pub/sub [`Channel`]: [`publish`](Channel::publish) from any
//! worker, [`subscribe`](Channel::subscribe) in every worker (for example to drop a local cache). A
//! subscription has its own connection and reconnects by itself after Redis restarts; it tells you
//! with [`Received::Reconnected`] that messages may have been missed meanwhile (Redis pub/sub delivers
//! at most once, to whoever is connected).

mod atomic;
mod channel;
mod compare_and_swap;
mod hash;
pub mod lease;
mod update;

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::client::{Effect, RedisClient};
use crate::error::{Error, Result};
use crate::keys::{validate_name, validate_prefix, Keys};

pub use self::atomic::{AtomicWrites, Outcome};
pub use self::channel::{Channel, Received, Subscription};
pub use self::hash::Hash;
pub use self::lease::{FencingToken, KeptLease, Lease, LeaseGuard};
pub use self::update::UpdateError;

/// Most variables one atomic group, [`Group::get_many`] or [`Group::update`] may name. A
/// transaction blocks the Redis server while it runs; keep groups small.
pub const MAX_GROUP_LEN: usize = 1024;

const DEFAULT_MAX_ATTEMPTS: u32 = 10;
const DEFAULT_MAX_VALUE_SIZE: usize = 1024 * 1024;

/// The handle on shared globals: cheap to clone, `Send + Sync`, usable as axum `State` or from any
/// task. See the [module docs](self).
///
/// ```no_run
/// # async fn run(redis: herd::RedisClient) -> herd::Result<()> {
/// let globals = herd::Globals::new(redis).with_max_attempts(20);
/// let bank = globals.group("bank")?;
/// bank.set("acct-1", &100_i64).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Globals {
    client: RedisClient,
    settings: Arc<Settings>,
}

#[derive(Clone, Debug)]
struct Settings {
    /// Builds every key and channel name, under the globals' prefix.
    keys: Keys,
    max_attempts: u32,
    backoff_base: Duration,
    backoff_max: Duration,
    max_value_size: usize,
}

impl Globals {
    /// Globals over `client` (the same client the session layer uses). Keys live under
    /// `{prefix}:g:`, where `{prefix}` is the client's [`Config::prefix`](crate::Config::prefix);
    /// see [`with_prefix`](Self::with_prefix) for another one.
    pub fn new(client: RedisClient) -> Globals {
        Globals {
            settings: Arc::new(Settings {
                keys: client.keys().clone(),
                max_attempts: DEFAULT_MAX_ATTEMPTS,
                backoff_base: Duration::from_millis(1),
                backoff_max: Duration::from_millis(50),
                max_value_size: DEFAULT_MAX_VALUE_SIZE,
            }),
            client,
        }
    }

    /// Keeps these globals (variables and channels) under `prefix` instead of the client's
    /// [`Config::prefix`](crate::Config::prefix): variable `name` of group `group` is then the key
    /// `<prefix>:g:{<group>}:<name>` and channel `name` is `<prefix>:chan:<name>`. The group stays
    /// the hash tag, so everything said about groups and Redis Cluster holds unchanged.
    ///
    /// Use it to share globals between apps whose sessions are kept apart (each app its own
    /// session prefix, one common globals prefix), or to put globals where your Redis ACLs or
    /// eviction policies expect them. Every process that shares a variable must use the same prefix.
    ///
    /// ```no_run
    /// # async fn run(redis: herd::RedisClient) -> herd::Result<()> {
    /// // Sessions under the config's prefix (say `shop`), globals under `shared`:
    /// let globals = herd::Globals::new(redis).with_prefix("shared")?;
    /// globals.group("stats")?.incr("visits", 1).await?; // key `shared:g:{stats}:visits`
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Config`] unless the prefix is 1–64 characters of letters, digits and `_.:-` (the
    /// rule of [`ConfigBuilder::prefix`](crate::config::ConfigBuilder::prefix)).
    pub fn with_prefix(mut self, prefix: &str) -> Result<Self> {
        validate_prefix(prefix)?;
        Arc::make_mut(&mut self.settings).keys = Keys::new(prefix);
        Ok(self)
    }

    /// The prefix of every key and channel of these globals.
    pub fn prefix(&self) -> &str {
        self.settings.keys.prefix()
    }

    /// How many times [`Group::update`] tries before giving up with
    /// [`Error::Conflict`]. Default 10; at least 1.
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        Arc::make_mut(&mut self.settings).max_attempts = attempts.max(1);
        self
    }

    /// The backoff between two attempts of [`Group::update`]: a random wait between zero and
    /// `base × 2^(attempt − 1)`, capped at `max` ("full jitter"). Default 1 ms and 50 ms.
    pub fn with_backoff(mut self, base: Duration, max: Duration) -> Self {
        let s = Arc::make_mut(&mut self.settings);
        s.backoff_base = base;
        s.backoff_max = max.max(base);
        self
    }

    /// The largest value (its JSON, in bytes) a write accepts; larger ones fail with
    /// [`Error::TooLarge`] before anything is sent. Default 1 MiB.
    pub fn with_max_value_size(mut self, bytes: usize) -> Self {
        Arc::make_mut(&mut self.settings).max_value_size = bytes;
        self
    }

    /// The group named `name`: the hash tag its variables share (see the [module docs](self)).
    ///
    /// # Errors
    /// [`Error::InvalidName`] unless the name is 1–128 characters of
    /// letters, digits and `_.:-`.
    pub fn group(&self, name: &str) -> Result<Group> {
        validate_name(name)?;
        Ok(Group {
            globals: self.clone(),
            name: Arc::from(name),
        })
    }

    /// A typed broadcast channel named `name` (see [`Channel`]).
    ///
    /// # Errors
    /// [`Error::InvalidName`] unless the name is 1–128 characters of
    /// letters, digits and `_.:-`.
    pub fn channel<T>(&self, name: &str) -> Result<Channel<T>> {
        validate_name(name)?;
        Ok(Channel::new(self.clone(), name))
    }

    /// The Redis client underneath (for its [`round_trips`](RedisClient::round_trips) counter, say).
    pub fn client(&self) -> &RedisClient {
        &self.client
    }
}

/// A named group of variables that share one hash tag, so any of them can be read or written
/// together atomically (also on Redis Cluster). Cheap to clone. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Group {
    globals: Globals,
    name: Arc<str>,
}

impl Group {
    /// The group's name (its hash tag).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Redis key of variable `name`, after checking the name.
    fn key(&self, name: &str) -> Result<String> {
        validate_name(name)?;
        Ok(self.globals.settings.keys.global(&self.name, name))
    }

    fn keys(&self, names: &[&str]) -> Result<Vec<String>> {
        check_len(names.len())?;
        names.iter().map(|n| self.key(n)).collect()
    }

    fn client(&self) -> &RedisClient {
        &self.globals.client
    }

    fn settings(&self) -> &Settings {
        &self.globals.settings
    }

    /// Serializes a value for variable `name`, enforcing the size limit.
    fn encode<T: Serialize + ?Sized>(&self, name: &str, value: &T) -> Result<String> {
        let json = serde_json::to_string(value).map_err(|source| Error::Encode {
            key: name.to_owned(),
            source,
        })?;
        let limit = self.settings().max_value_size;
        if json.len() > limit {
            return Err(Error::TooLarge {
                key: name.to_owned(),
                size: json.len(),
                limit,
            });
        }
        Ok(json)
    }

    /// Reads variable `name`; `None` when it is not set (or expired). One round trip.
    ///
    /// ```no_run
    /// # async fn run(group: herd::globals::Group) -> herd::Result<()> {
    /// let hits: i64 = group.get("hits").await?.unwrap_or(0);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::Unavailable`], [`Error::Decode`] when the stored value is not
    /// a `T`, [`Error::Redis`] when the key holds something other than a string.
    pub async fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        let key = self.key(name)?;
        let raw: Option<String> = self
            .client()
            .run(Effect::ReadOnly, |mut c| async move {
                redis::cmd("GET").arg(&key).query_async(&mut c).await
            })
            .await?;
        raw.map(|raw| decode(name, &raw)).transpose()
    }

    /// Sets variable `name` to `value` (serialized as JSON), without expiry. One round trip.
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::Encode`], [`Error::TooLarge`], [`Error::Unavailable`],
    /// [`Error::OutcomeUnknown`].
    pub async fn set<T: Serialize + ?Sized>(&self, name: &str, value: &T) -> Result<()> {
        self.set_inner(name, value, None).await
    }

    /// Sets variable `name` to `value`; it disappears after `ttl` (rounded up to whole
    /// milliseconds). One round trip.
    ///
    /// ```no_run
    /// # async fn run(group: herd::globals::Group) -> herd::Result<()> {
    /// use std::time::Duration;
    /// group.set_with_ttl("maintenance", &true, Duration::from_secs(600)).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`set`](Self::set).
    pub async fn set_with_ttl<T: Serialize + ?Sized>(
        &self,
        name: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<()> {
        self.set_inner(name, value, Some(ttl)).await
    }

    async fn set_inner<T: Serialize + ?Sized>(
        &self,
        name: &str,
        value: &T,
        ttl: Option<Duration>,
    ) -> Result<()> {
        let key = self.key(name)?;
        let json = self.encode(name, value)?;
        let mut cmd = redis::cmd("SET");
        cmd.arg(&key).arg(json);
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(ttl_millis(ttl));
        }
        self.client()
            .run(Effect::MayWrite, |mut c| async move {
                cmd.query_async::<()>(&mut c).await
            })
            .await
    }

    /// Sets variable `name` to `value` only if it is not set (`SET NX`): `true` when this call
    /// wrote it, `false` when it already existed (untouched). One round trip.
    ///
    /// ```no_run
    /// # async fn run(group: herd::globals::Group) -> herd::Result<()> {
    /// if group.set_if_absent("installed-at", &1_700_000_000_u64).await? {
    ///     // first worker ever to get here
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`set`](Self::set); [`Error::OutcomeUnknown`] means it may or may not have been set.
    pub async fn set_if_absent<T: Serialize + ?Sized>(
        &self,
        name: &str,
        value: &T,
    ) -> Result<bool> {
        self.set_if_absent_inner(name, value, None).await
    }

    /// [`set_if_absent`](Self::set_if_absent) with a time to live for the value it sets.
    ///
    /// # Errors
    /// As [`set_if_absent`](Self::set_if_absent).
    pub async fn set_if_absent_with_ttl<T: Serialize + ?Sized>(
        &self,
        name: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<bool> {
        self.set_if_absent_inner(name, value, Some(ttl)).await
    }

    async fn set_if_absent_inner<T: Serialize + ?Sized>(
        &self,
        name: &str,
        value: &T,
        ttl: Option<Duration>,
    ) -> Result<bool> {
        let key = self.key(name)?;
        let json = self.encode(name, value)?;
        let mut cmd = redis::cmd("SET");
        cmd.arg(&key).arg(json).arg("NX");
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(ttl_millis(ttl));
        }
        let reply: Option<String> = self
            .client()
            .run(Effect::MayWrite, |mut c| async move {
                cmd.query_async(&mut c).await
            })
            .await?;
        Ok(reply.is_some())
    }

    /// Sets variable `name` to `value` on behalf of a lease holder: written only if no write with
    /// a higher [`FencingToken`] reached this variable before (`true`), refused otherwise
    /// (`false`, nothing written). The highest token seen is kept beside the variable (key
    /// `{prefix}:f:{group}:name`, same slot). One round trip (one script). See [`lease`].
    ///
    /// # Errors
    /// As [`set`](Self::set).
    pub async fn set_fenced<T: Serialize + ?Sized>(
        &self,
        name: &str,
        value: &T,
        token: FencingToken,
    ) -> Result<bool> {
        let json = self.encode(name, value)?;
        Ok(self.fenced(name, "set", json, token).await?.is_some())
    }

    /// Adds `by` to the integer variable `name` on behalf of a lease holder: `Some(new value)`
    /// when accepted, `None` when a write with a higher [`FencingToken`] reached this variable
    /// before (nothing written). One round trip (one script). See [`set_fenced`](Self::set_fenced).
    ///
    /// # Errors
    /// As [`incr`](Self::incr).
    pub async fn incr_fenced(
        &self,
        name: &str,
        by: i64,
        token: FencingToken,
    ) -> Result<Option<i64>> {
        self.fenced(name, "incrby", by.to_string(), token)
            .await
            .map_err(|e| not_an_integer(e, name))
    }

    async fn fenced(
        &self,
        name: &str,
        op: &'static str,
        value: String,
        token: FencingToken,
    ) -> Result<Option<i64>> {
        static FENCED: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(include_str!("lease/fenced.lua")));
        let key = self.key(name)?;
        let mark = self.globals.settings.keys.fence_mark(&self.name, name);
        let mut invocation = FENCED.prepare_invoke();
        invocation
            .key(key)
            .key(mark)
            .arg(token.get())
            .arg(op)
            .arg(value);
        // Boxed: a script's future nests deeply (see `rate_limit`'s check).
        let (written, result): (i64, i64) =
            Box::pin(self.client().run(Effect::MayWrite, |mut c| async move {
                invocation.invoke_async(&mut c).await
            }))
            .await?;
        Ok((written == 1).then_some(result))
    }

    /// Adds `by` to the integer variable `name` in Redis (`INCRBY`; a missing variable counts as 0)
    /// and returns the new value. Atomic across all workers; one round trip.
    ///
    /// ```no_run
    /// # async fn run(group: herd::globals::Group) -> herd::Result<()> {
    /// let visitors = group.incr("visitors", 1).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::NotAnInteger`] when the variable holds something else (or would overflow `i64`),
    /// [`Error::InvalidName`], [`Error::Unavailable`], [`Error::OutcomeUnknown`] (never retried).
    pub async fn incr(&self, name: &str, by: i64) -> Result<i64> {
        self.counter(name, "INCRBY", by).await
    }

    /// Subtracts `by` from the integer variable `name` (`DECRBY`) and returns the new value.
    ///
    /// # Errors
    /// As [`incr`](Self::incr).
    pub async fn decr(&self, name: &str, by: i64) -> Result<i64> {
        self.counter(name, "DECRBY", by).await
    }

    async fn counter(&self, name: &str, command: &'static str, by: i64) -> Result<i64> {
        let key = self.key(name)?;
        self.client()
            .run(Effect::MayWrite, |mut c| async move {
                redis::cmd(command)
                    .arg(&key)
                    .arg(by)
                    .query_async(&mut c)
                    .await
            })
            .await
            .map_err(|e| not_an_integer(e, name))
    }

    /// Deletes variable `name`; returns whether it existed. One round trip.
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::Unavailable`], [`Error::OutcomeUnknown`].
    pub async fn delete(&self, name: &str) -> Result<bool> {
        let key = self.key(name)?;
        let n: i64 = self
            .client()
            .run(Effect::MayWrite, |mut c| async move {
                redis::cmd("DEL").arg(&key).query_async(&mut c).await
            })
            .await?;
        Ok(n > 0)
    }

    /// Reads several variables at one instant (one `MGET`: Redis runs it atomically, so no write of
    /// another worker lands "between" two of the values). One round trip. The result has one entry per
    /// name, in order; `None` for a variable that is not set. For values of different types, read
    /// `serde_json::Value`.
    ///
    /// ```no_run
    /// # async fn run(bank: herd::globals::Group) -> herd::Result<()> {
    /// let balances = bank.get_many::<i64>(&["acct-1", "acct-2"]).await?;
    /// let total: i64 = balances.iter().flatten().sum();
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::GroupTooLarge`] over [`MAX_GROUP_LEN`] names,
    /// [`Error::Unavailable`], [`Error::Decode`].
    pub async fn get_many<T: DeserializeOwned>(&self, names: &[&str]) -> Result<Vec<Option<T>>> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.keys(names)?;
        let raw: Vec<Option<String>> = self
            .client()
            .run(Effect::ReadOnly, |mut c| async move {
                redis::cmd("MGET").arg(&keys).query_async(&mut c).await
            })
            .await?;
        if raw.len() != names.len() {
            return Err(unexpected_reply(
                "MGET returned a different number of values",
            ));
        }
        names
            .iter()
            .zip(raw)
            .map(|(name, raw)| raw.map(|raw| decode(name, &raw)).transpose())
            .collect()
    }

    /// Starts an atomic group of writes on this group's variables; see [`AtomicWrites`].
    ///
    /// ```no_run
    /// # async fn run(stats: herd::globals::Group) -> herd::Result<()> {
    /// stats.atomic().set("a", &1).set("b", &1).incr("version", 1).apply().await?;
    /// # Ok(()) }
    /// ```
    pub fn atomic(&self) -> AtomicWrites {
        AtomicWrites::new(self.clone())
    }
}

fn check_len(len: usize) -> Result<()> {
    if len > MAX_GROUP_LEN {
        return Err(Error::GroupTooLarge {
            len,
            limit: MAX_GROUP_LEN,
        });
    }
    Ok(())
}

fn decode<T: DeserializeOwned>(name: &str, raw: &str) -> Result<T> {
    serde_json::from_str(raw).map_err(|source| Error::Decode {
        key: name.to_owned(),
        source,
    })
}

fn ttl_millis(ttl: Duration) -> u64 {
    let ms = ttl.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}

/// Turns Redis' "value is not an integer or out of range" into [`Error::NotAnInteger`].
fn not_an_integer(err: Error, name: &str) -> Error {
    match err {
        Error::Redis(e) if is_not_integer(&e) => Error::NotAnInteger {
            key: name.to_owned(),
        },
        other => other,
    }
}

fn is_not_integer(e: &redis::RedisError) -> bool {
    e.to_string().contains("not an integer")
}

fn unexpected_reply(what: &'static str) -> Error {
    Error::Redis(redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        what,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rounds_up_to_a_millisecond() {
        assert_eq!(ttl_millis(Duration::from_nanos(1)), 1);
        assert_eq!(ttl_millis(Duration::ZERO), 1);
        assert_eq!(ttl_millis(Duration::from_micros(1500)), 2);
        assert_eq!(ttl_millis(Duration::from_secs(3)), 3000);
    }
}
