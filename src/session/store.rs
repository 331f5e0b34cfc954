//! What a session does in Redis: one place for every command and script the session layer sends.
//!
//! A session is a hash `{prefix}:s:{id}` (see [`crate::keys`]): one field per session key holding the
//! value's JSON, plus meta fields starting with `$`:
//!
//! * `$c`, the **timing record** `created:touched:idle:indexed` ([`Timing`]): when the session was
//!   created (start of the absolute timeout), when its TTL was last pushed back, its own idle
//!   timeout in ms (empty: the layer's), and until when its owner's index lists it (empty: no owner).
//!   One field, so that a read (`HGETALL`) and an `incr` (`HGET $c`) learn all of it at once;
//! * `$o`, the owner ("log out everywhere");
//! * `$m`, only on a cluster while the id is being cycled (see [`cycle_across_slots`]).
//!
//! The key's TTL is the idle timeout, capped so that it never runs past the absolute deadline, nor,
//! for an owned session, past the time its owner's index lists it until: the index always knows
//! every live session of its owner, and it never outlives them by more than one idle timeout
//! (entries are pushed forward by `7/4` of the idle timeout when less than `5/4` of it is left, off
//! the request's path — see [`bump_index`]).

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::{Cmd, Pipeline, Script, Value};

use super::fields::Fields;
use crate::client::RedisClient;
use crate::error::{Error, Result};
use crate::keys::SessionId;

/// Applies one request's changes to a session, all or nothing.
///
/// A script rather than MULTI/EXEC because the write is conditional: a session destroyed or expired
/// meanwhile must not be resurrected, an id must not be taken twice, and nothing may be written when
/// a check (size, integer) fails. All checks run before the first write.
static SAVE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("save.lua")));

/// First step of a cycle on a Redis Cluster: marks the old session as moving and reads it (see
/// [`cycle_across_slots`]).
const TAKE_SOURCE: &str = include_str!("take.lua");

/// Expiry settings in force for one layer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Expiry {
    pub(crate) idle: Duration,
    pub(crate) absolute: Duration,
}

/// A session's timing record (field `$c`): `created:touched:idle:indexed`, unix ms (idle in ms),
/// empty parts absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Timing {
    /// Start of the absolute timeout.
    pub(crate) created: u64,
    /// When the TTL was last pushed back by a save (an `incr` pushes it without saying so).
    pub(crate) touched: u64,
    /// The session's own idle timeout, ms.
    pub(crate) idle: Option<u64>,
    /// Until when the owner's index lists the session; present exactly when it has an owner.
    pub(crate) indexed: Option<u64>,
}

impl Timing {
    /// Parses a record; `None` for anything herd did not write (not a session). One pass over the
    /// bytes: it runs on every load and every `incr`.
    pub(crate) fn parse(value: &[u8]) -> Option<Timing> {
        let mut parts = [0u64; 4];
        let mut lens = [0u8; 4];
        let mut part = 0;
        for &b in value {
            if b.is_ascii_digit() {
                if lens[part] == 19 {
                    return None;
                }
                parts[part] = parts[part] * 10 + u64::from(b - b'0');
                lens[part] += 1;
            } else if b == b':' && part < 3 {
                part += 1;
            } else {
                return None;
            }
        }
        let given = |i: usize| (lens[i] > 0).then_some(parts[i]);
        Some(Timing {
            created: given(0).filter(|c| *c > 0)?,
            touched: parts[1],
            idle: given(2),
            indexed: given(3),
        })
    }

    fn idle(&self, expiry: Expiry) -> u64 {
        self.idle.unwrap_or(ms(expiry.idle))
    }

    fn deadline(&self, expiry: Expiry) -> u64 {
        self.created.saturating_add(ms(expiry.absolute))
    }

    /// The latest time the key may live until: the absolute deadline, and the index's coverage.
    fn limit(&self, expiry: Expiry) -> u64 {
        let deadline = self.deadline(expiry);
        self.indexed.map_or(deadline, |x| x.min(deadline))
    }

    /// The TTL a write at `now` gives the key; `None` when the session is over.
    pub(crate) fn ttl(&self, now: u64, expiry: Expiry) -> Option<u64> {
        let left = self.limit(expiry).saturating_sub(now);
        (left > 0).then(|| self.idle(expiry).min(left))
    }

