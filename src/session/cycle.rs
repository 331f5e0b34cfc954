//! Cycling a session id on a Redis Cluster, where the old and new keys live in different slots.

use redis::Value;

use super::plan::{Delta, SaveMode};
use super::store::{destroy_key, save_in_place, IndexUpdate, Save, SaveOutcome};
use super::timing::{index_target, ms, now_ms, Timing};
use crate::client::{Effect, RedisClient};
use crate::error::{Error, Result};

/// First step of a cycle on a Redis Cluster: marks the old session as moving and reads it (see
/// [`cycle_across_slots`]).
const TAKE_SOURCE: &str = include_str!("take.lua");

/// Last step of a cycle on a Redis Cluster: the old key becomes a tombstone (see
/// [`cycle_across_slots`]).
const SETTLE_SOURCE: &str = include_str!("settle.lua");

/// A refused cycle on a Redis Cluster: the old session, still marked as moving to `ARGV[1]`, is
/// unmarked and gets back the TTL it had before the mark capped it (`$p`, see `take.lua`).
const UNMARK_SOURCE: &str = r"
if redis.call('HGET', KEYS[1], '$m') ~= ARGV[1] then return 0 end
local ttl = redis.call('HGET', KEYS[1], '$p')
redis.call('HDEL', KEYS[1], '$m', '$p')
if ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
";

/// Cycles a session id on a Redis Cluster, where the old and new keys live in different slots, so
/// neither `RENAME` nor one script may touch both. Three round trips, each on one slot:
///
/// 1. on the old key, a script checks the session exists, **marks** it as moving
///    (field `$m` = the new id) and reads it (`take.lua`). From then on the old id is cycled away:
///    loads and saves that meet the mark answer 409 without a cookie, as at a tombstone;
/// 2. the session's data (the old fields with this request's changes applied) is written under the
///    new id by the usual save script in `new` mode (all checks before any write), with the owner
///    index update sent alongside;
/// 3. the old key becomes a tombstone (`settle.lua`: only `$t`, for one minute), as after a cycle
///    on one server.
///
/// What a crash or a lost reply leaves: after 1, the old session is marked and unusable (a request
/// carrying its id gets 409, as after a login) and the visitor is logged out — the marked key
/// expires within a minute, like a tombstone (`take.lua` caps its TTL); after 2, the new session is
/// complete and the marked old key also just expires. Never two usable sessions, never the old id
/// still valid after a login (no fixation). If step 2 refuses (too large, not an integer, id taken)
/// nothing was written under the new id, and the mark is removed again (with the TTL it had): the
/// old session is intact.
pub(crate) async fn cycle_across_slots(
    client: &RedisClient,
    save: Save<'_>,
) -> Result<SaveOutcome> {
    let (Some(new_id), delta) = (save.new_id, save.delta) else {
        return save_in_place(client, save).await;
    };
    let old_key = client.keys().session(save.id);
    // EVAL with the source, not EVALSHA: logins are rare, and this way the first one on each node
    // costs no NOSCRIPT round trip. A retry with the same new id is harmless (see take.lua).
    let taken: Value = {
        let take = redis::cmd("EVAL")
            .arg(TAKE_SOURCE)
            .arg(1)
            .arg(&old_key)
            .arg(new_id.as_str())
            .to_owned();
        client
            .run(Effect::MayWrite, |mut c| async move {
                take.query_async(&mut c).await
            })
            .await?
    };
    let old: Vec<(Vec<u8>, Vec<u8>)> = match taken {
        Value::Nil => return Ok(SaveOutcome::Gone),
        Value::Int(_) => return Ok(SaveOutcome::Cycled),
        taken => redis::from_redis_value(taken).map_err(|e| Error::Redis(e.into()))?,
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
    if !matches!(outcome, SaveOutcome::Applied { .. }) {
        // Nothing was written under the new id: the old session stays valid.
        let unmark = redis::cmd("EVAL")
            .arg(UNMARK_SOURCE)
            .arg(1)
            .arg(&old_key)
            .arg(new_id.as_str())
            .to_owned();
        if let Err(e) = client
            .run(Effect::MayWrite, |mut c| async move {
                unmark.query_async::<i64>(&mut c).await
            })
            .await
        {
            // The old key stays marked (unusable) until it expires.
            tracing::debug!(error = %e, "herd: could not unmark a session whose cycle was refused");
        }
        return Ok(outcome);
    }
    let settle = redis::cmd("EVAL")
        .arg(SETTLE_SOURCE)
        .arg(1)
        .arg(&old_key)
        .arg(new_id.as_str())
        .to_owned();
    match client
        .run(Effect::MayWrite, |mut c| async move {
            settle.query_async::<i64>(&mut c).await
        })
        .await
    {
        Ok(1) => {}
        Ok(_) => {
            // The old session was deleted while it moved ("log out everywhere" read the index
            // before the new id was listed): the new one must not outlive that logout.
            destroy_key(client, new_id).await?;
            return Ok(SaveOutcome::Gone);
        }
        // The old key stays marked (unusable) until it expires; the new session is what counts.
        Err(e) => {
            tracing::debug!(error = %e, "herd: could not settle the old key of a cycled session")
        }
    }
    Ok(outcome)
}
