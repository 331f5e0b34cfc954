//! Owners ("log out everywhere"): the index of an owner's sessions, kept so that it always lists
//! every live session of its owner (see the [module docs](super)).

use redis::{Cmd, Pipeline, Value};

use super::store::{save_nothing, IndexUpdate};
use super::timing::{index_target, now_ms, Expiry};
use crate::client::{Effect, RedisClient};
use crate::error::Result;
use crate::keys::SessionId;

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
                .run(Effect::ReadOnly, |mut c| async move {
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
            .run(Effect::ReadOnly, |mut c| async move {
                redis::cmd("ZRANGE")
                    .arg(&index)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut c)
                    .await
            })
            .await?
    };
    let mut ids: Vec<SessionId> = ids.iter().filter_map(|s| SessionId::parse(s)).collect();
    let mut deleted = 0;
    let mut done: Vec<SessionId> = Vec::new();
    // On one server the index is read again after the deletes, in the same pipeline: a login that
    // cycled a listed session after the first read has listed its new id before the rename (same
    // pipeline, index first), so the new id shows up here and goes in another pass. (On a cluster
    // the login itself notices that its old key was deleted: `cycle::cycle_across_slots`.) A few
    // passes at most: each needs a login racing this very call.
    for _ in 0..4 {
        if ids.is_empty() {
            break;
        }
        super::pause::at(super::pause::Step::DestroyOwner).await;
        // One DEL per key: keys of different sessions live in different cluster slots (run_each
        // sends them as one pipeline on a single server, one command per slot at once on a cluster).
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
        let reread = !client.is_cluster();
        if reread {
            cmds.push(redis::cmd("ZRANGE").arg(&index).arg(0).arg(-1).to_owned());
        }
        let replies = client.run_each(Effect::MayWrite, cmds).await?;
        deleted += replies
            .iter()
            .take(ids.len())
            .filter(|v| matches!(v, Value::Int(n) if *n > 0))
            .count();
        done.append(&mut ids);
        if let (true, Some(listed)) = (reread, replies.last()) {
            let listed: Vec<String> = redis::from_redis_value(listed.clone())
                .map_err(|e| crate::error::Error::Redis(e.into()))?;
            ids = listed
                .iter()
                .filter_map(|s| SessionId::parse(s))
                .filter(|id| !done.contains(id))
                .collect();
        }
    }
    Ok(deleted)
}