    /// Whether the owner's index should be pushed forward (see [`bump_index`]).
    pub(crate) fn index_due(&self, now: u64, expiry: Expiry) -> bool {
        self.indexed.is_some_and(|indexed| {
            index_due(indexed, self.idle(expiry), now, self.deadline(expiry))
        })
    }
}

/// Whether an index coverage running until `indexed` should be pushed forward at `now`: less than
/// `5/4` of the idle timeout is left, and it does not yet reach the session's `deadline` (pass
/// `u64::MAX` when it is not known).
pub(crate) fn index_due(indexed: u64, idle_ms: u64, now: u64, deadline: u64) -> bool {
    indexed < now.saturating_add(idle_ms + idle_ms / 4).min(deadline)
}

/// How far an owner's index is pushed forward at `now`: `7/4` of the idle timeout.
pub(crate) fn index_target(now: u64, idle_ms: u64) -> u64 {
    now.saturating_add(idle_ms + idle_ms * 3 / 4)
}

/// A session as read from Redis.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub(crate) fields: Fields<Vec<u8>>,
    pub(crate) timing: Timing,
    pub(crate) owner: Option<String>,
    /// The key's TTL is old enough that it should be pushed back (idle timeout refresh).
    pub(crate) needs_refresh: bool,
    /// The owner's index should be pushed forward.
    pub(crate) index_due: bool,
}

/// How a save treats the session's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SaveMode {
    /// A fresh id: the key must not exist yet.
    New,
    /// The key must still exist (never resurrect).
    Existing,
    /// The key must exist and moves to a fresh id (RENAME on one server; on a cluster, where the new
    /// key is in another slot, [`cycle_across_slots`]).
    Cycle,
}

/// The changes of one request, in the shape the save script takes.
#[derive(Clone, Debug, Default)]
pub(crate) struct Delta {
    pub(crate) clear: bool,
    pub(crate) set: Vec<(String, Vec<u8>)>,
    pub(crate) remove: Vec<String>,
    pub(crate) owner: Option<String>,
    pub(crate) idle_override_ms: Option<u64>,
    pub(crate) incr: Option<(String, i64)>,
}

impl Delta {
    pub(crate) fn is_empty(&self) -> bool {
        !self.clear
            && self.set.is_empty()
            && self.remove.is_empty()
            && self.owner.is_none()
            && self.idle_override_ms.is_none()
            && self.incr.is_none()
    }
}

