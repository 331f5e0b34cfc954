//! Read-modify-write with optimistic concurrency: `WATCH`, read, decide, `MULTI`/`EXEC`, retry.

use std::convert::Infallible;
use std::fmt;
use std::time::Duration;

use rand::Rng as _;
use redis::{FromRedisValue, Value};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::atomic::{exec_aborted, exec_items, is_exec_abort};
use super::{decode, Group, Settings};
use crate::client::{Effect, RedisClient};
use crate::error::{Error, Result};

/// The error of [`Group::update`]: either your closure refused (`Aborted`, with your error), or the
/// update failed in herd or Redis (`Failed`). In both cases nothing was written, except for
/// [`Error::OutcomeUnknown`], where the final commit may or may not have been applied.
///
/// With `E = Infallible` it converts into [`Error`] with `?`.
#[derive(Debug)]
pub enum UpdateError<E> {
    /// The closure returned `Err(e)`: nothing was written.
    Aborted(E),
    /// Redis or herd failed; see [`Error`]. [`Error::Conflict`] means every attempt lost a race.
    Failed(Error),
}

impl<E> UpdateError<E> {
    /// The closure's error, if it aborted.
    pub fn aborted(self) -> Option<E> {
        match self {
            UpdateError::Aborted(e) => Some(e),
            UpdateError::Failed(_) => None,
        }
    }

    /// The herd error, if the update failed in herd or Redis.
    pub fn failed(&self) -> Option<&Error> {
        match self {
            UpdateError::Aborted(_) => None,
            UpdateError::Failed(e) => Some(e),
        }
    }

    /// Every attempt lost a race ([`Error::Conflict`]).
    pub fn is_conflict(&self) -> bool {
        self.failed().is_some_and(Error::is_conflict)
    }
}

impl<E> From<Error> for UpdateError<E> {
    fn from(e: Error) -> Self {
        UpdateError::Failed(e)
    }
}

impl From<UpdateError<Infallible>> for Error {
    fn from(e: UpdateError<Infallible>) -> Self {
        match e {
            UpdateError::Aborted(never) => match never {},
            UpdateError::Failed(e) => e,
        }
    }
}

impl<E: fmt::Display> fmt::Display for UpdateError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpdateError::Aborted(e) => write!(f, "update aborted: {e}"),
            UpdateError::Failed(e) => write!(f, "update failed: {e}"),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for UpdateError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UpdateError::Aborted(e) => Some(e),
            UpdateError::Failed(e) => Some(e),
        }
    }
}

impl<E: axum::response::IntoResponse> axum::response::IntoResponse for UpdateError<E> {
    fn into_response(self) -> axum::response::Response {
        match self {
            UpdateError::Aborted(e) => e.into_response(),
            UpdateError::Failed(e) => e.into_response(),
        }
    }
}

