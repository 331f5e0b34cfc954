//! What a session does in Redis: one place for every command and script the session layer sends.
//!
//! A session is a hash `{prefix}:s:{id}` (see [`crate::keys`]): one field per session key holding the
//! value's JSON, plus meta fields starting with `$`:
//!
//! * `$c`, the **timing record** `created:touched:idle:indexed` ([`Timing`]): when the session was
//!   created (start of the absolute timeout), when its TTL was last pushed back, its own idle
//!   timeout in ms (empty: the layer's), and until when its owner's index lists it (empty: no owner).
//!   One field, so that a read (`HGETALL`) and the save script (`HMGET`) learn all of it at once;
//! * `$o`, the owner ("log out everywhere");
//! * `$m`, only on a cluster while the id is being cycled (see `cycle::cycle_across_slots`);
//! * `$t`, alone in the hash: the **tombstone** of an id that was cycled away (see `save.lua`).
//!
//! Every write of a session's data is one run of a script ([`execute`]): it checks the session still
//! exists (and was not cycled away) and writes in one atomic step, so no interleaving with another
//! request's write, `RENAME` or `DEL` can land a change where it was not meant to go. The common
//! write, user fields of an existing session and nothing else, runs a small script of its own
//! (`write.lua`: two commands, three arguments); everything else runs the save script.
//!
//! The key's TTL is the idle timeout, capped so that it never runs past the absolute deadline, nor,
//! for an owned session, past the time its owner's index lists it until: the index always knows
//! every live session of its owner, and it never outlives them by more than one idle timeout
//! (entries are pushed forward by `7/4` of the idle timeout when less than `5/4` of it is left, off
//! the request's path — see `owners::bump_index`). The TTL is pushed back (and `touched` recorded)
//! by the save script only: at a full save, and off the request's path when a read or a field
//! write finds a tenth of the idle timeout passed since the last push ([`Timing::refresh_due`]).

use std::sync::LazyLock;

use redis::{Cmd, Pipeline, Script, Value};

use super::cycle::cycle_across_slots;
use super::fields::Fields;
pub(crate) use super::owners::{add_owner_index, bump_index, destroy_owner};
pub(crate) use super::plan::{Delta, IfGone, SaveMode, SavePlan};
use super::timing::{ms, now_ms, Expiry, Timing};
use crate::client::{Effect, RedisClient};
use crate::error::{Error, Result};
use crate::keys::SessionId;

/// Applies one request's changes to a session, all or nothing.
///
/// A script rather than MULTI/EXEC because the write is conditional: a session destroyed or expired
/// meanwhile must not be resurrected, an id must not be taken twice, and nothing may be written when
/// a check (size, integer) fails. All checks run before the first write.
static SAVE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("save.lua")));

/// The common write: user fields of an existing session, nothing else (see `write.lua`).
static WRITE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("write.lua")));

/// A logout: deletes a session unless its id was cycled away (rare enough for `EVAL` with the source).
const DESTROY_SOURCE: &str = include_str!("destroy.lua");

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

/// What the save script answered.
#[derive(Debug)]
pub(crate) enum SaveOutcome {
    /// Applied; the value of the incremented field if there was one; the session's owner.
    Applied {
        incr: i64,
        owner: Option<String>,
        /// The timing record the save wrote (or found, when it wrote fields only).
        timing: Timing,
        /// The TTL is due to be pushed back (off the request's path: [`touch`]); only after a
        /// write that left it as it was.
        refresh_due: bool,
    },
    /// The session does not exist any more (destroyed or expired).
    Gone,
    /// The id was cycled away (a tombstone, or a cycle under way on a cluster).
    Cycled,
    /// The new id is taken (practically impossible with 122 random bits); pick another.
    IdTaken,
    /// Over the session size limit; nothing written.
    TooLarge { size: usize },
    /// The incremented field holds something that is not an integer; nothing written.
    NotAnInteger,
}

/// What a read found under an id.
#[derive(Debug)]
pub(crate) enum Found {
    Session(Loaded),
    /// No session: never was, expired, destroyed, or not a session herd wrote.
    Missing,
    /// The id was cycled away (a tombstone, or a cycle under way on a cluster).
    Cycled,
}

