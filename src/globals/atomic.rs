//! Atomic groups: several writes applied with one `MULTI`/`EXEC`, in one round trip.

use std::time::Duration;

use redis::{RedisError, Value};
use serde::Serialize;

use super::{check_len, ttl_millis, unexpected_reply, Group};
use crate::client::Effect;
use crate::error::{Error, Result};

/// A list of writes on the variables of one [`Group`], applied all together by
/// [`apply`](Self::apply): other workers see all of them or none of them.
///
/// Built by [`Group::atomic`]; each method adds one write and returns the builder. A bad name or a
/// value that does not encode is remembered and reported by `apply`, before anything is sent.
///
/// ```no_run
/// # async fn run(globals: herd::Globals) -> herd::Result<()> {
/// use herd::globals::Outcome;
/// let inventory = globals.group("inventory")?;
/// let outcomes = inventory
///     .atomic()
///     .decr("apples", 3)
///     .incr("sold", 3)
///     .set("last-sale", &"2024-05-01T12:00:00Z")
///     .apply()
///     .await?;
/// if let Outcome::Counter(left) = outcomes[0] {
///     println!("{left} apples left");
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "an atomic group does nothing until `apply` is awaited"]
pub struct AtomicWrites {
    group: Group,
    pipe: redis::Pipeline,
    ops: Vec<Op>,
    error: Option<Error>,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Set,
    Counter,
    Delete,
}

/// What one write of an applied [`AtomicWrites`] did, in the order the writes were added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// A `set` or `set_with_ttl`.
    Set,
    /// An `incr` or `decr`: the variable's new value.
    Counter(i64),
    /// A `delete`: whether the variable existed.
    Deleted(bool),
}

impl AtomicWrites {
    pub(super) fn new(group: Group) -> AtomicWrites {
        let mut pipe = redis::pipe();
        pipe.atomic().ignore_errors();
        AtomicWrites {
            group,
            pipe,
            ops: Vec::new(),
            error: None,
        }
    }

