//! The apps under test: one axum app shape, five ways of keeping a session counter.
//!
//! Every app serves the same routes (absent routes answer 404 and are never loaded):
//!
//! `herd-observed` is `herd` with metrics enabled as under `herd run --metrics` (for the cost of
//! observability).
//!
//! | route | herd | tower-sessions | limit | getset | checked | plain |
//! |---|---|---|---|---|---|---|
//! | `GET /counter` (read + write) | `incr` (1 RT) | get + insert (2 RT) | `HINCRBY`+`EXPIRE` pipelined (1 RT) | `GET` blob + `SET` blob (2 RT) | check-and-`HINCRBY` script (1 RT) | – |
//! | `GET /rmw` (generic read-modify-write) | get + insert (2 RT) | get + insert (2 RT) | – | `GET` + `SET` (2 RT) | `HGETALL` + check-and-`HSET` script (2 RT) | – |
//! | `GET /read` (read-only) | get (1 RT) | get (1 RT) | `HGETALL` (1 RT) | `GET` (1 RT) | `HGETALL` (1 RT) | – |
//! | `GET /untouched` (cookie sent, session not used) | 0 RT | 0 RT | 0 RT | 0 RT | 0 RT | 0 RT |
//! | `GET /limited` (`/untouched` behind herd's `RateLimitLayer`, keyed by the cookie, never over the limit) | 1 RT | – | – | – | – | – |
//!
//! A request without a cookie on `/counter` creates a session (the driver uses this to make its pool
//! of sessions). Each app checks the cookie the way its real counterpart does:
//! * herd: HMAC-signed cookie, verified on first use (herd's default).
//! * tower-sessions 0.14 + tower-sessions-redis-store 0.16 with the README's setup (fred pool of 6,
//!   default unsigned id cookie, default expiry): the peer's cheapest out-of-the-box configuration.
//! * limit / getset: a plain random 128-bit id cookie (`sid`), format-checked, **not signed** — the
//!   floor of what any session layer can cost, not a secure design.
//! * checked: the floor **with herd's guarantees**, written by hand: a signed cookie (the `cookie`
//!   crate's signed jar, the format herd uses), a hash per session with a creation time, an
//!   absolute deadline checked on every use, and every write one script that checks the session
//!   exists and was not cycled away before it writes (no resurrection, no write into a tombstone).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The fixed cookie signing key of the herd app (64 bytes): a benchmark, not a deployment.
const HERD_SECRET: [u8; 64] = [7u8; 64];
/// Idle timeout of every app's sessions (herd's default: 24 h).
const IDLE_SECS: u64 = 24 * 3600;

pub async fn serve(
    app: &str,
    port: u16,
    redis_url: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    if app == "herd-observed" {
        // As `Worker::serve` does under `--metrics`: the request counter around the whole router.
        use tower::Layer as _;
        let router = herd::observe::RequestsTotalLayer.layer(herd_app(redis_url, true).await?);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let service = axum::ServiceExt::<axum::extract::Request>::into_make_service(router);
        axum::serve(listener, service).await?;
        return Ok(());
    }
    let router = match app {
        "herd" => herd_app(redis_url, false).await?,
        "tower-sessions" => tower_sessions_app(redis_url).await?,
        "limit" => limit_app(redis_url).await?,
        "getset" => getset_app(redis_url).await?,
        "checked" => checked_app(redis_url).await?,
        "plain" => plain_app(),
        other => return Err(format!("unknown app `{other}`").into()),
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, router).await?;
    Ok(())
}

async fn untouched() -> &'static str {
    "ok"
}

// ---------------------------------------------------------------------------------------------
// herd