/// Reads a session: all its fields in one command (`HGETALL`). [`Found::Missing`] when it does not
/// exist, is past its absolute deadline or its index coverage, or is not a session herd wrote.
///
/// No `PTTL`: the timing record says when the TTL was last pushed back, which is all a read needs
/// to decide whether the idle timeout should be refreshed. One command instead of a pipeline of two
/// is measurably cheaper on the request's path (fewer replies to parse, no pipeline bookkeeping).
pub(crate) async fn load(client: &RedisClient, id: &SessionId, expiry: Expiry) -> Result<Found> {
    super::pause::at(super::pause::Step::Load).await;
    let key = client.keys().session(id);
    // Pairs, not a map, and names as bytes: they are sorted into `Loaded` right below; a name that
    // is not UTF-8 (herd never writes one) is skipped rather than making the session unreadable.
    let raw: Vec<(Vec<u8>, Vec<u8>)> = client
        .run(Effect::ReadOnly, |mut c| async move {
            redis::cmd("HGETALL").arg(&key).query_async(&mut c).await
        })
        .await?;
    if raw.is_empty() {
        return Ok(Found::Missing);
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
                // Cycled away, or being cycled on a cluster: the old id is no longer valid.
                "m" | "t" => return Ok(Found::Cycled),
                _ => {}
            }
        } else {
            loaded.fields.push_unique(field, value);
        }
    }
    let Some(timing) = timing else {
        // Not a session herd wrote.
        return Ok(Found::Missing);
    };
    let now = now_ms();
    let Some(ttl) = timing.ttl(now, expiry) else {
        // Past the absolute deadline or the index coverage (its TTL is capped there, so Redis is
        // about to drop it).
        return Ok(Found::Missing);
    };
    loaded.needs_refresh = timing.refresh_due(now, ttl, expiry);
    loaded.index_due = loaded.owner.is_some() && timing.index_due(now, expiry);
    loaded.timing = timing;
    Ok(Found::Session(loaded))
}

/// Pushes a session's idle timeout back (and records when): the save script with nothing to change,
/// so a session that ended meanwhile is not resurrected. Runs off the request's path.
pub(crate) async fn touch(client: &RedisClient, id: &SessionId, expiry: Expiry) -> Result<()> {
    save_nothing(client, id, expiry, None).await
}

