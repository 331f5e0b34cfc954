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
//! curl -s localhost:3000/ticks                     # +1 per second in total, whatever the workers
//! curl -si localhost:3000/limited                  # 50 per client IP at once, then 1 per 200 ms
//! kill -HUP <master pid>                           # rolling reload, no request dropped
//! ```
//!
//! Flags: `--workers N` (default: CPU count), `--port P` (default 3000), `--host H` (default
//! 127.0.0.1). The HTTP contract is in the README ("The flagship example").

#[path = "support/private_redis.rs"]
#[allow(dead_code)] // `find_or_start` is for the single-process examples; this one supervises
mod private_redis;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
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
/// Each worker pings Redis this often to know whether it answers (see [`RedisHealth`]) ...
const PING_EVERY: Duration = Duration::from_millis(200);
/// ... and gives each ping this long.
const PING_TIMEOUT: Duration = Duration::from_millis(500);
/// Redis silent for this long (no pong, no request served with its help) counts as unreachable.
const REDIS_SILENCE: Duration = Duration::from_millis(800);
/// A request that needs Redis runs this long before its worker looks at Redis' health
/// (see [`redis_deadline`]); then again every [`CHECK_EVERY`].
const REDIS_PATIENCE: Duration = Duration::from_millis(800);
const CHECK_EVERY: Duration = Duration::from_millis(100);
/// The longest any route that needs Redis may take, even while Redis answers pings.
const REDIS_ROUTE_LIMIT: Duration = Duration::from_secs(15);

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
        // Colour only on a terminal (log files and journald get plain text).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
        .hang_timeout(hang_timeout_from_env()?)
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
            tokio::spawn(coordination::tick_job(globals.clone(), worker.shutdown()));
            let app = router(state, redis)
                .layer(worker.requests())
                .layer(middleware::map_response(json_errors));
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

/// When this worker last heard Redis answer: a task pings it every [`PING_EVERY`], and every
/// request that Redis helped to serve counts too. Under a heavy burst the pings can come back late
/// (two cores shared by the workers, Redis and the clients), while hundreds of requests still get
/// served: those are the proof that Redis is busy, not gone.
#[derive(Clone)]
struct RedisHealth {
    origin: Instant,
    /// Milliseconds from `origin` to the last answer (0: none yet).
    last_answer_ms: Arc<AtomicU64>,
}

impl RedisHealth {
    fn start(redis: RedisClient) -> RedisHealth {
        let health = RedisHealth {
            origin: Instant::now(),
            last_answer_ms: Arc::new(AtomicU64::new(0)),
        };
        let h = health.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(Ok(())) = tokio::time::timeout(PING_TIMEOUT, redis.ping()).await {
                    h.heard();
                }
                tokio::time::sleep(PING_EVERY).await;
            }
        });
        health
    }

    /// Redis answered just now.
    fn heard(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.last_answer_ms.fetch_max(now, Ordering::Relaxed);
    }

    /// How long Redis has not answered this worker.
    fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_answer_ms.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }
}

fn router(state: AppState, redis: RedisClient) -> Router {
    // The routes that need Redis: sessions, and a deadline so that they answer (503 if need be)
    // within 2 s even when Redis is frozen or the pool of connections is exhausted.
    let needs_redis = Router::new()
        .route("/counter", get(counter))
        .route("/session", get(session_data))
        .route("/login", post(login))
        .route("/me", get(me))
        .route("/logout", post(logout))
        .route("/hits", get(hits))
        .route("/transfer", post(transfer))
        .route("/accounts", get(accounts))
        .route("/ticks", get(coordination::ticks))
        .route(
            "/limited",
            coordination::limited_route(&redis, state.worker),
        )
        .with_state(state.clone())
        // Plain http in this example: browsers drop `Secure` cookies there.
        .layer(SessionLayer::new(redis.clone()).with_secure(false))
        .layer(middleware::from_fn_with_state(
            RedisHealth::start(redis),
            redis_deadline,
        ));
    Router::new()
        .route("/healthz", get(herd::launcher::healthz))
        .route("/whoami", get(whoami))
        .route("/slow", get(slow))
        .route("/stall", get(stall))
        .with_state(state)
        .merge(needs_redis)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// 503 with `Retry-After`, as herd answers when Redis is unavailable.
fn unavailable(message: &str) -> Response {
    let mut res = error(StatusCode::SERVICE_UNAVAILABLE, message);
    res.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(1));
    res
}

/// Every answer is JSON: the errors axum makes itself (405 for a wrong method, 413 for a body over
/// the 2 MB limit, 400 for a query string that does not parse) are plain text or empty; they become
/// `{"error": TEXT}` here, with their status and headers (`Allow`, `Retry-After`) kept.
async fn json_errors(res: Response) -> Response {
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = match text.is_empty() {
        true => status.canonical_reason().unwrap_or("error").to_owned(),
        false => text,
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(json!({ "error": message }).to_string()))
}