/// What the save script answered.
#[derive(Debug)]
pub(crate) enum SaveOutcome {
    /// Applied; the value of the incremented field if there was one; the session's owner, and
    /// until when its index lists it.
    Applied {
        incr: i64,
        owner: Option<String>,
        indexed: Option<u64>,
    },
    /// The session does not exist any more (destroyed or expired).
    Gone,
    /// The new id is taken (practically impossible with 122 random bits); pick another.
    IdTaken,
    /// Over the session size limit; nothing written.
    TooLarge { size: usize },
    /// The incremented field holds something that is not an integer; nothing written.
    NotAnInteger,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

/// Reads a session: all its fields in one command (`HGETALL`). `Ok(None)` when it does not exist, is
/// past its absolute deadline or its index coverage, or is not a session herd wrote.
///
/// No `PTTL`: the timing record says when the TTL was last pushed back, which is all a read needs
/// to decide whether the idle timeout should be refreshed. One command instead of a pipeline of two
/// is measurably cheaper on the request's path (fewer replies to parse, no pipeline bookkeeping).
pub(crate) async fn load(
    client: &RedisClient,
    id: &SessionId,
    expiry: Expiry,
) -> Result<Option<Loaded>> {
    let key = client.keys().session(id);
    // Pairs, not a map, and names as bytes: they are sorted into `Loaded` right below; a name that
    // is not UTF-8 (herd never writes one) is skipped rather than making the session unreadable.
    let raw: Vec<(Vec<u8>, Vec<u8>)> = client
        .run(false, |mut c| async move {
            redis::cmd("HGETALL").arg(&key).query_async(&mut c).await
        })
        .await?;
    if raw.is_empty() {
        return Ok(None);
    }
    let mut loaded = Loaded {
        fields: Fields::with_capacity(raw.len()),
        ..Loaded::default()
    };
    let mut timing = None;
    for (field, value) in raw {
        let Ok(field) = String::from_utf8(field) else {
            continue;
        };
        if let Some(meta) = field.strip_prefix('$') {
            match meta {
                "c" => timing = Timing::parse(&value),
                "o" => loaded.owner = Some(String::from_utf8_lossy(&value).into_owned()),
                // Being cycled to a new id on a cluster: the old id is no longer valid.
                "m" => return Ok(None),
                _ => {}
            }
        } else {
            loaded.fields.push_unique(field, value);
        }
    }
    let Some(timing) = timing else {
        // Not a session herd wrote (e.g. what a write into a destroyed session left for a moment).
        return Ok(None);
    };
    let now = now_ms();
    let Some(ttl) = timing.ttl(now, expiry) else {
        // Past the absolute deadline or the index coverage (its TTL is capped there, so Redis is
        // about to drop it).
        return Ok(None);
    };
    // The key expires at `touched + idle` at the latest (capped); pushing it to `now + idle` is
    // worth a write once a tenth of the idle timeout has passed: sessions then expire between 90%
    // and 100% of the idle timeout after the last request, and a busy visitor costs at most one
    // refresh per tenth of the idle timeout, not one per request. (`incr` pushes the TTL back
    // without updating `touched`: then a refresh may come early, never late.)
    let idle = timing.idle(expiry);
    let expires = timing
        .touched
        .saturating_add(idle)
        .min(timing.limit(expiry));
    loaded.needs_refresh = expires.saturating_add(idle / 10) < now.saturating_add(ttl);
    loaded.index_due = loaded.owner.is_some() && timing.index_due(now, expiry);
    loaded.timing = timing;
    Ok(Some(loaded))
}

/// Sets a session's TTL without touching its data; nothing happens if the key is gone.
pub(crate) async fn set_ttl(client: &RedisClient, id: &SessionId, ttl_ms: u64) -> Result<()> {
    let key = client.keys().session(id);
    client
        .run(true, |mut c| async move {
            redis::cmd("PEXPIRE")
                .arg(&key)
                .arg(ttl_ms)
                .query_async::<i64>(&mut c)
                .await
        })
        .await?;
    Ok(())
}

/// Pushes a session's idle timeout back (and records when): the save script with nothing to change,
/// so a session that ended meanwhile is not resurrected. Runs off the request's path.
pub(crate) async fn touch(client: &RedisClient, id: &SessionId, expiry: Expiry) -> Result<()> {
    save_nothing(client, id, expiry, None).await
}

/// The save script on an existing session with no change: its TTL pushed back (and `touched`
/// recorded), its index coverage moved to `index` if given.
async fn save_nothing(
    client: &RedisClient,
    id: &SessionId,
    expiry: Expiry,
    index: Option<IndexUpdate<'_>>,
) -> Result<()> {
    let delta = Delta::default();
    save(
        client,
        Save {
            mode: SaveMode::Existing,
            id,
            new_id: None,
            delta: &delta,
            expiry,
            max_bytes: 0,
            index,
        },
    )
    .await?;
    Ok(())
}

/// Pushes an owned session's entry in its owner's index forward (to [`index_target`]), then lets the
/// session live that long (the save script with nothing else to change: it also refreshes the
/// idle timeout). Index first: a failure in between leaves the index covering more than the session,
/// never less. `owner`, if not known, is read from the session. Runs off the request's path, at
/// most about once per idle timeout and session.
pub(crate) async fn bump_index(
    client: &RedisClient,
    id: &SessionId,
    expiry: Expiry,
    owner: Option<String>,
    idle_ms: u64,
) -> Result<()> {
    let owner = match owner {
        Some(owner) => owner,
        None => {
            let key = client.keys().session(id);
            let owner: Option<String> = client
                .run(false, |mut c| async move {
                    redis::cmd("HGET")
                        .arg(&key)
                        .arg("$o")
                        .query_async(&mut c)
                        .await
                })
                .await?;
            match owner {
                Some(owner) => owner,
                None => return Ok(()),
            }
        }
    };
    let index = IndexUpdate {
        owner: &owner,
        until: index_target(now_ms(), idle_ms),
    };
    save_nothing(client, id, expiry, Some(index)).await
}

/// What [`incr_existing`] found.
#[derive(Debug)]
pub(crate) enum IncrOutcome {
    /// The new value, and the session's timing record.
    Applied(i64, Timing),
    /// The session does not exist (any more) or is being moved to a new id: nothing was kept.
    Gone,
    NotAnInteger,
}

/// `incr` on a session believed to exist, with nothing else to write, without a script:
/// `HINCRBY`, `PEXPIRE` and `HGET $c`, pipelined (one round trip). Not on a cluster, where a
/// session being moved to a new id (`$m`, see [`cycle_across_slots`]) must not be written to.
/// Cheaper for Redis than the save script, and as safe:
///
/// * a session destroyed or expired meanwhile is not resurrected: `HINCRBY` on a missing key makes
///   a hash without `$c`, which no load or save accepts as a session; seeing `$c` missing, this
///   deletes it again (a second round trip, only in that case) and answers `Gone`;
/// * `HINCRBY` refuses a non-integer and writes nothing;
/// * the TTL: exact when the session was loaded (`known`), else the layer's idle timeout, corrected
///   in a second round trip only when the session's own timeout differs or its absolute deadline
///   (or index coverage) is closer.
pub(crate) async fn incr_existing(
    client: &RedisClient,
    id: &SessionId,
    field: &str,
    by: i64,
    expiry: Expiry,
    known: Option<Timing>,
) -> Result<IncrOutcome> {
    let now = now_ms();
    let ttl = match known {
        Some(timing) => match timing.ttl(now, expiry) {
            Some(ttl) => ttl,
            None => return Ok(IncrOutcome::Gone),
        },
        None => ms(expiry.idle),
    };
    let key = client.keys().session(id);
    let mut pipe = redis::pipe();
    pipe.cmd("HINCRBY").arg(&key).arg(field).arg(by);
    pipe.cmd("PEXPIRE").arg(&key).arg(ttl);
    pipe.cmd("HGET").arg(&key).arg("$c");
    // No `.ignore()` in these pipelines: redis-rs filters ignored replies through a hash set, which
    // costs more than converting a reply nobody reads.
    let reply: redis::RedisResult<(i64, Value, Option<Vec<u8>>)> = client
        .run(true, |mut c| async move {
            let result = pipe.query_async(&mut c).await;
            // A refused HINCRBY is an answer, not a failure of the round trip.
            match result {
                Err(e) if e.to_string().contains("not an integer") => Ok(Err(e)),
                other => other.map(Ok),
            }
        })
        .await?;
    let (n, _, record) = match reply {
        Ok(r) => r,
        Err(_) => return Ok(IncrOutcome::NotAnInteger),
    };
    let Some(timing) = record.as_deref().and_then(Timing::parse) else {
        // No session here: the increment made a stray hash. Remove it (best effort: it has a TTL).
        if let Err(e) = destroy(client, id, None).await {
            tracing::debug!(error = %e, "herd: removing a stray counter hash failed");
        }
        return Ok(IncrOutcome::Gone);
    };
    if known.is_none() {
        match timing.ttl(now, expiry) {
            None => {
                destroy(client, id, None).await?;
                return Ok(IncrOutcome::Gone);
            }
            Some(right) if right != ttl => {
                set_ttl(client, id, right).await?;
            }
            Some(_) => {}
        }
    }
    Ok(IncrOutcome::Applied(n, timing))
}

/// What [`save_loaded`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WriteOutcome {
    Applied,
    /// The session ended (destroyed or expired) after this request read it: nothing was kept.
    Gone,
}

