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
//! 127.0.0.1). The HTTP contract is in `docs/flagship.md`. Redis trouble (a 503
//! with `Retry-After` within the request deadline, fast while Redis is down) is herd's own doing:
//! see `herd::client`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use herd::globals::{Globals, Group, UpdateError};
use herd::launcher::Launcher;
use herd::{RedisClient, Session, SessionLayer};
use serde_json::{json, Value};

const ACCOUNTS: [&str; 10] = [
    "acct-0", "acct-1", "acct-2", "acct-3", "acct-4", "acct-5", "acct-6", "acct-7", "acct-8",
    "acct-9",
];
const INITIAL_BALANCE: i64 = 1000;
const MAX_AMOUNT: u64 = 1_000_000;
const MAX_SLOW_MS: u64 = 30_000;

/// What every handler can reach: add a field here for a new route's shared state.
#[derive(Clone)]
struct AppState {
    worker: Option<usize>,
    bank: Group,
    stats: Group,
    /// This worker has made sure the accounts exist (see [`seed_accounts`]).
    seeded: Arc<AtomicBool>,
}

/// The routes; add new ones here.
fn router(state: AppState, redis: &RedisClient, sessions: SessionLayer) -> Router {
    Router::new()
        .route("/healthz", get(herd::launcher::healthz))
        .route("/whoami", get(whoami))
        .route("/slow", get(slow))
        .route("/stall", get(stall))
        .route("/counter", get(counter))
        .route("/session", get(session_data))
        .route("/login", post(login))
        .route("/me", get(me))
        .route("/logout", post(logout))
        .route("/hits", get(hits))
        .route("/transfer", post(transfer))
        .route("/accounts", get(accounts))
        .route("/ticks", get(coordination::ticks))
        .route("/limited", coordination::limited_route(redis, state.worker))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .with_state(state)
        // Plain http in this example: browsers drop `Secure` cookies there.
        .layer(sessions.with_secure(false))
        // A plain function on the response: no future of its own per request.
        .layer(tower::util::MapResponseLayer::new(json_errors))
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
    // This example's defaults (the environment wins): few concurrent WATCHers on ten hot accounts
    // conflict less than many, so the pool is small and a burst of transfers may queue for a
    // connection (5 s) while Redis answers, within a 15 s request deadline. While Redis does not
    // answer, herd's breaker fails requests within about one command timeout (1 s) anyway.
    for (name, value) in [
        ("HERD_POOL_SIZE", "4"),
        ("HERD_POOL_WAIT_MS", "5000"),
        ("HERD_REQUEST_TIMEOUT_MS", "15000"),
    ] {
        if std::env::var_os(name).is_none() {
            std::env::set_var(name, value); // before any thread exists
        }
    }
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let workers: usize = flag("workers", cpus)?.max(1);
    let (port, host): (u16, String) = (flag("port", 3000)?, flag("host", "127.0.0.1".into())?);
    // The master picks the Redis (maybe a private one, stopped after the workers have drained);
    // workers inherit REDIS_URL, set before any thread exists.
    let local_redis = match std::env::var_os("LISTEN_FDS") {
        None => {
            let redis = herd::testing::LocalRedis::find_or_start("multi_worker")?;
            std::env::set_var("REDIS_URL", redis.url());
            Some(redis)
        }
        Some(_) => None,
    };
    let result = Launcher::new()
        .workers(workers)
        .bind(format!("{host}:{port}"))
        .name(format!("multi_worker-{port}"))
        .hang_timeout(hang_timeout_from_env()?)
        .run(|worker| async move {
            // Connects lazily: a worker starts (and answers 503 where Redis is needed) while
            // Redis is down.
            let redis = RedisClient::new(herd::Config::from_env()?)?;
            let globals = Globals::new(redis.clone()).with_max_attempts(50);
            let state = AppState {
                worker: worker.index(),
                bank: globals.group("bank")?,
                stats: globals.group("stats")?,
                seeded: Arc::new(AtomicBool::new(false)),
            };
            if let Err(e) = seed_accounts(&state, false).await {
                tracing::warn!("worker {:?}: accounts not seeded yet: {e}", worker.index());
            }
            tokio::spawn(coordination::tick_job(globals.clone(), worker.shutdown()));
            // The launcher hands every worker the same HERD_SECRET: a cookie verifies in all of them.
            let sessions = SessionLayer::from_env(redis.clone())?;
            let app = router(state, &redis, sessions).layer(worker.requests());
            // Reports READY, serves, and on SIGTERM stops accepting, then drains.
            worker
                .serve(app)
                .await
                .map_err(Box::<dyn std::error::Error + Send + Sync>::from)
        });
    drop(local_redis);
    result.map_err(Into::into)
}

fn error(status: StatusCode, message: &str) -> Response {
    let mut res = (status, Json(json!({ "error": message }))).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(1));
    }
    res
}