/// The contract says: Redis unreachable, the routes that need it answer 503 within 2 s. Each Redis
/// round trip is bounded (1 s by default), but a request can wait for several: a pooled connection
/// (up to 5 s in this example, see [`config`]), its health check, `WATCH`, `EXEC`. So a request
/// still running after [`REDIS_PATIENCE`] looks at the worker's [`RedisHealth`]: Redis silent for
/// [`REDIS_SILENCE`] means down or frozen, and the request gets its 503 now (dropping it is safe:
/// a write cut short is at worst applied whole, never half); Redis still answering means it is only
/// busy (a burst of transfers queueing for connections), and the request goes on.
async fn redis_deadline(State(health): State<RedisHealth>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    // Routes that cannot answer 200 or 409 without Redis (/session and /me can, for a visitor
    // without a session).
    let always_redis = matches!(
        req.uri().path(),
        "/counter" | "/hits" | "/accounts" | "/transfer" | "/login"
    );
    let run = next.run(req);
    tokio::pin!(run);
    let mut wait = REDIS_PATIENCE;
    loop {
        tokio::select! {
            res = &mut run => {
                let s = res.status();
                if always_redis && (s.is_success() || s == StatusCode::CONFLICT) {
                    health.heard();
                }
                return res;
            }
            () = tokio::time::sleep(wait) => {}
        }
        wait = CHECK_EVERY;
        if health.silent_for() >= REDIS_SILENCE {
            return unavailable("Redis is not answering, please retry");
        }
        if started.elapsed() >= REDIS_ROUTE_LIMIT {
            return unavailable("too busy, please retry");
        }
    }
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

/// Creates the accounts at 1000 each, all of them or none, only if none exists yet (one optimistic
/// update of the ten). Each worker remembers that it was done; [`reseed_accounts`] forgets it.
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

/// The accounts were found missing: Redis lost its data (restarted without persistence, or was
/// flushed). Seed them again, with the same all-or-nothing, only-if-absent update, so that two
/// workers doing it at once still give 10000 in total.
async fn reseed_accounts(s: &AppState) -> herd::Result<()> {
    tracing::warn!(
        "worker {:?}: the accounts are missing in Redis; seeding them again",
        s.worker
    );
    s.seeded.store(false, Ordering::Relaxed);
    seed_accounts(s).await
}

enum TransferError {
    Insufficient,
    /// An account does not exist in Redis (it lost its data).
    Missing,
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
    let pair = [from, to];
    let attempt = || {
        s.bank.update(&pair, |balances: &mut [Option<i64>]| {
            let (Some(a), Some(b)) = (balances[0], balances[1]) else {
                return Err(TransferError::Missing);
            };
            if a < amount {
                return Err(TransferError::Insufficient);
            }
            balances[0] = Some(a - amount);
            balances[1] = Some(b + amount);
            Ok(())
        })
    };
    let mut result = attempt().await;
    if let Err(UpdateError::Aborted(TransferError::Missing)) = result {
        if let Err(e) = reseed_accounts(&s).await {
            return e.into_response();
        }
        result = attempt().await;
    }
    match result {
        Ok(()) => Json(json!({ "ok": true })).into_response(),
        Err(UpdateError::Aborted(TransferError::Insufficient)) => {
            error(StatusCode::CONFLICT, "insufficient funds")
        }
        // Still missing right after seeding them again: Redis is losing data as we go.
        Err(UpdateError::Aborted(TransferError::Missing)) => {
            unavailable("the accounts are being recreated, please retry")
        }
        // Lost the race `with_max_attempts` times in a row: busy, not short of funds (409 means that
        // here), so the client is told to retry.
        Err(UpdateError::Failed(e)) if e.is_conflict() => unavailable("too busy, please retry"),
        Err(UpdateError::Failed(e)) => e.into_response(),
    }
}

async fn accounts(State(s): State<AppState>) -> herd::Result<Json<Value>> {
    seed_accounts(&s).await?;
    let names = account_names();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut balances: Vec<Option<i64>> = s.bank.get_many(&refs).await?;
    if balances.iter().all(Option::is_none) {
        reseed_accounts(&s).await?;
        balances = s.bank.get_many(&refs).await?;
    }
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
    let Some(ms) =
        q.ms.as_deref()
            .and_then(|m| m.parse::<u64>().ok())
            .filter(|ms| *ms <= MAX_SLOW_MS)
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected ?ms=N, N a whole number of milliseconds from 0 to 30000",
        );
    };
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
        let child = private_redis::spawn_server(port)?;
        let url = format!("redis://127.0.0.1:{port}");
        private_redis::wait_until_up(port)?;
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