impl Group {
    /// Read-modify-write of several variables of this group, atomic against every other writer.
    ///
    /// `f` gets the current values of `names` (in order; `None` for a variable that is not set) and
    /// changes them in place: assign a new value, or `None` to delete the variable. It returns
    /// `Ok(r)` to commit (and `update` returns `r`), or `Err(e)` to refuse: then nothing is written
    /// and `update` returns [`UpdateError::Aborted`]`(e)`. Only the variables whose value changed are
    /// written; a variable's expiry is kept (`SET … KEEPTTL`).
    ///
    /// ```no_run
    /// # async fn run(bank: herd::globals::Group) -> Result<(), Box<dyn std::error::Error>> {
    /// #[derive(Debug)]
    /// struct InsufficientFunds;
    ///
    /// let amount = 30;
    /// let result = bank
    ///     .update(&["acct-1", "acct-7"], |balances: &mut [Option<i64>]| {
    ///         let from = balances[0].unwrap_or(0);
    ///         if from < amount {
    ///             return Err(InsufficientFunds);
    ///         }
    ///         balances[0] = Some(from - amount);
    ///         balances[1] = Some(balances[1].unwrap_or(0) + amount);
    ///         Ok(from - amount) // returned by `update`
    ///     })
    ///     .await;
    /// match result {
    ///     Ok(left) => println!("done, {left} left"),
    ///     Err(herd::globals::UpdateError::Aborted(InsufficientFunds)) => println!("refused"),
    ///     Err(herd::globals::UpdateError::Failed(e)) => return Err(e.into()),
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # How
    /// On a connection checked out of the client's pool (never the shared one: `WATCH` is
    /// connection state), each attempt is two round trips:
    /// 1. `WATCH` the keys and `MGET` them, pipelined;
    /// 2. run `f`; if it changed something, `MULTI`, the `SET`s and `DEL`s, `EXEC`, pipelined.
    ///
    /// If another worker wrote one of the variables in between, Redis discards the transaction
    /// (`EXEC` answers nil) and `update` tries again — **so `f` may run several times** and must not
    /// have side effects of its own — after a random backoff that doubles per attempt (see
    /// [`Globals::with_backoff`](super::Globals::with_backoff)), at most
    /// [`with_max_attempts`](super::Globals::with_max_attempts) times (default 10); then it returns
    /// [`Error::Conflict`]. If `f` refuses or changes nothing, nothing more is sent and the
    /// connection goes back to the pool still watching: the pool's recycle step sends `UNWATCH`
    /// (and a `PING`) before anyone else gets it.
    ///
    /// Cancellation safety: if the future is dropped while a request on the connection is in flight
    /// (its reply not read yet), or a request failed or timed out, the connection is detached from the
    /// pool and closed instead of being returned, so no pooled connection ever carries a stale `WATCH`
    /// or a pending reply; the pool opens a fresh one when needed.
    ///
    /// # Errors
    /// * [`UpdateError::Aborted`] with your error;
    /// * [`UpdateError::Failed`] with [`Error::Conflict`] after the last attempt,
    ///   [`Error::Unavailable`] (no pooled connection in time, Redis down or read-only — nothing
    ///   written), [`Error::OutcomeUnknown`] when the `EXEC` reply did not come in time (**never
    ///   retried**: the commit may have happened), [`Error::Decode`] / [`Error::Encode`] /
    ///   [`Error::TooLarge`] / [`Error::GroupTooLarge`], and [`Error::InvalidName`] for a bad
    ///   name or a name given twice.
    pub async fn update<T, R, E, F>(
        &self,
        names: &[&str],
        mut f: F,
    ) -> std::result::Result<R, UpdateError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(&mut [Option<T>]) -> std::result::Result<R, E>,
    {
        let keys = self.keys(names)?;
        // The same variable twice would get two competing new values (a transfer from an account
        // to itself would create money): refuse it.
        for (i, name) in names.iter().enumerate() {
            if names[..i].contains(name) {
                return Err(Error::invalid_name(name, "named twice in one update").into());
            }
        }
        if names.is_empty() {
            return f(&mut []).map_err(UpdateError::Aborted);
        }
        let client = self.client();
        let settings = self.settings();
        if client.is_cluster() {
            return self.update_by_compare_and_swap(names, &keys, f).await;
        }
        let mut conn = Dedicated::checkout(client).await?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut read = redis::pipe();
            read.cmd("WATCH").arg(&keys).ignore().cmd("MGET").arg(&keys);
            let (raw,): (Vec<Option<String>>,) =
                conn.query(client, &read, Effect::ReadOnly).await?;
            let mut values = decode_read::<T>(names, &raw)?;

            let result = f(&mut values).map_err(UpdateError::Aborted)?;

            let mut write = redis::pipe();
            write.atomic().ignore_errors();
            let mut writes = 0;
            for ((name, key), (old, new)) in names.iter().zip(&keys).zip(raw.iter().zip(&values)) {
                match new {
                    None if old.is_none() => {}
                    None => {
                        write.cmd("DEL").arg(key);
                        writes += 1;
                    }
                    Some(value) => {
                        let json = self.encode(name, value)?;
                        if old.as_deref() != Some(json.as_str()) {
                            write.cmd("SET").arg(key).arg(json).arg("KEEPTTL");
                            writes += 1;
                        }
                    }
                }
            }
            if writes == 0 {
                return Ok(result);
            }
            let reply: std::result::Result<Value, redis::RedisError> =
                conn.query_exec(client, &write).await?;
            match reply {
                Ok(Value::Nil) => {}
                Ok(reply) => {
                    exec_items(reply, writes)?;
                    return Ok(result);
                }
                Err(e) => {
                    return Err(exec_aborted(e, client.config().command_timeout()).into());
                }
            }
            crate::observe::update_conflict(attempt < settings.max_attempts);
            if attempt >= settings.max_attempts {
                return Err(Error::Conflict { attempts: attempt }.into());
            }
            // Give the connection back while waiting: other updates can use it meanwhile.
            drop(conn);
            tokio::time::sleep(backoff(settings, attempt)).await;
            conn = Dedicated::checkout(client).await?;
        }
    }

    /// `update` on a Redis Cluster, where `WATCH` cannot be used (the cluster client does not lend a
    /// connection to the slot's node): read with `MGET`, run `f`, then commit with one
    /// compare-and-swap script that writes only if every variable still holds what was read
    /// (`compare_and_swap.rs`). Same retries, backoff and errors as the `WATCH` path; a
    /// refused or unchanged update sends nothing after the read. Two round trips per attempt.
    async fn update_by_compare_and_swap<T, R, E, F>(
        &self,
        names: &[&str],
        keys: &[String],
        mut f: F,
    ) -> std::result::Result<R, UpdateError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(&mut [Option<T>]) -> std::result::Result<R, E>,
    {
        let client = self.client();
        let settings = self.settings();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let raw: Vec<Option<String>> = {
                let keys = keys.to_vec();
                client
                    .run(Effect::ReadOnly, |mut c| async move {
                        redis::cmd("MGET").arg(&keys).query_async(&mut c).await
                    })
                    .await?
            };
            let mut values = decode_read::<T>(names, &raw)?;
            let result = f(&mut values).map_err(UpdateError::Aborted)?;
            let mut new = Vec::with_capacity(keys.len());
            let mut changed = false;
            for ((name, old), value) in names.iter().zip(&raw).zip(&values) {
                let json = value.as_ref().map(|v| self.encode(name, v)).transpose()?;
                changed |= json.as_deref() != old.as_deref();
                new.push(json.map(String::into_bytes));
            }
            if !changed {
                return Ok(result);
            }
            let expected: Vec<Option<Vec<u8>>> =
                raw.into_iter().map(|r| r.map(String::into_bytes)).collect();
            if super::compare_and_swap::compare_and_swap(client, keys, &expected, &new).await? {
                return Ok(result);
            }
            crate::observe::update_conflict(attempt < settings.max_attempts);
            if attempt >= settings.max_attempts {
                return Err(Error::Conflict { attempts: attempt }.into());
            }
            tokio::time::sleep(backoff(settings, attempt)).await;
        }
    }
}