/// Writes the changes of a request that read the session first (the common read-modify-write),
/// without a script: `HSET` of the changed fields, `HDEL` of the removed ones, `PEXPIRE`, and a
/// check that the session still exists (`HEXISTS $c`), pipelined in one round trip.
///
/// The read gave everything a script would check: the timing record (so the TTL is exact) and the
/// size (checked by the caller). What remains is "never resurrect": a session destroyed or expired
/// since the read makes `HSET` create a hash without `$c`, which no load or save accepts as a
/// session; seeing `$c` missing, this deletes it again (a second round trip, only then) and answers
/// `Gone`. That hash has the TTL set in the same pipeline, so even a failed delete leaves nothing
/// behind for long. Not on a cluster (see [`incr_existing`]); not for `clear`, owners, per-session
/// timeouts or increments, which go through the save script.
pub(crate) async fn save_loaded(
    client: &RedisClient,
    id: &SessionId,
    delta: &Delta,
    timing: Timing,
    expiry: Expiry,
) -> Result<WriteOutcome> {
    let Some(ttl) = timing.ttl(now_ms(), expiry) else {
        return Ok(WriteOutcome::Gone);
    };
    let key = client.keys().session(id);
    let mut pipe = redis::pipe();
    if !delta.set.is_empty() {
        pipe.cmd("HSET").arg(&key);
        for (field, value) in &delta.set {
            pipe.arg(field).arg(value.as_slice());
        }
    }
    if !delta.remove.is_empty() {
        pipe.cmd("HDEL").arg(&key).arg(&delta.remove);
    }
    pipe.cmd("PEXPIRE").arg(&key).arg(ttl);
    pipe.cmd("HEXISTS").arg(&key).arg("$c");
    // Every reply taken as it comes (see `incr_existing`); the last one says whether `$c` is there.
    let replies: Vec<Value> = client
        .run(true, |mut c| async move { pipe.query_async(&mut c).await })
        .await?;
    let exists = matches!(replies.last(), Some(Value::Int(1)));
    if !exists {
        // The session ended meanwhile: remove what the write re-created (best effort: it has a TTL).
        if let Err(e) = destroy(client, id, None).await {
            tracing::debug!(error = %e, "herd: removing a stray session hash failed");
        }
        return Ok(WriteOutcome::Gone);
    }
    Ok(WriteOutcome::Applied)
}