/// The save script on an existing session with no change: its TTL pushed back (and `touched`
/// recorded), its index coverage moved to `index` if given.
pub(crate) async fn save_nothing(
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

/// What Redis holds after [`execute`] stored a request's changes. It replaces the request's view
/// of the session.
#[derive(Debug)]
pub(crate) struct Stored {
    /// The session's id now.
    pub(crate) id: SessionId,
    /// A fresh session was created (all its fields are the plan's).
    pub(crate) created: bool,
    /// The id is new to the browser (created or cycled): the response sets the cookie.
    pub(crate) new_id: bool,
    /// The timing record the save wrote.
    pub(crate) timing: Timing,
    pub(crate) owner: Option<String>,
    /// The incremented field's new value (0 without an increment).
    pub(crate) incr: i64,
    /// The TTL is due to be pushed back (the save left it as it was).
    pub(crate) refresh_due: bool,
}

/// How [`execute`] ended.
#[derive(Debug)]
pub(crate) enum Executed {
    Stored(Stored),
    /// A blind write of nothing but removals into a session that ended: nothing to keep.
    Dropped,
    /// The session the request read ended meanwhile (destroyed or expired): nothing was written.
    Gone,
    /// The id was cycled away (another request logged in): nothing was written.
    Cycled,
    /// Over the size limit (checked in Redis): nothing was written.
    TooLarge {
        size: usize,
    },
    /// The incremented field is not an integer: nothing was written.
    NotAnInteger,
}

/// Runs a [`SavePlan`] for the session `id` (`None`: none yet): one round trip (the save script,
/// with the owner index update in the same pipeline on one server, alongside on a cluster), and
/// reports what Redis now holds. More only where unavoidable: a cycle on a cluster (three, see
/// `cycle::cycle_across_slots`); a blind cycle of an owned session on one server (the owner is learnt
/// from the save, the new id is listed in a second round trip); a blind write into a session that
/// ended (a fresh session: the save again); an id collision (never in practice).
///
/// # Errors
/// [`Error::Unavailable`] / [`Error::OutcomeUnknown`] when Redis does not answer.
pub(crate) async fn execute(
    client: &RedisClient,
    plan: &SavePlan,
    id: Option<SessionId>,
    expiry: Expiry,
) -> Result<Executed> {
    let mut mode = plan.mode;
    let index = plan.index.as_ref().map(|i| IndexUpdate {
        owner: &i.owner,
        until: i.until,
    });
    let mut attempts = 0;
    loop {
        attempts += 1;
        // Fresh ids only where needed: each costs a call to the OS random generator.
        let (key_id, new_id) = match (mode, id) {
            (SaveMode::New, _) | (_, None) => (SessionId::generate(), None),
            (SaveMode::Cycle, Some(id)) => (id, Some(SessionId::generate())),
            (SaveMode::Existing, Some(id)) => (id, None),
        };
        super::pause::at(super::pause::Step::Save).await;
        let outcome = save(
            client,
            Save {
                mode,
                id: &key_id,
                new_id: new_id.as_ref(),
                delta: &plan.delta,
                expiry,
                max_bytes: plan.max_bytes,
                index,
            },
        )
        .await?;
        super::pause::at(super::pause::Step::Saved).await;
        return Ok(match outcome {
            SaveOutcome::Gone if plan.if_gone == IfGone::StartFresh && attempts < 3 => {
                if !plan.delta.has_content() {
                    return Ok(Executed::Dropped);
                }
                mode = SaveMode::New;
                continue;
            }
            SaveOutcome::IdTaken if attempts < 3 => continue,
            SaveOutcome::IdTaken => {
                return Err(Error::Unavailable {
                    reason: "could not allocate a session id".into(),
                    source: None,
                })
            }
            SaveOutcome::Applied {
                incr,
                owner,
                timing,
                refresh_due,
            } => {
                let final_id = new_id.unwrap_or(key_id);
                if let (SaveMode::Cycle, None, Some(owner), Some(indexed), false) =
                    (mode, index, &owner, timing.indexed, client.is_cluster())
                {
                    // A blind cycle of an owned session on one server: the script moved the data
                    // (owner and index coverage included) to the new id; list the new id too. If
                    // that fails, the new session must not live unlisted: it is removed, and the
                    // error reported.
                    let mut pipe = redis::pipe();
                    add_owner_index(&mut pipe, client, owner, &final_id, now_ms(), indexed);
                    let listed = client
                        .run(Effect::MayWrite, |mut c| async move {
                            pipe.query_async::<()>(&mut c).await
                        })
                        .await;
                    if let Err(e) = listed {
                        let _ = destroy_key(client, &final_id).await;
                        return Err(e);
                    }
                }
                Executed::Stored(Stored {
                    id: final_id,
                    created: mode == SaveMode::New,
                    new_id: mode != SaveMode::Existing,
                    timing,
                    owner,
                    incr,
                    refresh_due,
                })
            }
            SaveOutcome::Gone => Executed::Gone,
            SaveOutcome::Cycled => Executed::Cycled,
            SaveOutcome::TooLarge { size } => Executed::TooLarge { size },
            SaveOutcome::NotAnInteger => Executed::NotAnInteger,
        });
    }
}

/// Applies a save in one round trip: the save script, plus the owner index update when the session
/// (re)gets an id under an owner. On a cluster the index update (another slot) is sent alongside,
/// not in the same pipeline, and cycling an id takes three round trips (`cycle::cycle_across_slots`).
pub(crate) async fn save(client: &RedisClient, save: Save<'_>) -> Result<SaveOutcome> {
    if save.mode == SaveMode::Cycle && client.is_cluster() {
        return cycle_across_slots(client, save).await;
    }
    if save.fields_only() {
        return write_fields(client, save).await;
    }
    save_in_place(client, save).await
}

impl Save<'_> {
    /// User fields of an existing session and nothing else: either sets and removals or one
    /// increment (their relative order is the save script's business), no clear, owner, idle
    /// timeout, index update or size check in Redis.
    fn fields_only(&self) -> bool {
        let delta = self.delta;
        self.mode == SaveMode::Existing
            && self.new_id.is_none()
            && self.index.is_none()
            && self.max_bytes == 0
            && !delta.clear
            && delta.owner.is_none()
            && delta.idle_override_ms.is_none()
            && delta.incr.is_some() == (delta.set.is_empty() && delta.remove.is_empty())
    }
}