/// A random wait in `[0, min(max, base × 2^(attempt − 1))]` ("full jitter").
fn backoff(settings: &Settings, attempt: u32) -> Duration {
    let ceiling = settings
        .backoff_base
        .saturating_mul(1_u32 << (attempt - 1).min(20))
        .min(settings.backoff_max);
    let micros = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
    Duration::from_micros(rand::rng().random_range(0..=micros))
}

/// Decodes what `MGET` read for an update, one value per name.
fn decode_read<T: DeserializeOwned>(
    names: &[&str],
    raw: &[Option<String>],
) -> Result<Vec<Option<T>>> {
    if raw.len() != names.len() {
        return Err(super::unexpected_reply(
            "MGET returned a different number of values",
        ));
    }
    names
        .iter()
        .zip(raw)
        .map(|(name, raw)| raw.as_deref().map(|raw| decode::<T>(name, raw)).transpose())
        .collect()
}

/// A pooled connection that goes back to the pool only in a clean state.
///
/// `dirty` is set while a request is in flight and stays set if the request failed or timed out, or
/// if the future owning this was dropped before the reply was read. A dirty connection is detached
/// from the pool on drop ([`deadpool_redis::Connection::take`]) and closed, which also ends any
/// `WATCH` it held; the pool's slot is freed for a fresh connection. A clean connection that still
/// holds a `WATCH` (the closure refused or changed nothing) is returned: deadpool-redis' recycle sends
/// `UNWATCH` before handing it out again.
struct Dedicated {
    conn: Option<crate::client::DedicatedConnection>,
    dirty: bool,
}

impl Dedicated {
    async fn checkout(client: &RedisClient) -> Result<Dedicated> {
        Ok(Dedicated {
            conn: Some(client.dedicated().await?),
            dirty: false,
        })
    }

    /// One round trip, bounded by the command timeout. `effect`: how a lost reply is reported.
    async fn query<T: FromRedisValue>(
        &mut self,
        client: &RedisClient,
        pipe: &redis::Pipeline,
        effect: Effect,
    ) -> Result<T> {
        self.request(client, pipe, effect, |r| r).await
    }

    /// Sends a `MULTI`/`EXEC` pipeline; an `EXECABORT` is returned as the inner error (the reply was
    /// read in full, so the connection stays clean).
    async fn query_exec(
        &mut self,
        client: &RedisClient,
        pipe: &redis::Pipeline,
    ) -> Result<std::result::Result<Value, redis::RedisError>> {
        self.request(client, pipe, Effect::MayWrite, |r| match r {
            Err(e) if is_exec_abort(&e) => Ok(Err(e)),
            other => other.map(Ok),
        })
        .await
    }

    async fn request<T: FromRedisValue, U>(
        &mut self,
        client: &RedisClient,
        pipe: &redis::Pipeline,
        effect: Effect,
        map: impl FnOnce(redis::RedisResult<T>) -> redis::RedisResult<U>,
    ) -> Result<U> {
        let conn = self.conn.as_mut().ok_or_else(|| Error::Unavailable {
            reason: "the pooled connection was closed".into(),
            source: None,
        })?;
        client.count_round_trip();
        self.dirty = true;
        // Bounded by the command timeout and the request's deadline; refused while Redis is
        // known down (`RedisClient::on_dedicated`).
        let value = client
            .on_dedicated(effect, async {
                map(pipe.query_async::<T>(&mut **conn).await)
            })
            .await?;
        self.dirty = false;
        Ok(value)
    }
}

impl Drop for Dedicated {
    fn drop(&mut self) {
        if self.dirty {
            if let Some(conn) = self.conn.take() {
                tracing::debug!("herd: closing a pooled connection left mid-request");
                conn.detach();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded() {
        let settings = Settings {
            keys: crate::keys::Keys::new("t"),
            max_attempts: 10,
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(50),
            max_value_size: 1,
        };
        for attempt in 1..40 {
            let d = backoff(&settings, attempt);
            assert!(d <= Duration::from_millis(50), "{d:?}");
            if attempt == 1 {
                assert!(d <= Duration::from_millis(1));
            }
        }
    }
}
