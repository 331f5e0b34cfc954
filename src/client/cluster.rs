//! Redis Cluster: which errors herd re-sends, and how (see the [client module docs](super)).
//!
//! redis-rs runs with `retries(0)`, so every error reaches this module. A command or pipeline is
//! sent again only when the server refused it without running it:
//!
//! * `MOVED`: the slot has a new owner; redis-rs refreshes its slot map on seeing it, the retry goes
//!   to the new owner.
//! * `ASK`: the slot is being migrated and this key is already on the target; a single command is
//!   re-sent there after `ASKING` (a pipeline waits until the migration ends and goes by slot again).
//! * `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`, `LOADING`: wait a little and send again.
//!
//! I/O errors, dropped connections and timeouts are never re-sent here: for a write they mean the
//! outcome is unknown ([`crate::Error::OutcomeUnknown`]). The caller's timeout bounds the whole loop.
//!
//! **Pipelines** need more care, because a refusal of one command says nothing about the others: a
//! plain pipeline is not atomic, and Redis runs its commands one by one (a slot can finish migrating
//! between two of them, so the first ran and the second is answered `ASK` or `MOVED`). redis-rs
//! reports the whole pipeline as that one error. So a pipeline is re-sent only when re-sending
//! cannot apply a write twice:
//!
//! * a **read-only** pipeline (the round trip's `wrote` flag is false);
//! * an **atomic** pipeline (`MULTI`/`EXEC`): a refused command inside it makes Redis discard the
//!   whole transaction (`EXECABORT`), so nothing ran. redis-rs reports that as `EXECABORT`; the
//!   refusals inside are looked at here.
//!
//! A non-atomic pipeline that writes is never re-sent: a refusal is reported as a lost reply, which
//! the client maps to [`crate::Error::OutcomeUnknown`].
//!
//! What herd sends as a pipeline on a cluster (every one within one slot):
//!
//! | pipeline | where | kind | on a refusal |
//! |---|---|---|---|
//! | `HGETALL` + `PTTL` (load a session) | `session::store::load` | read | re-sent |
//! | `MULTI` `SET`/`INCRBY`/`DEL`… `EXEC` (a group of globals) | `globals::atomic` | atomic | re-sent |
//! | `ZADD` + `ZREMRANGEBYSCORE` + `PEXPIREAT NX` + `PEXPIREAT GT` (owner index, alongside a save or after a blind cycle) | `session::store::save_in_place`, `Session::flush` | writes, not atomic | outcome unknown |
//!
//! (`HINCRBY` + `PEXPIRE` + `HMGET`, the script-less session counter, is never sent on a cluster;
//! `update`'s `WATCH` pipelines need a dedicated connection, which a cluster has not; `run_each`
//! sends one command per slot, not a pipeline.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::SingleNodeRoutingInfo;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisResult, ServerErrorKind, Value};

/// Requests re-sent after `MOVED` or `ASK`, in this process (`RedisClient::cluster_redirects`).
pub(super) static REDIRECTS: AtomicU64 = AtomicU64::new(0);

fn is_redirect(err: &RedisError) -> bool {
    matches!(
        err.kind(),
        ErrorKind::Server(ServerErrorKind::Moved | ServerErrorKind::Ask)
    )
}

/// Enough for a resharding step or a failover election; the command timeout cuts it short anyway.
const MAX_ATTEMPTS: u32 = 10;

/// What to do with an error.
enum Next {
    /// The server did not run the command: send it again by slot after this pause.
    Retry(Duration),
    /// `ASK`: send it again to this node, after `ASKING`.
    Ask(String, u16),
    /// Give the error to the caller.
    Fail,
}

fn next(err: &RedisError, attempt: u32) -> Next {
    let backoff = Duration::from_millis((5u64 << attempt.min(5)).min(160));
    match err.kind() {
        ErrorKind::Server(ServerErrorKind::Moved) => Next::Retry(Duration::from_millis(5)),
        ErrorKind::Server(ServerErrorKind::Ask) => match err.redirect_node() {
            Some((addr, _slot)) => match addr.rsplit_once(':') {
                Some((host, port)) => match port.parse() {
                    Ok(port) => Next::Ask(host.to_owned(), port),
                    Err(_) => Next::Retry(backoff),
                },
                None => Next::Retry(backoff),
            },
            None => Next::Retry(backoff),
        },
        ErrorKind::Server(
            ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::BusyLoading,
        ) => Next::Retry(backoff),
        _ => Next::Fail,
    }
}