/// The common write (`write.lua`): checks the session exists and was not cycled away, writes its
/// fields, and answers with the stored timing record, which decides here whether the session is
/// past its deadline (gone: Redis drops the key at that time, no read sees it again) and whether
/// its TTL is due to be pushed back. One `EVALSHA`, a reply of one string.
async fn write_fields(client: &RedisClient, save: Save<'_>) -> Result<SaveOutcome> {
    let delta = save.delta;
    let mut cmd = evalsha(&WRITE);
    cmd.arg(1).arg(client.keys().session(save.id));
    match &delta.incr {
        Some((field, by)) => cmd.arg(field).arg(*by),
        None => cmd.arg("").arg(0),
    };
    cmd.arg(delta.set.len());
    for (field, value) in &delta.set {
        cmd.arg(field).arg(value.as_slice());
    }
    for field in &delta.remove {
        cmd.arg(field);
    }
    let reply = run_with_script(client, &Query::Cmd(&cmd)).await?;
    decode(reply, save.expiry)
}

/// The reply of either script: one string `record n [owner]` when applied, `{status, n, _, _}`
/// otherwise (see `save.lua`). The record decides the rest: a session past its deadline or index
/// coverage is gone (only `write.lua`, which does not parse the record, writes into one: its key
/// expires then, and no read sees it again), and the TTL is due to be pushed back when a write left
/// it as it was for a tenth of the idle timeout (never right after the save script, which records
/// `touched`).
fn decode(reply: Value, expiry: Expiry) -> Result<SaveOutcome> {
    let unexpected = |what: &'static str| {
        Error::Redis(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            what,
        )))
    };
    if let Value::BulkString(applied) = reply {
        let mut parts = applied.splitn(3, |b| *b == b' ');
        let timing = parts.next().and_then(Timing::parse);
        let incr = parts
            .next()
            .and_then(|n| std::str::from_utf8(n).ok()?.parse::<i64>().ok());
        let (Some(timing), Some(incr)) = (timing, incr) else {
            return Err(unexpected(
                "the session save answered with a malformed record",
            ));
        };
        let owner = parts
            .next()
            .map(|o| String::from_utf8_lossy(o).into_owned());
        let now = now_ms();
        return Ok(match timing.ttl(now, expiry) {
            None => SaveOutcome::Gone,
            Some(ttl) => SaveOutcome::Applied {
                incr,
                owner,
                refresh_due: timing.refresh_due(now, ttl, expiry),
                timing,
            },
        });
    }
    let (status, n, ..): (i64, i64, Value, Value) =
        redis::from_redis_value(reply).map_err(|e| Error::Redis(e.into()))?;
    Ok(match status {
        0 => SaveOutcome::Gone,
        2 => SaveOutcome::IdTaken,
        3 => SaveOutcome::TooLarge {
            size: n.max(0) as usize,
        },
        4 => SaveOutcome::NotAnInteger,
        5 => SaveOutcome::Cycled,
        status => {
            return Err(Error::Redis(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "unknown status from the session save",
                status.to_string(),
            ))))
        }
    })
}

