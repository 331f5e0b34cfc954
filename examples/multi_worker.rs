//! The flagship: several worker processes on one port, sharing sessions and globals through Redis.
//!
//! Run (release build; REDIS_URL defaults to redis://127.0.0.1:6379, and when nothing answers there
//! and `redis-server` is installed, a private one is started for the run):
//!
//! ```sh
//! cargo run --release --example multi_worker -- --workers 4 --port 3000
//! curl -s -c jar -b jar localhost:3000/counter    # {"counter":1,"worker":2} ... any worker, one count
//! curl -s localhost:3000/hits                      # a global counter shared by all workers
//! curl -s -X POST localhost:3000/transfer -d '{"from":"acct-1","to":"acct-7","amount":5}'
//! curl -s localhost:3000/accounts                  # always sums to 10000
//! kill -HUP <master pid>                           # rolling reload, no request dropped
//! ```
//!
//! Flags: `--workers N` (default: CPU count), `--port P` (default 3000), `--host H` (default
//! 127.0.0.1). The HTTP contract is in the README ("The flagship example").

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use herd::globals::{Globals, Group, UpdateError};
use herd::launcher::Launcher;
use herd::{Config, RedisClient, Session, SessionLayer};
use serde_json::{json, Value};

const ACCOUNTS: usize = 10;
const INITIAL_BALANCE: i64 = 1000;
const MAX_AMOUNT: u64 = 1_000_000;
const MAX_SLOW_MS: u64 = 30_000;

#[derive(Clone)]
struct AppState {
    worker: Option<usize>,
    bank: Group,
    stats: Group,
    seeded: Arc<AtomicBool>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,herd=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse()?;
    let is_master = std::env::var_os("LISTEN_FDS").is_none();
    // Only the master decides about Redis; workers inherit REDIS_URL from it.
    let private_redis = if is_master {
        PrivateRedis::ensure()?
    } else {
        None
    };

    let result = Launcher::new()
        .workers(args.workers)
        .bind(format!("{}:{}", args.host, args.port))
        .name(format!("multi_worker-{}", args.port))
        .run(|worker| async move {
            let redis = RedisClient::new(config()?)?;
            // Best effort: a worker also starts (and answers 503 where Redis is needed) while
            // Redis is down, so that the routes that do not need it keep working.
            if let Err(e) = redis.ping().await {
                tracing::warn!(
                    "worker {:?}: Redis does not answer yet: {e}",
                    worker.index()
                );
            }
            let globals = Globals::new(redis.clone()).with_max_attempts(50);
            let state = AppState {
                worker: worker.index(),
                bank: globals.group("bank")?,
                stats: globals.group("stats")?,
                seeded: Arc::new(AtomicBool::new(false)),
            };
            if let Err(e) = seed_accounts(&state).await {
                tracing::warn!("worker {:?}: accounts not seeded yet: {e}", worker.index());
            }
            let app = router(state)
                // Plain http in this example: browsers drop `Secure` cookies there.
                .layer(SessionLayer::new(redis).with_secure(false))
                .layer(worker.requests());
            // Reports READY, serves, and on SIGTERM stops accepting, then drains.
            worker
                .serve(app)
                .await
                .map_err(Box::<dyn std::error::Error + Send + Sync>::from)
        });
    drop(private_redis);
    result.map_err(Into::into)
}

/// The environment's configuration, with two defaults of this example's own (environment wins):
/// `/transfer` updates ten hot accounts with WATCH, and few concurrent WATCHers per worker conflict
/// less (more commits per round trip) than many, so the pool of dedicated connections is small; a
/// burst of transfers then queues for a connection a little longer before it gets a 503.
fn config() -> herd::Result<Config> {
    let mut builder = herd::ConfigBuilder::from_env()?;
    if std::env::var_os("HERD_POOL_SIZE").is_none() {
        builder = builder.pool_size(4);
    }
    if std::env::var_os("HERD_POOL_WAIT_MS").is_none() {
        builder = builder.pool_wait_timeout(Duration::from_secs(5));
    }
    builder.build()
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({ "ok": true })) }))
        .route("/whoami", get(whoami))
        .route("/counter", get(counter))
        .route("/session", get(session_data))
        .route("/login", post(login))
        .route("/me", get(me))
        .route("/logout", post(logout))
        .route("/hits", get(hits))
        .route("/transfer", post(transfer))
        .route("/accounts", get(accounts))
        .route("/slow", get(slow))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .with_state(state)
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn whoami(State(s): State<AppState>) -> Json<Value> {
    Json(json!({ "worker": s.worker, "pid": std::process::id() }))
}

