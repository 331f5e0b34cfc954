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

use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::SingleNodeRoutingInfo;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisResult, ServerErrorKind, Value};

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
                ask = again(err, attempt).await?;
            }
        }
    }
}

/// One pipeline (all its commands in one slot), re-sent as a whole on a refusal. herd's plain
/// pipelines are reads and idempotent index updates, and an atomic one (`MULTI`/`EXEC`) is refused
/// as a whole (`EXECABORT`), so re-sending never applies a write twice. After `ASK` it waits for
/// the slot to be handed over (bounded by the caller's command timeout) rather than sending the
/// pipeline to the target.
pub(super) async fn pipeline(
    conn: &mut ClusterConnection,
    pipeline: &Pipeline,
    offset: usize,
    count: usize,
) -> RedisResult<Vec<Value>> {
    let mut attempt = 0;
    loop {
        match conn.req_packed_commands(pipeline, offset, count).await {
            Ok(values) => return Ok(values),
            Err(err) if matches!(err.kind(), ErrorKind::Server(ServerErrorKind::Ask)) => {
                // Until the slot is handed over (bounded by the caller's timeout, not by attempts).
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(err) => {
                attempt += 1;
                again(err, attempt).await?;
            }
        }
    }
}