/// An owner index update sent with a save: the index lists the session until `until`, and the
/// session records it (its TTL never runs past it).
#[derive(Clone, Copy, Debug)]
pub(crate) struct IndexUpdate<'a> {
    pub(crate) owner: &'a str,
    pub(crate) until: u64,
}

/// Parameters of one save.
pub(crate) struct Save<'a> {
    pub(crate) mode: SaveMode,
    pub(crate) id: &'a SessionId,
    /// With [`SaveMode::Cycle`]: the fresh id.
    pub(crate) new_id: Option<&'a SessionId>,
    pub(crate) delta: &'a Delta,
    pub(crate) expiry: Expiry,
    /// Check the session's total size in Redis (0: the caller has checked it).
    pub(crate) max_bytes: usize,
    /// List the session (its new id when cycling) in its owner's index, when the owner is known:
    /// after a create, a cycle or a new owner, and when the index is pushed forward.
    pub(crate) index: Option<IndexUpdate<'a>>,
}

/// Applies a save in one round trip: the save script, plus the owner index update when the session
/// (re)gets an id under an owner. On a cluster the index update (another slot) is sent alongside,
/// not in the same pipeline, and cycling an id takes three round trips ([`cycle_across_slots`]).
pub(crate) async fn save(client: &RedisClient, save: Save<'_>) -> Result<SaveOutcome> {
    if save.mode == SaveMode::Cycle && client.is_cluster() {
        return cycle_across_slots(client, save).await;
    }
    save_in_place(client, save).await
}