async fn counter(State(s): State<AppState>, session: Session) -> herd::Result<Json<Value>> {
    let n = session.incr("counter", 1).await?;
    Ok(Json(json!({ "counter": n, "worker": s.worker })))
}

async fn session_data(session: Session) -> herd::Result<Json<Value>> {
    Ok(Json(json!({ "data": session.entries().await? })))
}

async fn login(session: Session, body: Bytes) -> Result<Json<Value>, Response> {
    let user = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("user").and_then(Value::as_str).map(str::to_owned))
        .filter(|u| {
            (1..=64).contains(&u.len())
                && u.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.@-".contains(&b))
        })
        .ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "expected {\"user\": NAME}, NAME of 1 to 64 letters, digits or _.@-",
            )
        })?;
    session.cycle_id().await;
    session
        .insert("user", &user)
        .await
        .map_err(IntoResponse::into_response)?;
    session
        .set_owner(&user)
        .await
        .map_err(IntoResponse::into_response)?;
    Ok(Json(json!({ "user": user })))
}

async fn me(session: Session) -> Result<Json<Value>, Response> {
    match session.get::<String>("user").await {
        Ok(Some(user)) => Ok(Json(json!({ "user": user }))),
        Ok(None) => Err(error(StatusCode::UNAUTHORIZED, "not logged in")),
        Err(e) => Err(e.into_response()),
    }
}

async fn logout(session: Session) -> Json<Value> {
    session.destroy().await;
    Json(json!({ "ok": true }))
}

async fn hits(State(s): State<AppState>) -> herd::Result<Json<Value>> {
    let n = s.stats.incr("hits", 1).await?;
    Ok(Json(json!({ "hits": n })))
}

fn account_names() -> Vec<String> {
    (0..ACCOUNTS).map(|i| format!("acct-{i}")).collect()
}

/// Creates the accounts at 1000 each, all of them or none, only if they do not exist yet.
async fn seed_accounts(s: &AppState) -> herd::Result<()> {
    if s.seeded.load(Ordering::Relaxed) {
        return Ok(());
    }
    let names = account_names();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    s.bank
        .update(&names, |balances: &mut [Option<i64>]| {
            if balances.iter().all(Option::is_none) {
                balances.iter_mut().for_each(|b| *b = Some(INITIAL_BALANCE));
            }
            Ok::<(), std::convert::Infallible>(())
        })
        .await?;
    s.seeded.store(true, Ordering::Relaxed);
    Ok(())
}

enum TransferError {
    Insufficient,
}

async fn transfer(State(s): State<AppState>, body: Bytes) -> Response {
    let bad = |m: &str| error(StatusCode::BAD_REQUEST, m);
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return bad("malformed JSON");
    };
    let names = account_names();
    let (Some(from), Some(to)) = (
        v.get("from").and_then(Value::as_str),
        v.get("to").and_then(Value::as_str),
    ) else {
        return bad("expected {\"from\": ACCOUNT, \"to\": ACCOUNT, \"amount\": INTEGER}");
    };
    if !names.iter().any(|n| n == from) || !names.iter().any(|n| n == to) {
        return bad("unknown account (acct-0 to acct-9)");
    }
    if from == to {
        return bad("from and to must differ");
    }
    let amount = match v.get("amount").and_then(Value::as_u64) {
        Some(a) if (1..=MAX_AMOUNT).contains(&a) => a as i64,
        _ => return bad("amount must be an integer from 1 to 1000000"),
    };
    if let Err(e) = seed_accounts(&s).await {
        return e.into_response();
    }
    let result = s
        .bank
        .update(&[from, to], |balances: &mut [Option<i64>]| {
            let (a, b) = (balances[0].unwrap_or(0), balances[1].unwrap_or(0));
            if a < amount {
                return Err(TransferError::Insufficient);
            }
            balances[0] = Some(a - amount);
            balances[1] = Some(b + amount);
            Ok(())
        })
        .await;
    match result {
        Ok(()) => Json(json!({ "ok": true })).into_response(),
        Err(UpdateError::Aborted(TransferError::Insufficient)) => {
            error(StatusCode::CONFLICT, "insufficient funds")
        }
        // Lost the race `with_max_attempts` times in a row: busy, not short of funds (409 means that
        // here), so the client is told to retry.
        Err(UpdateError::Failed(e)) if e.is_conflict() => {
            let mut res = error(StatusCode::SERVICE_UNAVAILABLE, "too busy, please retry");
            res.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(1),
            );
            res
        }
        Err(UpdateError::Failed(e)) => e.into_response(),
    }
}

