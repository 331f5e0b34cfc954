//! What a session does in Redis: one place for every command and script the session layer sends.
//!
//! A session is a hash `{prefix}:s:{id}` (see [`crate::keys`]): one field per session key holding the
//! value's JSON, plus meta fields `$c` (created at, unix ms — start of the absolute timeout), `$o` (the
//! owner) and `$i` (a per-session idle timeout, ms). The key's TTL is the idle timeout, capped so it
//! never runs past the absolute deadline.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::{Cmd, Pipeline, Script, Value};

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

/// A session as read from Redis.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub(crate) fields: HashMap<String, Vec<u8>>,
    pub(crate) created_ms: u64,
    pub(crate) owner: Option<String>,
    pub(crate) idle_override_ms: Option<u64>,
    /// The key's TTL is old enough that it should be pushed back (idle timeout refresh).
    pub(crate) needs_refresh: Option<u64>,
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
    /// Applied; the value of the incremented field if there was one; the session's owner.
    Applied { incr: i64, owner: Option<String> },
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

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

/// Reads a session: its fields and its TTL in one round trip (`HGETALL` + `PTTL`, pipelined).
/// `Ok(None)` when it does not exist or has passed its absolute deadline.
pub(crate) async fn load(
    client: &RedisClient,
    id: &SessionId,
    expiry: Expiry,
) -> Result<Option<Loaded>> {
    let key = client.keys().session(id);
    // Pairs, not a map: they are sorted into `Loaded` right below (one map built, not two).
    let (raw, pttl): (Vec<(String, Vec<u8>)>, i64) = client
        .run(false, |mut c| async move {
            redis::pipe()
                .cmd("HGETALL")
                .arg(&key)
                .cmd("PTTL")
                .arg(&key)
                .query_async(&mut c)
                .await
        })
        .await?;
    if raw.is_empty() || raw.iter().any(|(k, _)| k == "$m") {
        // Absent, or being cycled to a new id on a cluster (the old id is no longer valid).
        return Ok(None);
    }
    let mut loaded = Loaded {
        fields: HashMap::with_capacity(raw.len()),
        ..Loaded::default()
    };
    for (field, value) in raw {
        if let Some(meta) = field.strip_prefix('$') {
            let text = String::from_utf8_lossy(&value);
            match meta {
                "c" => loaded.created_ms = text.parse().unwrap_or(0),
                "o" => loaded.owner = Some(text.into_owned()),
                "i" => loaded.idle_override_ms = text.parse().ok(),
                _ => {}
            }
        } else {
            loaded.fields.insert(field, value);
        }
    }
    let now = now_ms();
    let deadline = loaded.created_ms.saturating_add(ms(expiry.absolute));
    if loaded.created_ms == 0 || now >= deadline {
        // Past the absolute deadline (its TTL is capped there, so Redis is about to drop it), or not
        // a session herd wrote: treat as absent.
        return Ok(None);
    }
    let idle = loaded.idle_override_ms.unwrap_or(ms(expiry.idle));
    let target = idle.min(deadline - now);
    // Push the TTL back once a tenth of the idle timeout has passed since it was last set: sessions
    // then expire between 90% and 100% of the idle timeout after the last request, and a busy
    // visitor costs at most one PEXPIRE per tenth of the idle timeout, not one per request.
    if pttl >= 0 && (pttl as u64) + idle / 10 < target {
        loaded.needs_refresh = Some(target);
    }
    Ok(Some(loaded))
}