/// Cycles a session id on a Redis Cluster, where the old and new keys live in different slots, so
/// neither `RENAME` nor one script may touch both. Three round trips, each on one slot:
///
/// 1. on the old key, a script checks the session exists, **marks** it as moving
///    (field `$m` = the new id) and reads it (`take.lua`). From then on the old id is dead: loads see it as
///    absent and saves into it answer "gone", exactly as after a destroy;
/// 2. the session's data (the old fields with this request's changes applied) is written under the
///    new id by the usual save script in `new` mode (all checks before any write), with the owner
///    index update sent alongside;
/// 3. the old key is deleted.
///
/// What a crash or a lost reply leaves: after 1, the old session is marked and unusable and the
/// visitor is logged out — the marked key expires with its idle timeout; after 2, the new session is
/// complete and the marked old key also just expires. Never two usable sessions, never the old id
/// still valid after a login (no fixation). If step 2 refuses (too large, not an integer, id taken)
/// nothing was written under the new id, and the mark is removed again: the old session is intact.
async fn cycle_across_slots(client: &RedisClient, save: Save<'_>) -> Result<SaveOutcome> {
    let (Some(new_id), delta) = (save.new_id, save.delta) else {
        return save_in_place(client, save).await;
    };
    let old_key = client.keys().session(save.id);
    // EVAL with the source, not EVALSHA: logins are rare, and this way the first one on each node
    // costs no NOSCRIPT round trip. A retry with the same new id is harmless (see take.lua).
    let taken: Option<Vec<(Vec<u8>, Vec<u8>)>> = {
        let take = redis::cmd("EVAL")
            .arg(TAKE_SOURCE)
            .arg(1)
            .arg(&old_key)
            .arg(new_id.as_str())
            .to_owned();
        client
            .run(true, |mut c| async move { take.query_async(&mut c).await })
            .await?
    };
    let Some(old) = taken else {
        return Ok(SaveOutcome::Gone);
    };

    // The old session with this request's changes applied, as a save of a brand-new session.
    let mut merged = Delta {
        clear: false,
        set: Vec::with_capacity(old.len() + delta.set.len()),
        ..delta.clone()
    };
    merged.remove.clear();
    let mut old_owner = None;
    for (field, value) in old {
        let Ok(field) = String::from_utf8(field) else {
            continue; // not a name herd wrote (see `load`)
        };
        match field.strip_prefix('$') {
            Some("o") => old_owner = Some(String::from_utf8_lossy(&value).into_owned()),
            Some("c") if merged.idle_override_ms.is_none() => {
                merged.idle_override_ms = Timing::parse(&value).and_then(|t| t.idle);
            }
            Some(_) => {}
            None if delta.clear
                || delta.remove.contains(&field)
                || delta.set.iter().any(|(f, _)| *f == field) => {}
            None => merged.set.push((field, value)),
        }
    }
    merged.set.extend(delta.set.iter().cloned());
    // An owned session keeps its owner, and its new id goes into the owner's index with it (the
    // caller may not have known the owner: the take told).
    if merged.owner.is_none() {
        merged.owner = old_owner;
    }
    let idle = merged.idle_override_ms.unwrap_or(ms(save.expiry.idle));
    let index = match (save.index, &merged.owner) {
        (Some(index), _) => Some(index),
        (None, Some(owner)) => Some(IndexUpdate {
            owner,
            until: index_target(now_ms(), idle),
        }),
        (None, None) => None,
    };

    let outcome = save_in_place(
        client,
        Save {
            mode: SaveMode::New,
            id: new_id,
            new_id: None,
            delta: &merged,
            expiry: save.expiry,
            max_bytes: save.max_bytes,
            index,
        },
    )
    .await?;
    let cleanup = match outcome {
        SaveOutcome::Applied { .. } => redis::cmd("DEL").arg(&old_key).to_owned(),
        // Nothing was written under the new id: the old session stays valid.
        _ => redis::cmd("HDEL").arg(&old_key).arg("$m").to_owned(),
    };
    if let Err(e) = client
        .run(true, |mut c| async move {
            cleanup.query_async::<i64>(&mut c).await
        })
        .await
    {
        // The old key stays marked (unusable) until it expires; the new session is what counts.
        tracing::debug!(error = %e, "herd: could not clean up the old key of a cycled session");
    }
    Ok(outcome)
}