/// herd's app; `observed`: with what `herd run --metrics/--dashboard` turns on in each worker — the
/// Prometheus recorder, the request counter, and the series rendered (and serialized, as for the
/// master) once a second.
async fn herd_app(redis_url: &str, observed: bool) -> Result<Router, Box<dyn std::error::Error>> {
    use herd::{Config, RedisClient, Session, SessionLayer};

    let config = Config::builder()
        .redis_url(redis_url)
        .prefix(if observed { "bench-observed" } else { "bench" })
        .build()?;
    if observed {
        let handle = herd::observe::install_prometheus().map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                handle.run_upkeep();
                let line = serde_json::to_string(&handle.render()).unwrap_or_default();
                std::hint::black_box(line);
            }
        });
    }
    let redis = RedisClient::connect(config).await?;

    async fn counter(session: Session) -> herd::Result<String> {
        Ok(session.incr("counter", 1).await?.to_string())
    }
    async fn rmw(session: Session) -> herd::Result<String> {
        let n: i64 = session.get("n").await?.unwrap_or(0);
        session.insert("n", n + 1).await?;
        Ok((n + 1).to_string())
    }
    async fn read(session: Session) -> herd::Result<String> {
        let n: Option<i64> = session.get("counter").await?;
        Ok(n.unwrap_or(0).to_string())
    }
    async fn stats(State(redis): State<RedisClient>) -> String {
        redis.round_trips().to_string()
    }

    // The limiter's cost per request: one script round trip; the quota is never reached.
    let limiter = herd::RateLimiter::new(
        redis.clone(),
        "bench",
        herd::rate_limit::Quota::per(1_000_000, std::time::Duration::from_secs(1)),
    )?;
    let by_cookie = |req: &axum::http::request::Parts| {
        req.headers
            .get(header::COOKIE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let router = Router::new()
        .route("/counter", get(counter))
        .route("/rmw", get(rmw))
        .route("/read", get(read))
        .route("/untouched", get(untouched))
        .route(
            "/limited",
            get(untouched).layer(herd::RateLimitLayer::new(limiter, by_cookie)),
        )
        .layer(
            SessionLayer::new(redis.clone())
                .with_key(herd::cookie::Key::from(&HERD_SECRET))
                .with_secure(false),
        );
    // Outside the layer: the driver reads herd's own round-trip counter here.
    Ok(router.route("/__round_trips", get(stats)).with_state(redis))
}

// ---------------------------------------------------------------------------------------------
// tower-sessions

async fn tower_sessions_app(redis_url: &str) -> Result<Router, Box<dyn std::error::Error>> {
    use tower_sessions::{Session, SessionManagerLayer};
    use tower_sessions_redis_store::fred::prelude::{ClientLike, Config, Pool};
    use tower_sessions_redis_store::RedisStore;

    // As in tower-sessions-redis-store's README: a fred pool of 6 connections.
    let pool = Pool::new(Config::from_url(redis_url)?, None, None, None, 6)?;
    let _task = pool.connect();
    pool.wait_for_connect().await?;
    let layer = SessionManagerLayer::new(RedisStore::new(pool)).with_secure(false);

    fn internal(e: impl std::fmt::Display) -> Response {
        (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
    }
    async fn counter(session: Session) -> Result<String, Response> {
        let n: i64 = session.get("counter").await.map_err(internal)?.unwrap_or(0);
        session.insert("counter", n + 1).await.map_err(internal)?;
        Ok((n + 1).to_string())
    }
    async fn rmw(session: Session) -> Result<String, Response> {
        let n: i64 = session.get("n").await.map_err(internal)?.unwrap_or(0);
        session.insert("n", n + 1).await.map_err(internal)?;
        Ok((n + 1).to_string())
    }
    async fn read(session: Session) -> Result<String, Response> {
        let n: Option<i64> = session.get("counter").await.map_err(internal)?;
        Ok(n.unwrap_or(0).to_string())
    }

    Ok(Router::new()
        .route("/counter", get(counter))
        .route("/rmw", get(rmw))
        .route("/read", get(read))
        .route("/untouched", get(untouched))
        .layer(layer))
}

// ---------------------------------------------------------------------------------------------
// Hand-written handlers: a plain `sid` cookie (format-checked, NOT signed), one multiplexed
// redis-rs connection.

const SID: &str = "sid";

/// The `sid` cookie's value if it is 32 lowercase hex digits.
fn sid(headers: &HeaderMap) -> Option<String> {
    for value in headers.get_all(header::COOKIE) {
        let Ok(text) = value.to_str() else { continue };
        for pair in text.split(';') {
            if let Some((k, v)) = pair.split_once('=') {
                if k.trim() == SID {
                    let v = v.trim();
                    let ok =
                        v.len() == 32 && v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
                    return ok.then(|| v.to_owned());
                }
            }
        }
    }
    None
}

fn new_sid() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// `body`, with a `Set-Cookie` of the `sid` cookie when a new id was made.
fn with_cookie(body: String, id: Option<&str>) -> Response {
    with_set_cookie(body, id.map(|id| format!("{SID}={id}")))
}

/// `body`, with a `Set-Cookie` of `name=value` (HttpOnly, SameSite=Lax) when there is one.
fn with_set_cookie(body: String, cookie: Option<String>) -> Response {
    let mut res = body.into_response();
    if let Some(cookie) = cookie {
        let value = format!("{cookie}; HttpOnly; SameSite=Lax; Path=/");
        if let Ok(v) = HeaderValue::from_str(&value) {
            res.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    res
}

fn unavailable(e: redis::RedisError) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response()
}

type Conn = redis::aio::MultiplexedConnection;

async fn connect(redis_url: &str) -> Result<Conn, Box<dyn std::error::Error>> {
    Ok(redis::Client::open(redis_url)?
        .get_multiplexed_async_connection()
        .await?)
}

/// The limit: the least Redis work a session counter can do. A hash per session (like herd);
/// `/counter` = `HINCRBY` + `EXPIRE` in one pipeline (1 round trip), `/read` = `HGETALL`.
async fn limit_app(redis_url: &str) -> Result<Router, Box<dyn std::error::Error>> {
    let conn = Arc::new(connect(redis_url).await?);

    async fn counter(State(conn): State<Arc<Conn>>, headers: HeaderMap) -> Response {
        let (id, new) = match sid(&headers) {
            Some(id) => (id, false),
            None => (new_sid(), true),
        };
        let key = format!("limit:s:{id}");
        let mut c = (*conn).clone();
        let r: Result<(i64,), _> = redis::pipe()
            .cmd("HINCRBY")
            .arg(&key)
            .arg("counter")
            .arg(1)
            .cmd("EXPIRE")
            .arg(&key)
            .arg(IDLE_SECS)
            .ignore()
            .query_async(&mut c)
            .await;
        match r {
            Ok((n,)) => with_cookie(n.to_string(), new.then_some(id.as_str())),
            Err(e) => unavailable(e),
        }
    }
    async fn read(State(conn): State<Arc<Conn>>, headers: HeaderMap) -> Response {
        let Some(id) = sid(&headers) else {
            return "0".into_response();
        };
        let mut c = (*conn).clone();
        let r: Result<std::collections::HashMap<String, Vec<u8>>, _> = redis::cmd("HGETALL")
            .arg(format!("limit:s:{id}"))
            .query_async(&mut c)
            .await;
        match r {
            Ok(fields) => {
                let n: i64 = fields
                    .get("counter")
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                    .unwrap_or(0);
                n.to_string().into_response()
            }
            Err(e) => unavailable(e),
        }
    }

    Ok(Router::new()
        .route("/counter", get(counter))
        .route("/read", get(read))
        .route("/untouched", get(untouched))
        .with_state(conn))
}

/// The generic pattern of blob-based session stores: the whole session as one JSON string;
/// read-modify-write = `GET` + `SET ... EX` (2 round trips), read = `GET`.
async fn getset_app(redis_url: &str) -> Result<Router, Box<dyn std::error::Error>> {
    use serde_json::{Map, Value};
    let conn = Arc::new(connect(redis_url).await?);

    async fn load(c: &mut Conn, key: &str) -> Result<Map<String, Value>, Response> {
        let blob: Option<Vec<u8>> = redis::cmd("GET")
            .arg(key)
            .query_async(c)
            .await
            .map_err(unavailable)?;
        Ok(blob
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default())
    }
    async fn bump(conn: &Conn, headers: &HeaderMap, field: &str) -> Response {
        let (id, new) = match sid(headers) {
            Some(id) => (id, false),
            None => (new_sid(), true),
        };
        let key = format!("getset:s:{id}");
        let mut c = conn.clone();
        let mut data = if new {
            Map::new()
        } else {
            match load(&mut c, &key).await {
                Ok(d) => d,
                Err(res) => return res,
            }
        };
        let n = data.get(field).and_then(Value::as_i64).unwrap_or(0) + 1;
        data.insert(field.to_owned(), n.into());
        let blob = serde_json::to_vec(&data).unwrap_or_default();
        let r: Result<(), _> = redis::cmd("SET")
            .arg(&key)
            .arg(blob)
            .arg("EX")
            .arg(IDLE_SECS)
            .query_async(&mut c)
            .await;
        match r {
            Ok(()) => with_cookie(n.to_string(), new.then_some(id.as_str())),
            Err(e) => unavailable(e),
        }
    }
    async fn counter(State(conn): State<Arc<Conn>>, headers: HeaderMap) -> Response {
        bump(&conn, &headers, "counter").await
    }
    async fn rmw(State(conn): State<Arc<Conn>>, headers: HeaderMap) -> Response {
        bump(&conn, &headers, "n").await
    }
    async fn read(State(conn): State<Arc<Conn>>, headers: HeaderMap) -> Response {
        let Some(id) = sid(&headers) else {
            return "0".into_response();
        };
        let mut c = (*conn).clone();
        match load(&mut c, &format!("getset:s:{id}")).await {
            Ok(data) => data
                .get("counter")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                .to_string()
                .into_response(),
            Err(res) => res,
        }
    }

    Ok(Router::new()
        .route("/counter", get(counter))
        .route("/rmw", get(rmw))
        .route("/read", get(read))
        .route("/untouched", get(untouched))
        .with_state(conn))
}

// ---------------------------------------------------------------------------------------------
// The floor with herd's guarantees, by hand.

/// `$c` = creation time (unix ms); a session is dead 7 days after it (the absolute timeout), and
/// the key's TTL is the idle timeout. A tombstone (`$t`) is an id that was cycled away. The idle
/// refresh herd does once per tenth of the idle timeout never comes due within a benchmark run and
/// is left out.
const CHECKED_WRITE: &str = r"
local m = redis.call('HMGET', KEYS[1], '$c', '$t')
if not m[1] or m[2] then return false end
if ARGV[2] == '' then return m[1] .. ' ' .. redis.call('HINCRBY', KEYS[1], ARGV[1], 1) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return m[1] .. ' ' .. ARGV[2]
";
const CHECKED_COOKIE: &str = "checked";
const ABSOLUTE_MS: u64 = 7 * 24 * 3600 * 1000;

struct Checked {
    conn: Conn,
    key: herd::cookie::Key,
    write_sha: String,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Alive: created, and not past the absolute deadline.
fn checked_alive(created: &[u8]) -> bool {
    std::str::from_utf8(created)
        .ok()
        .and_then(|c| c.parse::<u64>().ok())
        .is_some_and(|c| c + ABSOLUTE_MS > now_ms())
}

async fn checked_app(redis_url: &str) -> Result<Router, Box<dyn std::error::Error>> {
    use herd::cookie::{Cookie, CookieJar};

    let mut conn = connect(redis_url).await?;
    let write_sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(CHECKED_WRITE)
        .query_async(&mut conn)
        .await?;
    let state = Arc::new(Checked {
        conn,
        key: herd::cookie::Key::from(&HERD_SECRET),
        write_sha,
    });

    /// The verified session id of the request, if any.
    fn verified(app: &Checked, headers: &HeaderMap) -> Option<String> {
        let mut jar = CookieJar::new();
        for value in headers.get_all(header::COOKIE) {
            for c in Cookie::split_parse(value.to_str().ok()?).flatten() {
                jar.add_original(c.into_owned());
            }
        }
        let id = jar.signed(&app.key).get(CHECKED_COOKIE)?.value().to_owned();
        let ok = id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        ok.then_some(id)
    }
    fn signed_cookie(app: &Checked, id: String) -> String {
        let mut jar = CookieJar::new();
        jar.signed_mut(&app.key)
            .add(Cookie::new(CHECKED_COOKIE, id));
        let value = jar.get(CHECKED_COOKIE).map(|c| c.value().to_owned());
        format!("{CHECKED_COOKIE}={}", value.unwrap_or_default())
    }
    /// The session's fields, or `None` when it does not exist, ended or was cycled away.
    async fn load(app: &Checked, id: &str) -> Result<Option<Vec<(Vec<u8>, Vec<u8>)>>, Response> {
        let mut c = app.conn.clone();
        let fields: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(format!("checked:s:{id}"))
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        let created = fields.iter().find(|(f, _)| f == b"$c").map(|(_, v)| v);
        let cycled = fields.iter().any(|(f, _)| f == b"$t");
        Ok((!cycled && created.is_some_and(|c| checked_alive(c))).then_some(fields))
    }
    /// The checked write: `Ok(None)` when the session ended meanwhile (nothing written).
    async fn write(
        app: &Checked,
        id: &str,
        field: &str,
        value: Option<i64>,
    ) -> Result<Option<i64>, Response> {
        let mut c = app.conn.clone();
        let reply: Option<String> = redis::cmd("EVALSHA")
            .arg(&app.write_sha)
            .arg(1)
            .arg(format!("checked:s:{id}"))
            .arg(field)
            .arg(value.map(|v| v.to_string()).unwrap_or_default())
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(reply.and_then(|r| {
            let (created, n) = r.split_once(' ')?;
            checked_alive(created.as_bytes()).then(|| n.parse().ok())?
        }))
    }
    /// A new session holding `field = 1`.
    async fn create(app: &Checked, field: &str) -> Response {
        let id = new_sid();
        let key = format!("checked:s:{id}");
        let mut c = app.conn.clone();
        let r: Result<(), _> = redis::pipe()
            .cmd("HSET")
            .arg(&key)
            .arg("$c")
            .arg(now_ms())
            .arg(field)
            .arg(1)
            .ignore()
            .cmd("EXPIRE")
            .arg(&key)
            .arg(IDLE_SECS)
            .ignore()
            .query_async(&mut c)
            .await;
        match r {
            Ok(()) => with_set_cookie("1".into(), Some(signed_cookie(app, id))),
            Err(e) => unavailable(e),
        }
    }
    fn gone() -> Response {
        (StatusCode::CONFLICT, "the session ended").into_response()
    }

    async fn counter(State(app): State<Arc<Checked>>, headers: HeaderMap) -> Response {
        let Some(id) = verified(&app, &headers) else {
            return create(&app, "counter").await;
        };
        match write(&app, &id, "counter", None).await {
            Ok(Some(n)) => n.to_string().into_response(),
            Ok(None) => gone(),
            Err(res) => res,
        }
    }
    async fn rmw(State(app): State<Arc<Checked>>, headers: HeaderMap) -> Response {
        let Some(id) = verified(&app, &headers) else {
            return create(&app, "n").await;
        };
        let fields = match load(&app, &id).await {
            Ok(Some(fields)) => fields,
            Ok(None) => return gone(),
            Err(res) => return res,
        };
        let n: i64 = fields
            .iter()
            .find(|(f, _)| f == b"n")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
            .unwrap_or(0);
        match write(&app, &id, "n", Some(n + 1)).await {
            Ok(Some(n)) => n.to_string().into_response(),
            Ok(None) => gone(),
            Err(res) => res,
        }
    }
    async fn read(State(app): State<Arc<Checked>>, headers: HeaderMap) -> Response {
        let Some(id) = verified(&app, &headers) else {
            return "0".into_response();
        };
        match load(&app, &id).await {
            Ok(fields) => fields
                .and_then(|fields| {
                    let (_, v) = fields.iter().find(|(f, _)| f == b"counter")?;
                    std::str::from_utf8(v).ok()?.parse::<i64>().ok()
                })
                .unwrap_or(0)
                .to_string()
                .into_response(),
            Err(res) => res,
        }
    }

    Ok(Router::new()
        .route("/counter", get(counter))
        .route("/rmw", get(rmw))
        .route("/read", get(read))
        .route("/untouched", get(untouched))
        .with_state(state))
}

// ---------------------------------------------------------------------------------------------
// plain axum

fn plain_app() -> Router {
    Router::new().route("/untouched", get(untouched))
}
