//! The owner index ("log out everywhere") over time, and writes whose outcome is unknown.
//!
//! An owned session's TTL never runs past the time its owner's index lists it until, and the index
//! is pushed forward while the session is used, so "log out everywhere" always finds every live
//! session, and the index never outlives its sessions by more than one idle timeout.
//!
//! The same tests run on a 3-primary Redis Cluster in `session_owners_cluster.rs`.

// `pub(crate)`: the binaries that run this suite on other topologies use it too.
pub(crate) mod support;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Path;
use axum::routing::{get, post};
use axum::{Json, Router};
use herd::{RedisClient, Session, SessionLayer, SessionStore};
use http::{header, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use support::topology::{config, TestRedis, Topology};
use tower::ServiceExt;

/// The Redis this suite runs on. `session_owners_cluster.rs` include this file as a
/// module and declare their own `TOPOLOGY` at their crate root, which is the one the tests read
/// (`crate::TOPOLOGY`); this one is unused there.
#[allow(dead_code)]
const TOPOLOGY: Topology = Topology::Single;

fn routes() -> Router {
    Router::new()
        .route(
            "/login/{user}",
            post(|s: Session, Path(user): Path<String>| async move {
                s.cycle_id().await;
                s.insert("user", &user).await?;
                s.set_owner(&user).await?;
                Ok::<_, herd::Error>(Json(json!({ "user": user })))
            }),
        )
        .route(
            "/user",
            get(|s: Session| async move {
                let user: Option<String> = s.get("user").await?;
                Ok::<_, herd::Error>(Json(json!({ "user": user })))
            }),
        )
        .route(
            "/read-then-write",
            post(|s: Session| async move {
                let n: i64 = s.get("n").await?.unwrap_or(0);
                s.insert("n", n + 1).await?;
                Ok::<_, herd::Error>(Json(json!({ "n": n + 1 })))
            }),
        )
        .route(
            "/incr",
            post(|s: Session| async move {
                Ok::<_, herd::Error>(Json(json!({ "n": s.incr("hits", 1).await? })))
            }),
        )
        .route(
            "/logout",
            post(|s: Session| async move {
                // Read first, as a logout page typically does: the owner is then known, and the
                // session leaves its owner's index in the same round trip.
                let user: Option<String> = s.get("user").await?;
                s.destroy().await;
                Ok::<_, herd::Error>(Json(json!({ "bye": user })))
            }),
        )
}

struct App {
    router: Router,
    client: RedisClient,
}

impl App {
    fn new(redis: &TestRedis, name: &str, idle: Duration) -> App {
        let client = RedisClient::new(config(redis, name)).expect("client");
        let layer = SessionLayer::new(client.clone())
            .with_key(support::test_key())
            .with_secure(false)
            .with_idle_timeout(idle)
            .with_absolute_timeout(Duration::from_secs(3600));
        App {
            router: routes().layer(layer),
            client,
        }
    }

    async fn send(&self, method: &str, path: &str, cookie: Option<&str>) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(c) = cookie {
            req = req.header(header::COOKIE, c);
        }
        let res = self
            .router
            .clone()
            .oneshot(req.body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = res.status();
        let bytes = res.into_body().collect().await.expect("body").to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, body)
    }

    async fn login(&self, user: &str) -> String {
        let req = Request::builder()
            .method("POST")
            .uri(format!("/login/{user}"))
            .body(Body::empty())
            .expect("request");
        let res = self.router.clone().oneshot(req).await.expect("infallible");
        assert_eq!(res.status(), StatusCode::OK);
        res.headers()
            .get(header::SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .expect("login sets a cookie")
            .to_owned()
    }

    fn prefix(&self) -> &str {
        self.client.config().prefix()
    }

    fn session_keys(&self, redis: &TestRedis) -> Vec<String> {
        redis.keys(&format!("{}:s:*", self.prefix()))
    }

    fn index_key(&self, redis: &TestRedis) -> Option<String> {
        redis.keys(&format!("{}:o:*", self.prefix())).pop()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

/// Checks the invariant: every live session of the index's owner is listed with a score at or after
/// the time its key expires.
fn assert_index_covers(redis: &TestRedis, app: &App) {
    let index = app.index_key(redis).expect("the owner's index exists");
    for key in app.session_keys(redis) {
        let id = key
            .rsplit('{')
            .next()
            .and_then(|s| s.strip_suffix('}'))
            .expect("id in the key");
        let pttl: i64 = redis.cmd(&["PTTL", &key]);
        if pttl < 0 {
            continue; // expired between KEYS and PTTL
        }
        let expires = now_ms() + pttl;
        let score: Option<f64> = redis.cmd(&["ZSCORE", &index, id]);
        let score = score.unwrap_or_else(|| panic!("live session {id} is not in its index"));
        assert!(
            score as i64 >= expires - 5,
            "session {id} expires at {expires}, its index entry at {score}"
        );
    }
}

#[tokio::test]
async fn an_owned_session_never_outlives_its_index_entry() {
    let redis = TestRedis::start(crate::TOPOLOGY);
    let idle = Duration::from_millis(2000);
    let app = App::new(&redis, "cover", idle);
    app.login("alice").await;
    assert_index_covers(&redis, &app);
    let index = app.index_key(&redis).expect("index");
    let index_ttl: i64 = redis.cmd(&["PTTL", &index]);
    assert!(
        index_ttl > 0 && index_ttl <= 3500,
        "the index lives at most 7/4 of the idle timeout past the last activity, not until the \
         absolute deadline: {index_ttl} ms"
    );
}

#[tokio::test]
async fn active_sessions_stay_listed_past_their_first_coverage() {
    let redis = TestRedis::start(crate::TOPOLOGY);
    // Coverage without any push forward: 7/4 × 1.2 s = 2.1 s after login.
    let idle = Duration::from_millis(1200);
    let app = App::new(&redis, "active", idle);
    let reader = app.login("alice").await;
    let writer = app.login("alice").await;
    let counter = app.login("alice").await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(4500) {
        let (status, body) = app.send("GET", "/user", Some(&reader)).await;
        assert_eq!(
            (status, &body),
            (StatusCode::OK, &json!({ "user": "alice" })),
            "a session read every 150 ms must stay alive ({:?} after login)",
            started.elapsed()
        );
        let (status, _) = app.send("POST", "/read-then-write", Some(&writer)).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = app.send("POST", "/incr", Some(&counter)).await;
        assert_eq!(status, StatusCode::OK);
        assert_index_covers(&redis, &app);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Wait for the pushes forward running off the request's path, then log out everywhere.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_index_covers(&redis, &app);
    let store = SessionStore::new(app.client.clone());
    assert_eq!(store.destroy_owner("alice").await.expect("destroy"), 3);
    for cookie in [&reader, &writer, &counter] {
        let (_, body) = app.send("GET", "/user", Some(cookie)).await;
        assert_eq!(body, json!({ "user": null }));
    }
    assert!(app.session_keys(&redis).is_empty());
}

#[tokio::test]
async fn the_index_of_idle_sessions_goes_within_one_idle_timeout() {
    let redis = TestRedis::start(crate::TOPOLOGY);
    let idle = Duration::from_millis(1000);
    let app = App::new(&redis, "idle", idle);
    let cookie = app.login("alice").await;
    let index = app.index_key(&redis).expect("index");
    // Let the session idle out.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !app.session_keys(&redis).is_empty() {
        assert!(Instant::now() < deadline, "the session never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left: i64 = redis.cmd(&["PTTL", &index]);
    assert!(
        left <= idle.as_millis() as i64,
        "the index outlives its last session by {left} ms, more than the idle timeout"
    );
    let (_, body) = app.send("GET", "/user", Some(&cookie)).await;
    assert_eq!(body, json!({ "user": null }));
}

#[tokio::test]
async fn logout_takes_the_session_out_of_its_owners_index() {
    let redis = TestRedis::start(crate::TOPOLOGY);
    let app = App::new(&redis, "logout", Duration::from_secs(60));
    let first = app.login("alice").await;
    let _second = app.login("alice").await;
    let index = app.index_key(&redis).expect("index");
    let before: i64 = redis.cmd(&["ZCARD", &index]);
    assert_eq!(before, 2);
    let (status, body) = app.send("POST", "/logout", Some(&first)).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "bye": "alice" })));
    let after: i64 = redis.cmd(&["ZCARD", &index]);
    assert_eq!(after, 1, "the destroyed session left the index");
    assert_index_covers(&redis, &app);
}

/// A handler that buffers a write, then sees its `incr` time out, must not have the buffered write
/// (and the rest of that round trip) sent again after it returns: the outcome of the first send is
/// unknown, and a blind retry could apply it twice.
#[tokio::test]
async fn a_write_whose_outcome_is_unknown_is_not_sent_again_at_commit() {
    if crate::TOPOLOGY != Topology::Single {
        // The latency proxy stands between the app and one server; topologies are covered above.
        return;
    }
    let server = support::RedisServer::start();
    let proxy = support::LatencyProxy::start(server.port());
    let timeout = Duration::from_millis(300);
    let config = herd::Config::builder()
        .redis_url(proxy.url())
        .prefix(support::unique_prefix("unknown"))
        .command_timeout(timeout)
        .connect_timeout(timeout)
        .build()
        .expect("config");
    let client = RedisClient::new(config).expect("client");
    let router = Router::new()
        .route(
            "/both",
            post(|s: Session| async move {
                s.insert("note", "buffered").await?;
                let incr = s.incr("n", 1).await;
                Ok::<_, herd::Error>(Json(json!({ "incr_failed": incr.is_err() })))
            }),
        )
        .layer(
            SessionLayer::new(client.clone())
                .with_key(support::test_key())
                .with_secure(false),
        );
    let send = |cookie: Option<String>| {
        let router = router.clone();
        async move {
            let mut req = Request::builder().method("POST").uri("/both");
            if let Some(c) = cookie {
                req = req.header(header::COOKIE, c);
            }
            let res = router
                .oneshot(req.body(Body::empty()).expect("request"))
                .await
                .expect("infallible");
            let status = res.status();
            let cookie = res
                .headers()
                .get(header::SET_COOKIE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(';').next())
                .map(str::to_owned);
            let bytes = res.into_body().collect().await.expect("body").to_bytes();
            (status, cookie, serde_json::from_slice::<Value>(&bytes).ok())
        }
    };
    let (status, cookie, _) = send(None).await;
    assert_eq!(status, StatusCode::OK);
    let cookie = cookie.expect("a new session");

    server.reset_stats();
    proxy.set_delay(timeout + Duration::from_millis(400));
    let (status, _, body) = send(Some(cookie)).await;
    proxy.set_delay(Duration::ZERO);
    assert_eq!(
        (status, body),
        (StatusCode::OK, Some(json!({ "incr_failed": true }))),
        "the handler saw the failure and answered; nothing is left to send after it"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await; // the delayed round trip lands
    let calls = server.command_calls();
    let sends =
        calls.get("evalsha").copied().unwrap_or(0) + calls.get("eval").copied().unwrap_or(0);
    assert_eq!(
        sends, 1,
        "the save with the increment went out once, not again at commit: {calls:?}"
    );
}