async fn accounts(State(s): State<AppState>) -> herd::Result<Json<Value>> {
    seed_accounts(&s).await?;
    let names = account_names();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let balances: Vec<Option<i64>> = s.bank.get_many(&refs).await?;
    let map: BTreeMap<&str, i64> = refs
        .iter()
        .zip(&balances)
        .map(|(n, b)| (*n, b.unwrap_or(0)))
        .collect();
    let total: i64 = map.values().sum();
    Ok(Json(json!({ "accounts": map, "total": total })))
}

#[derive(serde::Deserialize)]
struct SlowQuery {
    ms: Option<String>,
}

async fn slow(Query(q): Query<SlowQuery>) -> Response {
    let Some(ms) = q.ms.as_deref().and_then(|m| m.parse::<u64>().ok()) else {
        return error(StatusCode::BAD_REQUEST, "expected ?ms=MILLISECONDS");
    };
    let ms = ms.min(MAX_SLOW_MS);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Json(json!({ "slept": ms })).into_response()
}

/// Command-line flags (three of them: not worth a parser dependency in an example).
struct Args {
    workers: usize,
    port: u16,
    host: String,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut args = Args {
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            port: 3000,
            host: "127.0.0.1".into(),
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--workers" => {
                    args.workers = value()?
                        .parse()
                        .ok()
                        .filter(|n| *n >= 1)
                        .ok_or("--workers takes a whole number of at least 1")?
                }
                "--port" => {
                    args.port = value()?.parse().map_err(|_| "--port takes a port number")?
                }
                "--host" => args.host = value()?,
                "-h" | "--help" => {
                    println!("usage: multi_worker [--workers N] [--port P] [--host H]");
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?} (try --help)")),
            }
        }
        Ok(args)
    }
}

/// A redis-server started for this run when no Redis answers on the default address.
struct PrivateRedis {
    child: Arc<Mutex<Child>>,
    stopping: Arc<AtomicBool>,
}

impl PrivateRedis {
    fn ensure() -> Result<Option<PrivateRedis>, String> {
        if std::env::var_os("REDIS_URL").is_some() {
            return Ok(None);
        }
        let default: SocketAddr = ([127, 0, 0, 1], 6379).into();
        if TcpStream::connect_timeout(&default, Duration::from_millis(300)).is_ok() {
            return Ok(None);
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port for a private redis-server: {e}"))?
            .port();
        let child = spawn_redis(port).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                "no Redis answers on 127.0.0.1:6379 and redis-server is not installed. Install it \
                 (`sudo apt-get install redis-server`, `brew install redis`) or set REDIS_URL to a \
                 running Redis."
                    .to_owned()
            } else {
                format!("cannot start redis-server: {e}")
            }
        })?;
        let url = format!("redis://127.0.0.1:{port}");
        wait_for_redis(port)?;
        // Before any thread exists: workers inherit it.
        std::env::set_var("REDIS_URL", &url);
        println!(
            "multi_worker: no Redis on 127.0.0.1:6379, so a private redis-server runs on {url} for \
             this run (data is not kept; it stops when this program does)"
        );
        let child = Arc::new(Mutex::new(child));
        let stopping = Arc::new(AtomicBool::new(false));
        let (c, s) = (child.clone(), stopping.clone());
        std::thread::spawn(move || supervise_redis(&c, &s, port));
        Ok(Some(PrivateRedis { child, stopping }))
    }
}

fn spawn_redis(port: u16) -> std::io::Result<Child> {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
}

fn wait_for_redis(port: u16) -> Result<(), String> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    for _ in 0..100 {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "the private redis-server on port {port} did not start"
    ))
}

/// Restarts the private redis-server if it dies while the program runs.
fn supervise_redis(child: &Mutex<Child>, stopping: &AtomicBool, port: u16) {
    while !stopping.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        let mut guard = child.lock().unwrap_or_else(|p| p.into_inner());
        if stopping.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(Some(status)) = guard.try_wait() {
            eprintln!("multi_worker: the private redis-server exited ({status}); restarting it");
            match spawn_redis(port) {
                Ok(c) => *guard = c,
                Err(e) => eprintln!("multi_worker: cannot restart redis-server: {e}"),
            }
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}
