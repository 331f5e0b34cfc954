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
//! * a **read-only** pipeline (the round trip's effect is `ReadOnly`);
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
//! | `MULTI` `SET`/`INCRBY`/`DEL`… `EXEC` (a group of globals) | `globals::atomic` | atomic | re-sent |
//! | `MULTI` `ZADD` + `ZREMRANGEBYSCORE` + `PEXPIREAT NX` + `PEXPIREAT GT` `EXEC` (an owner's index, alongside a session save) | `session::store::save_in_place` | atomic | re-sent |
//!
//! (A session is read with one `HGETALL`, a command. The script-less session writes —
//! `HINCRBY` + `PEXPIRE` + `HGET`, `HSET` + `PEXPIRE` + `HEXISTS` — are never sent on a cluster;
//! `update`'s `WATCH` pipelines need a dedicated connection, which a cluster has not; `run_each`
//! sends one command per slot, not a pipeline.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::SingleNodeRoutingInfo;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisResult, ServerErrorKind, Value};

use super::Effect;

/// The cluster connection as one round trip uses it.
#[derive(Clone)]
pub(crate) struct RoundTrip {
    pub(super) conn: ClusterConnection,
    /// The round trip may write: a non-atomic pipeline is then never re-sent after a refusal.
    pub(super) effect: Effect,
    /// The client's count of requests re-sent after `MOVED` or `ASK`
    /// (`RedisClient::cluster_redirects`).
    pub(super) redirects: Arc<AtomicU64>,
}

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
pub(super) async fn command(trip: &mut RoundTrip, cmd: &Cmd) -> RedisResult<Value> {
    let conn = &mut trip.conn;
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
                    trip.redirects.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// One pipeline (all its commands in one slot). Re-sent on a refusal only when that is safe — it
/// is read-only or atomic — see the [module docs](self). After `ASK` it waits for
/// the slot to be handed over (bounded by the caller's command timeout) rather than sending the
/// pipeline to the target.
pub(super) async fn pipeline(
    trip: &mut RoundTrip,
    pipeline: &Pipeline,
    offset: usize,
    count: usize,
) -> RedisResult<Vec<Value>> {
    let (conn, effect) = (&mut trip.conn, trip.effect);
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
        if effect == Effect::MayWrite && !atomic {
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
            trip.redirects.fetch_add(1, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    //! Against two real cluster-enabled `redis-server`s (the integration tests have the full
    //! harness in `tests/support`): node A owns every slot, and the slot of `{t}` is being migrated
    //! to node B, so a command on a key of that slot that A does not hold is answered `ASK`.

    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use crate::client::Effect;
    use crate::{Config, Error, RedisClient};

    struct Node {
        child: Child,
        port: u16,
        _dir: tempfile::TempDir,
    }

    impl Node {
        fn start() -> Node {
            let dir = tempfile::tempdir().expect("temp dir");
            let port = free_port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--cluster-enabled",
                    "yes",
                    // The default bus port, port + 10000, is over 65535 for a fifth of the
                    // ephemeral ports (Redis then refuses to start): pick it free as well.
                    "--cluster-port",
                    &free_port().to_string(),
                ])
                .args(["--dir", &dir.path().to_string_lossy()])
                .args(["--cluster-config-file", "nodes.conf"])
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server on PATH");
            let node = Node {
                child,
                port,
                _dir: dir,
            };
            wait("redis-server to answer", || {
                node.try_cmd::<String>(&["PING"]).is_ok()
            });
            node
        }

        fn try_cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
            let mut conn = redis::Client::open(format!("redis://127.0.0.1:{}", self.port))?
                .get_connection_with_timeout(Duration::from_secs(1))?;
            let mut cmd = redis::cmd(args[0]);
            for a in &args[1..] {
                cmd.arg(*a);
            }
            cmd.query(&mut conn)
        }

        fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
            self.try_cmd(args)
                .unwrap_or_else(|e| panic!("{args:?} on port {}: {e}", self.port))
        }
    }

    impl Drop for Node {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port")
    }

    fn wait(what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A two-node cluster, A owning every slot, the slot of `{t}` migrating from A to B; `on_a`
    /// keys are set on A first, `on_b` keys are set on A then moved to B.
    fn migrating(on_a: &[(&str, &str)], on_b: &[(&str, &str)]) -> (Node, Node, String, String) {
        let (a, b) = (Node::start(), Node::start());
        let _: () = a.cmd(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
        let (_, b_bus): (String, String) = b.cmd(&["CONFIG", "GET", "cluster-port"]);
        let _: () = a.cmd(&["CLUSTER", "MEET", "127.0.0.1", &b.port.to_string(), &b_bus]);
        wait("the cluster to form", || {
            [&a, &b].iter().all(|n| {
                n.try_cmd::<String>(&["CLUSTER", "INFO"]).is_ok_and(|i| {
                    i.contains("cluster_state:ok") && i.contains("cluster_known_nodes:2")
                })
            })
        });
        let (a_id, b_id): (String, String) =
            (a.cmd(&["CLUSTER", "MYID"]), b.cmd(&["CLUSTER", "MYID"]));
        for (key, value) in on_a.iter().chain(on_b) {
            let _: () = a.cmd(&["SET", key, value]);
        }
        let slot = a.cmd::<i64>(&["CLUSTER", "KEYSLOT", "{t}"]).to_string();
        let _: () = b.cmd(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &a_id]);
        let _: () = a.cmd(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &b_id]);
        let port_b = b.port.to_string();
        for (key, _) in on_b {
            let _: String = a.cmd(&["MIGRATE", "127.0.0.1", &port_b, key, "0", "5000"]);
        }
        (a, b, slot, b_id)
    }

    fn client(a: &Node, b: &Node) -> RedisClient {
        let config = Config::builder()
            .redis_url(format!(
                "redis+cluster://127.0.0.1:{},127.0.0.1:{}",
                a.port, b.port
            ))
            .command_timeout(Duration::from_millis(800))
            .build()
            .expect("config");
        RedisClient::new(config).expect("client")
    }

    /// `INCR {t}a` runs on A (which holds `{t}a`), `INCR {t}b` is answered `ASK` (A does not hold
    /// it): re-sending the pipeline would increment `{t}a` again at every attempt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_pipeline_partly_refused_is_never_resent() {
        let (a, b, _slot, _) = migrating(&[("{t}a", "0")], &[]);
        let client = client(&a, &b);
        let result: crate::Result<Vec<i64>> = client
            .run(Effect::MayWrite, |mut c| async move {
                redis::pipe()
                    .cmd("INCR")
                    .arg("{t}a")
                    .cmd("INCR")
                    .arg("{t}b")
                    .query_async(&mut c)
                    .await
            })
            .await;
        assert!(
            matches!(result, Err(Error::OutcomeUnknown { .. })),
            "a partly run write pipeline must be outcome-unknown: {result:?}"
        );
        assert_eq!(
            a.cmd::<String>(&["GET", "{t}a"]),
            "1",
            "applied exactly once"
        );

        // A read-only pipeline in the same state is re-sent until the slot is handed over (here
        // never: it gives up at the command timeout, as unavailable, having written nothing).
        let read: crate::Result<(Option<i64>, Option<i64>)> = client
            .run(Effect::ReadOnly, |mut c| async move {
                redis::pipe()
                    .cmd("GET")
                    .arg("{t}a")
                    .cmd("GET")
                    .arg("{t}b")
                    .query_async(&mut c)
                    .await
            })
            .await;
        assert!(matches!(read, Err(Error::Unavailable { .. })), "{read:?}");
    }

    /// An atomic pipeline refused inside (`ASK`, then `MOVED` once the slot moved) ran nothing:
    /// herd re-sends it until it runs, once, on the new owner.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_atomic_pipeline_refused_inside_is_resent_and_runs_once() {
        // `{t}b` already moved: A answers ASK for it.
        let (a, b, slot, b_id) = migrating(&[("{t}a", "1")], &[("{t}b", "0")]);
        let client = client(&a, &b);
        let redirects = client.cluster_redirects();
        let pipe = {
            let mut pipe = redis::pipe();
            pipe.atomic()
                .cmd("INCR")
                .arg("{t}a")
                .cmd("INCR")
                .arg("{t}b");
            pipe
        };
        // Finish the migration while the transaction is being refused.
        let port_b = b.port.to_string();
        let mover = std::thread::spawn({
            let (a_port, b_port) = (a.port, b.port);
            let slot = slot.clone();
            move || {
                std::thread::sleep(Duration::from_millis(200));
                let node = |port: u16| redis::Client::open(format!("redis://127.0.0.1:{port}"));
                let mut conn_a = node(a_port).and_then(|c| c.get_connection()).expect("A");
                let mut conn_b = node(b_port).and_then(|c| c.get_connection()).expect("B");
                let _: () = redis::cmd("MIGRATE")
                    .arg("127.0.0.1")
                    .arg(&port_b)
                    .arg("{t}a")
                    .arg(0)
                    .arg(5000)
                    .query(&mut conn_a)
                    .expect("MIGRATE");
                for conn in [&mut conn_b, &mut conn_a] {
                    let _: () = redis::cmd("CLUSTER")
                        .arg("SETSLOT")
                        .arg(&slot)
                        .arg("NODE")
                        .arg(&b_id)
                        .query(conn)
                        .expect("SETSLOT NODE");
                }
            }
        });
        let result: crate::Result<(i64, i64)> = client
            .run(Effect::MayWrite, |mut c| async move {
                pipe.query_async(&mut c).await
            })
            .await;
        mover.join().expect("mover");
        assert_eq!(result.expect("the transaction ran after the move"), (2, 1));
        let read = |key: &str| {
            let mut conn = redis::Client::open(format!("redis://127.0.0.1:{}", b.port))
                .and_then(|c| c.get_connection())
                .expect("B");
            redis::cmd("GET")
                .arg(key)
                .query::<String>(&mut conn)
                .expect("GET on B")
        };
        assert_eq!((read("{t}a"), read("{t}b")), ("2".into(), "1".into()));
        assert!(
            client.cluster_redirects() > redirects,
            "no redirect counted"
        );
    }
}