/// The save script on one key (plus the new key on a single server when cycling).
async fn save_in_place(client: &RedisClient, save: Save<'_>) -> Result<SaveOutcome> {
    let key = client.keys().session(save.id);
    let now = now_ms();
    let mut cmd = evalsha(&SAVE);
    let target_id = save.new_id.unwrap_or(save.id);
    cmd.arg(if save.new_id.is_some() { 2 } else { 1 }).arg(&key);
    if let Some(new_id) = save.new_id {
        cmd.arg(client.keys().session(new_id));
    }
    let delta = save.delta;
    cmd.arg(match save.mode {
        SaveMode::New => "new",
        SaveMode::Existing => "existing",
        SaveMode::Cycle => "cycle",
    })
    .arg(now)
    .arg(ms(save.expiry.idle))
    .arg(ms(save.expiry.absolute))
    .arg(save.max_bytes)
    .arg(if delta.clear { "1" } else { "0" })
    .arg(delta.owner.as_deref().unwrap_or(""));
    match delta.idle_override_ms {
        Some(v) => cmd.arg(v),
        None => cmd.arg(""),
    };
    match &delta.incr {
        Some((field, by)) => cmd.arg(field).arg(*by),
        None => cmd.arg("").arg(0),
    };
    match &save.index {
        Some(index) => cmd.arg(index.until),
        None => cmd.arg(""),
    };
    cmd.arg(delta.set.len());
    for (field, value) in &delta.set {
        cmd.arg(field).arg(value.as_slice());
    }
    for field in &delta.remove {
        cmd.arg(field);
    }

    let reply = match save.index {
        // One command on its own: cheaper than a pipeline, and Redis errors keep their codes.
        None => run_with_script(client, &Query::Cmd(&cmd), &SAVE).await?,
        Some(index) if client.is_cluster() => {
            // The index lives in another slot: sent alongside, at the same time (one round trip
            // of latency), so their order is not known. If the index update fails, a session the
            // save did write must not live unlisted: it is removed again and the save reported failed.
            // Atomic, so that a refusal during resharding (MOVED, ASK) can be re-sent safely.
            let mut pipe = redis::pipe();
            pipe.atomic();
            add_owner_index(&mut pipe, client, index.owner, target_id, now, index.until);
            let query = Query::Cmd(&cmd);
            let (reply, indexed) = tokio::join!(
                run_with_script(client, &query, &SAVE),
                client.run_alongside(
                    true,
                    |mut c| async move { pipe.query_async::<()>(&mut c).await }
                )
            );
            if let Err(e) = indexed {
                if reply.is_ok() {
                    if let Err(e) = destroy(client, target_id, None).await {
                        tracing::warn!(error = %e, "herd: a session whose owner index update failed could not be removed; it ends when its recorded index coverage does");
                    }
                }
                return Err(e);
            }
            reply?
        }
        Some(index) => {
            // The index first, then the save, in one pipeline: the index never lists less than
            // the session's record says.
            let mut pipe = redis::pipe();
            add_owner_index(&mut pipe, client, index.owner, target_id, now, index.until);
            pipe.add_command(cmd);
            let mut replies: Vec<Value> =
                redis::from_redis_value(run_with_script(client, &Query::Pipe(&pipe), &SAVE).await?)
                    .map_err(|e| Error::Redis(e.into()))?;
            replies.pop().ok_or_else(|| {
                Error::Redis(redis::RedisError::from((
                    redis::ErrorKind::UnexpectedReturnType,
                    "empty reply to the session save",
                )))
            })?
        }
    };
    let reply: (i64, i64, Option<String>, Option<u64>) =
        redis::from_redis_value(reply).map_err(|e| Error::Redis(e.into()))?;
    Ok(match reply {
        (1, incr, owner, indexed) => SaveOutcome::Applied {
            incr,
            owner,
            indexed,
        },
        (0, ..) => SaveOutcome::Gone,
        (2, ..) => SaveOutcome::IdTaken,
        (3, size, ..) => SaveOutcome::TooLarge {
            size: size.max(0) as usize,
        },
        _ => SaveOutcome::NotAnInteger,
    })
}

/// Adds the commands that list `id` in `owner`'s index until `until` (unix ms): the member with
/// `until` as score (never lowered: a concurrent push forward wins), members whose time has passed
/// pruned, and the index's TTL pushed to its latest member, so that it never outlives the sessions
/// it lists by more than their coverage (at most `7/4` of an idle timeout past their last activity).
pub(crate) fn add_owner_index(
    pipe: &mut Pipeline,
    client: &RedisClient,
    owner: &str,
    id: &SessionId,
    now: u64,
    until: u64,
) {
    let index = client.keys().owner_index(owner);
    pipe.cmd("ZADD")
        .arg(&index)
        .arg("GT")
        .arg(until)
        .arg(id.as_str())
        .ignore()
        .cmd("ZREMRANGEBYSCORE")
        .arg(&index)
        .arg("-inf")
        .arg(now)
        .ignore()
        .cmd("PEXPIREAT")
        .arg(&index)
        .arg(until)
        .arg("NX")
        .ignore()
        .cmd("PEXPIREAT")
        .arg(&index)
        .arg(until)
        .arg("GT")
        .ignore();
}