/// The save script on one key (plus the new key on a single server when cycling).
pub(crate) async fn save_in_place(client: &RedisClient, save: Save<'_>) -> Result<SaveOutcome> {
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
        None => run_with_script(client, &Query::Cmd(&cmd)).await?,
        Some(index) if client.is_cluster() && save.mode == SaveMode::Existing => {
            // An existing session (a new owner, or its index pushed forward): the index (another
            // slot) first, then the save, one after the other. A failed index update then leaves
            // the session as it was (never deleted for it), and the index never lists less than
            // the session's record says. Two round trips, only for this rare write.
            let mut pipe = redis::pipe();
            pipe.atomic();
            add_owner_index(&mut pipe, client, index.owner, target_id, now, index.until);
            client
                .run(Effect::MayWrite, |mut c| async move {
                    pipe.query_async::<()>(&mut c).await
                })
                .await?;
            run_with_script(client, &Query::Cmd(&cmd)).await?
        }
        Some(index) if client.is_cluster() => {
            // A new id (created or cycled): the index lives in another slot, sent alongside, at the
            // same time (one round trip of latency), so their order is not known. If the index
            // update fails, the new session the save wrote must not live unlisted: it is removed
            // again and the save reported failed. Atomic, so that a refusal during resharding
            // (MOVED, ASK) can be re-sent safely.
            let mut pipe = redis::pipe();
            pipe.atomic();
            add_owner_index(&mut pipe, client, index.owner, target_id, now, index.until);
            let query = Query::Cmd(&cmd);
            let (reply, indexed) = tokio::join!(
                run_with_script(client, &query),
                client.run_alongside(Effect::MayWrite, |mut c| async move {
                    pipe.query_async::<()>(&mut c).await
                })
            );
            if let Err(e) = indexed {
                if reply.is_ok() {
                    if let Err(e) = destroy_key(client, target_id).await {
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
                redis::from_redis_value(run_with_script(client, &Query::Pipe(&pipe)).await?)
                    .map_err(|e| Error::Redis(e.into()))?;
            replies.pop().ok_or_else(|| {
                Error::Redis(redis::RedisError::from((
                    redis::ErrorKind::UnexpectedReturnType,
                    "empty reply to the session save",
                )))
            })?
        }
    };
    decode(reply, save.expiry)
}

/// What a logout found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Destroyed {
    /// Deleted, or there was nothing to delete.
    Done,
    /// The id was cycled away: its tombstone stays, nothing was deleted.
    Cycled,
}

/// Deletes a session (logout) unless its id was cycled away: one round trip. With its owner known,
/// its index entry goes too (in the same pipeline on one server; alongside on a cluster, where the
/// index is in another slot).
pub(crate) async fn destroy(
    client: &RedisClient,
    id: &SessionId,
    owner: Option<&str>,
) -> Result<Destroyed> {
    super::pause::at(super::pause::Step::Destroy).await;
    let del = redis::cmd("EVAL")
        .arg(DESTROY_SOURCE)
        .arg(1)
        .arg(client.keys().session(id))
        .to_owned();
    let reply = match owner {
        None => {
            client
                .run(Effect::MayWrite, |mut c| async move {
                    del.query_async::<i64>(&mut c).await
                })
                .await?
        }
        Some(owner) => {
            let zrem = redis::cmd("ZREM")
                .arg(client.keys().owner_index(owner))
                .arg(id.as_str())
                .to_owned();
            let replies = client.run_each(Effect::MayWrite, vec![del, zrem]).await?;
            match replies.first() {
                Some(Value::Int(n)) => *n,
                _ => 0,
            }
        }
    };
    Ok(if reply == 2 {
        Destroyed::Cycled
    } else {
        Destroyed::Done
    })
}

/// Deletes a session's key, whatever it holds.
pub(crate) async fn destroy_key(client: &RedisClient, id: &SessionId) -> Result<()> {
    let del = redis::cmd("DEL").arg(client.keys().session(id)).to_owned();
    client
        .run(Effect::MayWrite, |mut c| async move {
            del.query_async::<i64>(&mut c).await
        })
        .await?;
    Ok(())
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

/// Runs a command or pipeline that contains an `EVALSHA` of a write script; if Redis does not know
/// it yet (first use, or after a restart), loads both write scripts (a Redis that lost one lost
/// both; one round trip of latency) and runs it again. Safe to repeat: a `NOSCRIPT` reply means the
/// script did not run, and the other commands pipelined with it are idempotent index updates.
async fn run_with_script(client: &RedisClient, query: &Query<'_>) -> Result<Value> {
    async fn once(client: &RedisClient, query: &Query<'_>) -> Result<Value> {
        client
            .run(Effect::MayWrite, |mut c| async move {
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
            let (save, write) = tokio::join!(
                client.run(Effect::ReadOnly, |mut c| async move {
                    SAVE.prepare_invoke().load_async(&mut c).await
                }),
                client.run_alongside(Effect::ReadOnly, |mut c| async move {
                    WRITE.prepare_invoke().load_async(&mut c).await
                })
            );
            save?;
            write?;
            once(client, query).await
        }
        other => other,
    }
}