/// After an error: gives it back when it must not be re-sent (or after [`MAX_ATTEMPTS`]), else
/// waits as needed and says where to send again (`Some` node after `ASK`, `None` by slot).
async fn again(err: RedisError, attempt: u32) -> RedisResult<Option<(String, u16)>> {
    if attempt >= MAX_ATTEMPTS {
        return Err(err);
    }
    match next(&err, attempt) {
        Next::Fail => Err(err),
        Next::Ask(host, port) => Ok(Some((host, port))),
        Next::Retry(pause) => {
            tokio::time::sleep(pause).await;
            Ok(None)
        }
    }
}

/// One command, re-sent on a refusal.
pub(super) async fn command(conn: &mut ClusterConnection, cmd: &Cmd) -> RedisResult<Value> {
    let mut attempt = 0;
    let mut ask: Option<(String, u16)> = None;
    loop {
        let reply = match ask.take() {
            None => conn.req_packed_command(cmd).await,
            Some((host, port)) => {
                let mut pipe = redis::pipe();
                pipe.cmd("ASKING").ignore().add_command(cmd.clone());
                conn.route_pipeline(pipe, 1, 1, SingleNodeRoutingInfo::ByAddress { host, port })
                    .await
                    .map(|mut v| v.pop().unwrap_or(Value::Nil))
            }
        };
        match reply {
            Ok(value) => return Ok(value),
            Err(err) => {
                attempt += 1;
                let redirect = is_redirect(&err);
                ask = again(err, attempt).await?;
                if redirect {
                    REDIRECTS.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// One pipeline (all its commands in one slot). Re-sent on a refusal only when that is safe — it
/// is read-only (`wrote` false) or atomic — see the [module docs](self). After `ASK` it waits for
/// the slot to be handed over (bounded by the caller's command timeout) rather than sending the
/// pipeline to the target.
pub(super) async fn pipeline(
    conn: &mut ClusterConnection,
    wrote: bool,
    pipeline: &Pipeline,
    offset: usize,
    count: usize,
) -> RedisResult<Vec<Value>> {
    let atomic = pipeline.is_transaction();
    let mut attempt = 0;
    loop {
        let err = match conn.req_packed_commands(pipeline, offset, count).await {
            Ok(values) => return Ok(values),
            Err(err) if atomic => refusal_inside_transaction(err),
            Err(err) => err,
        };
        if matches!(next(&err, attempt), Next::Fail) {
            return Err(err);
        }
        if wrote && !atomic {
            // Some commands may have run before the refusal: never send them again.
            return Err(RedisError::from((
                ErrorKind::Io,
                "a Redis Cluster node refused part of a pipeline of writes; the rest may have run",
                err.to_string(),
            )));
        }
        let redirect = is_redirect(&err);
        if atomic && matches!(err.kind(), ErrorKind::Server(ServerErrorKind::Moved)) {
            // Inside a transaction redis-rs saw only `EXECABORT` and did not refresh its slot map:
            // a read of the pipeline's first key meets the same `MOVED`, which makes it refresh.
            refresh_slot_map(conn, pipeline).await;
        }
        if matches!(err.kind(), ErrorKind::Server(ServerErrorKind::Ask)) {
            // Until the slot is handed over (bounded by the caller's timeout, not by attempts).
            tokio::time::sleep(Duration::from_millis(10)).await;
        } else {
            attempt += 1;
            again(err, attempt).await?;
        }
        if redirect {
            REDIRECTS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// An aborted transaction (`EXECABORT`) whose queued commands were all refused with a redirect or a
/// "try again" (`MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`, ...): the first of those refusals, so that
/// it is handled like a refusal of a single command. Anything else is returned as it is.
fn refusal_inside_transaction(err: RedisError) -> RedisError {
    if !matches!(err.kind(), ErrorKind::Server(ServerErrorKind::ExecAbort)) {
        return err;
    }
    let Some(inside) = err.clone().into_server_errors() else {
        return err;
    };
    let refused = |e: &redis::ServerError| {
        let e = RedisError::from(e.clone());
        !matches!(next(&e, 0), Next::Fail)
    };
    match inside.first() {
        Some((_, first)) if inside.iter().all(|(_, e)| refused(e)) => {
            RedisError::from(first.clone())
        }
        _ => err,
    }
}

/// Reads (`EXISTS`) the first key of `pipeline`, routed by slot with redis-rs' current map: on a
/// stale map the answer is `MOVED`, on which redis-rs refreshes the map. The reply is not used.
async fn refresh_slot_map(conn: &mut ClusterConnection, pipeline: &Pipeline) {
    let key = pipeline
        .cmd_iter()
        .find_map(|cmd| match cmd.args_iter().nth(1) {
            Some(redis::Arg::Simple(key)) => Some(key.to_vec()),
            _ => None,
        });
    if let Some(key) = key {
        let _ = conn.req_packed_command(redis::cmd("EXISTS").arg(key)).await;
    }
}