/// Every answer is JSON: the errors axum makes itself (405, 413, 400 for a bad query string, ...)
/// become `{"error": REASON}` here, status and headers (`Allow`) kept.
fn json_errors(res: Response) -> Response {
    let is_json = (res.headers().get(header::CONTENT_TYPE))
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let status = res.status();
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let (mut parts, _) = res.into_parts();
    let reason = status.canonical_reason().unwrap_or("error");
    parts.headers.remove(header::CONTENT_LENGTH);
    let json = HeaderValue::from_static("application/json");
    parts.headers.insert(header::CONTENT_TYPE, json);
    Response::from_parts(parts, Body::from(json!({ "error": reason }).to_string()))
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

#[derive(serde::Deserialize)]
struct Login {
    user: String,
}

async fn login(session: Session, body: Bytes) -> Result<Json<Value>, Response> {
    let valid = |c: u8| c.is_ascii_alphanumeric() || b"_.@-".contains(&c);
    let login = serde_json::from_slice::<Login>(&body).ok();
    let user = login
        .map(|l| l.user)
        .filter(|u| u.len() <= 64 && !u.is_empty());
    let Some(user) = user.filter(|u| u.bytes().all(valid)) else {
        let expected = "expected {\"user\": NAME}, NAME of 1 to 64 letters, digits or _.@-";
        return Err(error(StatusCode::BAD_REQUEST, expected));
    };
    session.cycle_id().await;
    let stored = async {
        session.insert("user", &user).await?;
        session.set_owner(&user).await
    };
    stored.await.map_err(IntoResponse::into_response)?;
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

/// Creates the accounts at 1000 each, all or none, only if none exists (one optimistic update of
/// the ten, so two workers doing it at once still give 10000). Each worker does it once, and
/// `again` when Redis lost its data (restarted empty, or flushed).
async fn seed_accounts(s: &AppState, again: bool) -> herd::Result<()> {
    if !again && s.seeded.load(Ordering::Relaxed) {
        return Ok(());
    }
    s.bank
        .update(&ACCOUNTS, |balances: &mut [Option<i64>]| {
            if balances.iter().all(Option::is_none) {
                balances.iter_mut().for_each(|b| *b = Some(INITIAL_BALANCE));
            }
            Ok::<(), std::convert::Infallible>(())
        })
        .await?;
    s.seeded.store(true, Ordering::Relaxed);
    Ok(())
}

/// Why a transfer's update was refused.
enum Refused {
    Funds,
    /// An account does not exist in Redis (it lost its data).
    Missing,
}

#[derive(serde::Deserialize)]
struct Transfer {
    from: String,
    to: String,
    amount: u64,
}

async fn transfer(State(s): State<AppState>, body: Bytes) -> Response {
    let bad = |m: &str| error(StatusCode::BAD_REQUEST, m);
    let Ok(Transfer { from, to, amount }) = serde_json::from_slice(&body) else {
        return bad("expected {\"from\": ACCOUNT, \"to\": ACCOUNT, \"amount\": INTEGER}");
    };
    if !ACCOUNTS.contains(&from.as_str()) || !ACCOUNTS.contains(&to.as_str()) || from == to {
        return bad("from and to must be two different accounts, acct-0 to acct-9");
    }
    if !(1..=MAX_AMOUNT).contains(&amount) {
        return bad("amount must be an integer from 1 to 1000000");
    }
    let amount = amount as i64;
    // A second round only if the accounts were missing: Redis lost them, seed them again.
    for again in [false, true] {
        if let Err(e) = seed_accounts(&s, again).await {
            return e.into_response();
        }
        let pair = [from.as_str(), to.as_str()];
        let moved = s
            .bank
            .update(&pair, |b: &mut [Option<i64>]| match (b[0], b[1]) {
                (Some(x), Some(y)) if x >= amount => {
                    (b[0], b[1]) = (Some(x - amount), Some(y + amount));
                    Ok(())
                }
                (Some(_), Some(_)) => Err(Refused::Funds),
                _ => Err(Refused::Missing),
            });
        return match moved.await {
            Ok(()) => Json(json!({ "ok": true })).into_response(),
            Err(UpdateError::Aborted(Refused::Missing)) if !again => continue,
            Err(UpdateError::Aborted(Refused::Missing)) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the accounts are being recreated, please retry",
            ),
            Err(UpdateError::Aborted(Refused::Funds)) => {
                error(StatusCode::CONFLICT, "insufficient funds")
            }
            // Lost the race too often: busy, not short of funds (409 means that here).
            Err(UpdateError::Failed(e)) if e.is_conflict() => {
                error(StatusCode::SERVICE_UNAVAILABLE, "too busy, please retry")
            }
            Err(UpdateError::Failed(e)) => e.into_response(),
        };
    }
    unreachable!("the loop returns in its second round")
}

async fn accounts(State(s): State<AppState>) -> herd::Result<Json<Value>> {
    seed_accounts(&s, false).await?;
    let mut balances: Vec<Option<i64>> = s.bank.get_many(&ACCOUNTS).await?;
    if balances.iter().all(Option::is_none) {
        seed_accounts(&s, true).await?;
        balances = s.bank.get_many(&ACCOUNTS).await?;
    }
    let map: BTreeMap<&str, i64> = ACCOUNTS
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
    let ms = q.ms.as_deref().and_then(|m| m.parse::<u64>().ok());
    let Some(ms) = ms.filter(|ms| *ms <= MAX_SLOW_MS) else {
        let expected = "expected ?ms=N, N a whole number of milliseconds from 0 to 30000";
        return error(StatusCode::BAD_REQUEST, expected);
    };
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Json(json!({ "slept": ms })).into_response()
}

/// The value of `--NAME VALUE` on the command line, or `default`.
fn flag<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| *a == format!("--{name}")) {
        None => Ok(default),
        Some(i) => (args.get(i + 1).and_then(|v| v.parse().ok()))
            .ok_or_else(|| format!("--{name} needs a valid value (usage: multi_worker [--workers N] [--port P] [--host H])")),
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