/// Starts redis-server in a process group of its own, so that Ctrl-C (SIGINT to the terminal's
/// foreground group) reaches only the master, which drains its workers while Redis still serves
/// them; the master stops Redis afterwards. On Linux it also gets `PR_SET_PDEATHSIG`: if the
/// master is killed outright (SIGKILL), Redis goes with it instead of lingering.
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
            match private_redis::spawn_server(port) {
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

/// `/ticks` and `/limited`: a job run once per second across the whole herd under a lease, and a
/// rate limit shared by every worker (see `docs/coordination.md`).
mod coordination {
    use std::future::Future;
    use std::time::Duration;

    use axum::extract::State;
    use axum::routing::{get, MethodRouter};
    use axum::{Extension, Json};
    use herd::globals::Globals;
    use herd::rate_limit::{client_ip, Decision, Quota, RateLimitLayer, RateLimiter};
    use herd::RedisClient;
    use serde_json::{json, Value};

    use super::AppState;

    /// The lease's TTL: a killed holder's ticks are missed for at most this long (plus the
    /// waiters' retry interval, a third of it).
    const TICK_LEASE_TTL: Duration = Duration::from_secs(2);

    /// Every worker runs this; the holder of the `ticks` lease adds 1 to the global `ticks` each
    /// second (fenced by its token), until this worker shuts down (the lease is then released,
    /// and another worker continues the schedule).
    pub(super) async fn tick_job(globals: Globals, shutdown: impl Future<Output = ()>) {
        let (lease, stats) = match (
            globals.lease("ticks", TICK_LEASE_TTL),
            globals.group("stats"),
        ) {
            (Ok(lease), Ok(stats)) => (lease, stats),
            (Err(e), _) | (_, Err(e)) => return tracing::error!("ticks: {e}"),
        };
        let job = lease.every(Duration::from_secs(1), move |token| {
            let stats = stats.clone();
            async move {
                if let Err(e) = stats.incr_fenced("ticks", 1, token).await {
                    tracing::warn!("ticks: {e}");
                }
                // Which process ticks (for operators and the tests that kill it).
                let _ = stats
                    .set_fenced("ticks-holder", &std::process::id(), token)
                    .await;
            }
        });
        tokio::select! {
            () = job => {}
            () = shutdown => {}
        }
    }

    pub(super) async fn ticks(State(s): State<AppState>) -> herd::Result<Json<Value>> {
        let ticks: i64 = s.stats.get("ticks").await?.unwrap_or(0);
        Ok(Json(json!({ "ticks": ticks })))
    }

    /// `GET /limited`: at most 50 requests per client IP per 10 s across all workers (a burst of
    /// 50, then one more each 200 ms); over it, 429 with `Retry-After`.
    pub(super) fn limited_route(
        redis: &RedisClient,
        worker: Option<usize>,
    ) -> MethodRouter<AppState> {
        let limiter = RateLimiter::new(
            redis.clone(),
            "limited",
            Quota::per(50, Duration::from_secs(10)),
        )
        .expect("a valid limiter name");
        get(move |Extension(d): Extension<Decision>| async move {
            Json(json!({ "remaining": d.remaining(), "worker": worker }))
        })
        .layer(RateLimitLayer::new(limiter, client_ip))
    }
}

/// `HERD_HANG_TIMEOUT` (seconds, fractions allowed; 0 turns the check off): a worker whose runtime
/// sends no heartbeat for this long is killed and replaced. Default 30 s.
fn hang_timeout_from_env() -> Result<Duration, String> {
    match std::env::var("HERD_HANG_TIMEOUT") {
        Err(_) => Ok(Duration::from_secs(30)),
        Ok(text) => text
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .ok_or_else(|| {
                format!("HERD_HANG_TIMEOUT={text:?}: give a number of seconds, 0 or more")
            }),
    }
}

/// `GET /stall?ms=N` (N from 0 to 60000): a hung worker on purpose, for demos and tests. Blocks
/// every thread of this worker's runtime for N ms (its heartbeat stops with them), then answers
/// `{"stalled":N}` if the master did not replace it meanwhile (see `HERD_HANG_TIMEOUT`).
async fn stall(Query(params): Query<BTreeMap<String, String>>) -> Response {
    let Some(ms) = params
        .get("ms")
        .and_then(|ms| ms.parse::<u64>().ok())
        .filter(|&ms| ms <= 60_000)
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "ms must be a whole number from 0 to 60000",
        );
    };
    let until = Instant::now() + Duration::from_millis(ms);
    let runtime = tokio::runtime::Handle::current();
    let threads = runtime.metrics().num_workers();
    // Spawned from outside the runtime, the tasks go to its shared queue, which every free thread
    // takes work from: each thread takes one and blocks until the common deadline (a thread that
    // takes a second one after the deadline returns at once).
    let tasks = tokio::task::spawn_blocking(move || {
        (0..threads)
            .map(|_| {
                runtime.spawn(async move {
                    std::thread::sleep(until.saturating_duration_since(Instant::now()));
                })
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    for task in tasks {
        let _ = task.await;
    }
    Json(json!({ "stalled": ms })).into_response()
}