/// Pushes a session's TTL back without touching its data (`PEXPIRE ... XX`-like: only if it exists).
pub(crate) async fn refresh(client: &RedisClient, id: &SessionId, ttl_ms: u64) -> Result<()> {
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

/// `$c`, `$i`, `$m` of a session hash.
type Meta = (Option<u64>, Option<u64>, Option<String>);

/// What [`incr_existing`] found.
#[derive(Debug)]
pub(crate) enum IncrOutcome {
    Applied(i64),
    /// The session does not exist (any more) or is being moved to a new id: nothing was kept.
    Gone,
    NotAnInteger,
}

/// `incr` on a session believed to exist, with nothing else to write, without a script:
/// `HINCRBY`, `PEXPIRE` and `HMGET` of the meta fields, pipelined (one round trip, one key, so one
/// cluster slot). Cheaper for Redis than the save script, and as safe:
///
/// * a session destroyed or expired meanwhile is not resurrected: `HINCRBY` on a missing key makes
///   a hash without `$c`, which no load or save accepts as a session; seeing `$c` missing, this
///   deletes it again (a second round trip, only in that case) and answers `Gone`;
/// * `HINCRBY` refuses a non-integer and writes nothing;
/// * the TTL: exact when the session was loaded (`known`: created-at and idle override), else the
///   layer's idle timeout, corrected in a second round trip only when the session's own timeout
///   differs or its absolute deadline is closer.
pub(crate) async fn incr_existing(
    client: &RedisClient,
    id: &SessionId,
    field: &str,
    by: i64,
    expiry: Expiry,
    known: Option<(u64, Option<u64>)>,
) -> Result<IncrOutcome> {
    let now = now_ms();
    let absolute = ms(expiry.absolute);
    let exact = |created: u64, idle_override: Option<u64>| -> Option<u64> {
        let idle = idle_override.unwrap_or(ms(expiry.idle));
        let left = created.saturating_add(absolute).saturating_sub(now);
        (left > 0).then_some(idle.min(left))
    };
    let ttl = match known {
        Some((created, idle_override)) => match exact(created, idle_override) {
            Some(ttl) => ttl,
            None => return Ok(IncrOutcome::Gone),
        },
        None => ms(expiry.idle),
    };
    let key = client.keys().session(id);
    let reply: redis::RedisResult<(i64, i64, Meta)> = {
        let key = key.clone();
        client
            .run(true, |mut c| async move {
                let result = redis::pipe()
                    .cmd("HINCRBY")
                    .arg(&key)
                    .arg(field)
                    .arg(by)
                    .cmd("PEXPIRE")
                    .arg(&key)
                    .arg(ttl)
                    .cmd("HMGET")
                    .arg(&key)
                    .arg("$c")
                    .arg("$i")
                    .arg("$m")
                    .query_async(&mut c)
                    .await;
                // A refused HINCRBY is an answer, not a failure of the round trip.
                match result {
                    Err(e) if e.to_string().contains("not an integer") => Ok(Err(e)),
                    other => other.map(Ok),
                }
            })
            .await?
    };
    let (n, _, (created, idle_override, moving)) = match reply {
        Ok(r) => r,
        Err(_) => return Ok(IncrOutcome::NotAnInteger),
    };
    if moving.is_some() {
        // Being moved to a new id (cluster `cycle_id`): the mover deletes this key.
        return Ok(IncrOutcome::Gone);
    }
    let Some(created) = created else {
        // No session here: the increment made a stray hash. Remove it (best effort: it has a TTL).
        if let Err(e) = destroy(client, id).await {
            tracing::debug!(error = %e, "herd: removing a stray counter hash failed");
        }
        return Ok(IncrOutcome::Gone);
    };
    if known.is_none() {
        match exact(created, idle_override) {
            None => {
                destroy(client, id).await?;
                return Ok(IncrOutcome::Gone);
            }
            Some(right) if right != ttl => {
                refresh(client, id, right).await?;
            }
            Some(_) => {}
        }
    }
    Ok(IncrOutcome::Applied(n))
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
    /// The owner, when known, to index the session under (after create or cycle).
    pub(crate) index_owner: Option<&'a str>,
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
    let taken: Option<HashMap<String, Vec<u8>>> = {
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
    for (field, value) in old {
        match field.strip_prefix('$') {
            Some("o") if merged.owner.is_none() => {
                merged.owner = Some(String::from_utf8_lossy(&value).into_owned());
            }
            Some("i") if merged.idle_override_ms.is_none() => {
                merged.idle_override_ms = String::from_utf8_lossy(&value).parse().ok();
            }
            Some(_) => {}
            None if delta.clear
                || delta.remove.contains(&field)
                || delta.set.iter().any(|(f, _)| *f == field) => {}
            None => merged.set.push((field, value)),
        }
    }
    merged.set.extend(delta.set.iter().cloned());

    let outcome = save_in_place(
        client,
        Save {
            mode: SaveMode::New,
            id: new_id,
            new_id: None,
            delta: &merged,
            expiry: save.expiry,
            max_bytes: save.max_bytes,
            index_owner: save.index_owner,
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
    cmd.arg(delta.set.len());
    for (field, value) in &delta.set {
        cmd.arg(field).arg(value.as_slice());
    }
    for field in &delta.remove {
        cmd.arg(field);
    }

    let reply = match save.index_owner {
        // One command on its own: cheaper than a pipeline, and Redis errors keep their codes.
        None => run_with_script(client, &Query::Cmd(&cmd), &SAVE).await?,
        Some(owner) if client.is_cluster() => {
            // The index lives in another slot: send it alongside, not in the same pipeline.
            let mut pipe = redis::pipe();
            let deadline = now + ms(save.expiry.absolute);
            add_owner_index(&mut pipe, client, owner, target_id, now, deadline);
            let query = Query::Cmd(&cmd);
            let (reply, indexed) = tokio::join!(
                run_with_script(client, &query, &SAVE),
                client.run_alongside(
                    true,
                    |mut c| async move { pipe.query_async::<()>(&mut c).await }
                )
            );
            let reply = reply?;
            indexed?;
            reply
        }
        Some(owner) => {
            let mut pipe = redis::pipe();
            pipe.add_command(cmd);
            let deadline = now + ms(save.expiry.absolute);
            add_owner_index(&mut pipe, client, owner, target_id, now, deadline);
            let mut replies: Vec<Value> =
                redis::from_redis_value(run_with_script(client, &Query::Pipe(&pipe), &SAVE).await?)
                    .map_err(|e| Error::Redis(e.into()))?;
            if replies.is_empty() {
                return Err(Error::Redis(redis::RedisError::from((
                    redis::ErrorKind::UnexpectedReturnType,
                    "empty reply to the session save",
                ))));
            }
            replies.swap_remove(0)
        }
    };
    let reply: (i64, i64, Option<String>) =
        redis::from_redis_value(reply).map_err(|e| Error::Redis(e.into()))?;
    Ok(match reply {
        (1, incr, owner) => SaveOutcome::Applied { incr, owner },
        (0, _, _) => SaveOutcome::Gone,
        (2, _, _) => SaveOutcome::IdTaken,
        (3, size, _) => SaveOutcome::TooLarge {
            size: size.max(0) as usize,
        },
        _ => SaveOutcome::NotAnInteger,
    })
}

/// Adds the commands that index `id` under `owner` (to be pipelined after a save): the member with its
/// absolute deadline as score, stale members pruned, and the index's TTL pushed to the latest deadline
/// so it never outlives the sessions it lists.
pub(crate) fn add_owner_index(
    pipe: &mut Pipeline,
    client: &RedisClient,
    owner: &str,
    id: &SessionId,
    now: u64,
    deadline: u64,
) {
    let index = client.keys().owner_index(owner);
    pipe.cmd("ZADD")
        .arg(&index)
        .arg(deadline)
        .arg(id.as_str())
        .ignore()
        .cmd("ZREMRANGEBYSCORE")
        .arg(&index)
        .arg("-inf")
        .arg(now)
        .ignore()
        .cmd("PEXPIREAT")
        .arg(&index)
        .arg(deadline)
        .arg("NX")
        .ignore()
        .cmd("PEXPIREAT")
        .arg(&index)
        .arg(deadline)
        .arg("GT")
        .ignore();
}

/// Deletes a session (logout): one round trip.
pub(crate) async fn destroy(client: &RedisClient, id: &SessionId) -> Result<()> {
    let key = client.keys().session(id);
    client
        .run(true, |mut c| async move {
            redis::cmd("DEL").arg(&key).query_async::<i64>(&mut c).await
        })
        .await?;
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
    Ok(replies[..ids.len()]
        .iter()
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