/// Deletes a session (logout): one round trip. With its owner known, its index entry goes too (in
/// the same pipeline on one server; alongside on a cluster, where the index is in another slot).
pub(crate) async fn destroy(
    client: &RedisClient,
    id: &SessionId,
    owner: Option<&str>,
) -> Result<()> {
    let del = redis::cmd("DEL").arg(client.keys().session(id)).to_owned();
    match owner {
        None => {
            client
                .run(
                    true,
                    |mut c| async move { del.query_async::<i64>(&mut c).await },
                )
                .await?;
        }
        Some(owner) => {
            let zrem = redis::cmd("ZREM")
                .arg(client.keys().owner_index(owner))
                .arg(id.as_str())
                .to_owned();
            client.run_each(true, vec![del, zrem]).await?;
        }
    }
    Ok(())
}

/// Destroys every session of `owner` ("log out everywhere"): reads the owner's index, deletes each
/// listed session and removes exactly those members (a session created meanwhile stays indexed).
/// Two round trips whatever the number of sessions. Returns how many sessions existed and were
/// deleted.
pub(crate) async fn destroy_owner(client: &RedisClient, owner: &str) -> Result<usize> {
    crate::keys::validate_owner(owner)?;
    let index = client.keys().owner_index(owner);
    let ids: Vec<String> = {
        let index = index.clone();
        client
            .run(false, |mut c| async move {
                redis::cmd("ZRANGE")
                    .arg(&index)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut c)
                    .await
            })
            .await?
    };
    let ids: Vec<SessionId> = ids.iter().filter_map(|s| SessionId::parse(s)).collect();
    if ids.is_empty() {
        return Ok(0);
    }
    // One DEL per key: keys of different sessions live in different cluster slots (run_each sends
    // them as one pipeline on a single server, one command per slot at once on a cluster).
    let mut cmds: Vec<Cmd> = ids
        .iter()
        .map(|id| redis::cmd("DEL").arg(client.keys().session(id)).to_owned())
        .collect();
    cmds.push(
        redis::cmd("ZREM")
            .arg(&index)
            .arg(ids.iter().map(SessionId::as_str).collect::<Vec<_>>())
            .to_owned(),
    );
    let replies = client.run_each(true, cmds).await?;
    Ok(replies
        .iter()
        .take(ids.len())
        .filter(|v| matches!(v, Value::Int(n) if *n > 0))
        .count())
}

/// An `EVALSHA` of `script` to which the caller appends numkeys, keys and args.
fn evalsha(script: &Script) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash());
    cmd
}

/// A command or a pipeline.
enum Query<'a> {
    Cmd(&'a Cmd),
    Pipe(&'a Pipeline),
}

/// Runs a command or pipeline that contains an `EVALSHA` of `script`; if Redis does not know the
/// script yet (first use, or after a restart), loads it and runs it again. Safe to repeat: a
/// `NOSCRIPT` reply means the script did not run, and the other commands pipelined with it are
/// idempotent index updates.
async fn run_with_script(
    client: &RedisClient,
    query: &Query<'_>,
    script: &Script,
) -> Result<Value> {
    async fn once(client: &RedisClient, query: &Query<'_>) -> Result<Value> {
        client
            .run(true, |mut c| async move {
                match query {
                    Query::Cmd(cmd) => cmd.query_async::<Value>(&mut c).await,
                    Query::Pipe(pipe) => pipe.query_async::<Value>(&mut c).await,
                }
            })
            .await
    }
    match once(client, query).await {
        Err(Error::Redis(e))
            if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
        {
            client
                .run(false, |mut c| async move {
                    script.prepare_invoke().load_async(&mut c).await
                })
                .await?;
            once(client, query).await
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::Timing;

    #[test]
    fn timing_records_parse_and_refuse_garbage() {
        let t = |s: &str| Timing::parse(s.as_bytes());
        assert_eq!(
            t("1700000000000:1700000000123::"),
            Some(Timing {
                created: 1_700_000_000_000,
                touched: 1_700_000_000_123,
                idle: None,
                indexed: None,
            })
        );
        assert_eq!(
            t("5:6:7:8"),
            Some(Timing {
                created: 5,
                touched: 6,
                idle: Some(7),
                indexed: Some(8),
            })
        );
        // Older records: created alone, or created:touched.
        assert_eq!(t("5").map(|t| (t.created, t.touched)), Some((5, 0)));
        assert_eq!(t("5:6").map(|t| (t.created, t.touched)), Some((5, 6)));
        for bad in [
            "",
            ":1::",
            "0:1::",
            "x",
            "1:2:3:4:5",
            "1;2",
            "-1",
            "99999999999999999999",
        ] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
    }
}