    /// How many writes the group holds.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True when no write was added.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    fn key(&mut self, name: &str) -> Option<String> {
        if self.error.is_some() {
            return None;
        }
        match self.group.key(name) {
            Ok(key) => Some(key),
            Err(e) => {
                self.error = Some(e);
                None
            }
        }
    }

    fn push_set<T: Serialize + ?Sized>(
        mut self,
        name: &str,
        value: &T,
        ttl: Option<Duration>,
    ) -> Self {
        let Some(key) = self.key(name) else {
            return self;
        };
        match self.group.encode(name, value) {
            Ok(json) => {
                let cmd = self.pipe.cmd("SET").arg(key).arg(json);
                if let Some(ttl) = ttl {
                    cmd.arg("PX").arg(ttl_millis(ttl));
                }
                self.ops.push(Op::Set);
            }
            Err(e) => self.error = Some(e),
        }
        self
    }

    /// Adds `SET name value`.
    pub fn set<T: Serialize + ?Sized>(self, name: &str, value: &T) -> Self {
        self.push_set(name, value, None)
    }

    /// Adds `SET name value PX ttl`.
    pub fn set_with_ttl<T: Serialize + ?Sized>(self, name: &str, value: &T, ttl: Duration) -> Self {
        self.push_set(name, value, Some(ttl))
    }

    /// Adds `INCRBY name by`; its [`Outcome`] is the new value.
    pub fn incr(mut self, name: &str, by: i64) -> Self {
        if let Some(key) = self.key(name) {
            self.pipe.cmd("INCRBY").arg(key).arg(by);
            self.ops.push(Op::Counter);
        }
        self
    }

    /// Adds `DECRBY name by`; its [`Outcome`] is the new value.
    pub fn decr(mut self, name: &str, by: i64) -> Self {
        if let Some(key) = self.key(name) {
            self.pipe.cmd("DECRBY").arg(key).arg(by);
            self.ops.push(Op::Counter);
        }
        self
    }

    /// Adds `DEL name`; its [`Outcome`] says whether the variable existed.
    pub fn delete(mut self, name: &str) -> Self {
        if let Some(key) = self.key(name) {
            self.pipe.cmd("DEL").arg(key);
            self.ops.push(Op::Delete);
        }
        self
    }

    /// Sends `MULTI`, the writes, `EXEC` as one pipeline on the shared connection (one round trip)
    /// and checks every element of the reply. An empty group sends nothing.
    ///
    /// # Errors
    /// * a bad name, a value that does not encode or is too large, more than
    ///   [`MAX_GROUP_LEN`](super::MAX_GROUP_LEN) writes: nothing was sent;
    /// * [`Error::GroupCommandFailed`] with the zero-based position of the first write that failed
    ///   while the transaction ran (for example `incr` on a variable holding text). Redis does not
    ///   roll back: **the other writes were applied**;
    /// * [`Error::GroupAborted`] (a command refused while queued, e.g. by an ACL rule) or
    ///   [`Error::Unavailable`] (read-only replica, out of memory, Redis down): nothing was applied;
    /// * [`Error::OutcomeUnknown`]: the reply did not arrive in time; the group may or may not have
    ///   been applied (as a whole). It is not retried.
    pub async fn apply(self) -> Result<Vec<Outcome>> {
        if let Some(e) = self.error {
            return Err(e);
        }
        check_len(self.ops.len())?;
        if self.ops.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.group.client().clone();
        let timeout = client.config().command_timeout();
        let pipe = self.pipe;
        let reply = client
            .run(Effect::MayWrite, |mut c| async move {
                match pipe.query_async::<Value>(&mut c).await {
                    Err(e) if is_exec_abort(&e) => Ok(Err(e)),
                    other => other.map(Ok),
                }
            })
            .await?
            .map_err(|e| exec_aborted(e, timeout))?;
        let items = exec_items(reply, self.ops.len())?;
        self.ops
            .iter()
            .zip(items)
            .map(|(op, value)| match (op, value) {
                (Op::Set, Value::Okay) => Ok(Outcome::Set),
                (Op::Counter, Value::Int(n)) => Ok(Outcome::Counter(n)),
                (Op::Delete, Value::Int(n)) => Ok(Outcome::Deleted(n > 0)),
                _ => Err(unexpected_reply(
                    "unexpected reply to a write in an atomic group",
                )),
            })
            .collect()
    }
}

/// True for a transaction Redis refused before running it (`EXECABORT`).
pub(super) fn is_exec_abort(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        redis::ErrorKind::Server(redis::ServerErrorKind::ExecAbort)
    )
}

/// Classifies an `EXECABORT` by the command that caused it: an availability refusal (read-only
/// replica, out of memory, loading) is [`Error::Unavailable`]; anything else is
/// [`Error::GroupAborted`] with the refused command's position. Either way nothing was applied.
pub(super) fn exec_aborted(err: RedisError, timeout: Duration) -> Error {
    let first = err
        .clone()
        .into_server_errors()
        .and_then(|errors| errors.first().cloned());
    let Some((index, cause)) = first else {
        return Error::GroupAborted {
            index: 0,
            source: err,
        };
    };
    match Error::from_redis(RedisError::from(cause), Effect::MayWrite, timeout) {
        Error::Unavailable { source, .. } => Error::Unavailable {
            reason: format!(
                "Redis refused command {index} of an atomic group (EXECABORT); nothing was applied"
            ),
            source,
        },
        Error::Redis(source) => Error::GroupAborted { index, source },
        other => other,
    }
}

/// Checks an `EXEC` reply: one element per command, none of them an error.
pub(super) fn exec_items(reply: Value, expected: usize) -> Result<Vec<Value>> {
    let items = match reply {
        Value::Array(items) => items,
        _ => return Err(unexpected_reply("EXEC did not return an array")),
    };
    if items.len() != expected {
        return Err(unexpected_reply(
            "EXEC returned a different number of replies",
        ));
    }
    if let Some((index, err)) = items.iter().enumerate().find_map(|(i, v)| match v {
        Value::ServerError(e) => Some((i, e.clone())),
        _ => None,
    }) {
        return Err(Error::GroupCommandFailed {
            index,
            source: RedisError::from(err),
        });
    }
    Ok(items)
}
