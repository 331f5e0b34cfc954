//! The session layer against a real Redis: cookies, concurrency, expiry, owners, faults, round trips.
//!
//! The same suite runs on a 3-primary Redis Cluster in `session_cluster.rs` and through Sentinel in
//! `session_sentinel.rs` (see `support::topology`).

// `pub(crate)`: the binaries that run this suite on other topologies use it too.
pub(crate) mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Query};
use axum::routing::{get, post};
use axum::{Json, Router};
use herd::{RedisClient, Session, SessionLayer};
use http::{header, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use support::topology::{config, TestRedis as RedisServer, Topology};
use tower::ServiceExt;

/// The Redis this suite runs on. `session_cluster.rs` and `session_sentinel.rs` include this file as a
/// module and declare their own `TOPOLOGY` at their crate root, which is the one the tests read
/// (`crate::TOPOLOGY`); this one is unused there.
#[allow(dead_code)]
const TOPOLOGY: Topology = Topology::Single;

/// A test app: a router with a session layer and the client behind it.
#[derive(Clone)]
struct App {
    router: Router,
    client: RedisClient,
}

struct Reply {
    status: StatusCode,
    set_cookie: Vec<String>,
    retry_after: Option<String>,
    body: Value,
}

impl Reply {
    /// `name=value` of the session cookie set by this reply.
    fn cookie(&self) -> Option<String> {
        self.set_cookie
            .iter()
            .find(|c| !c.contains("Max-Age=0"))
            .and_then(|c| c.split(';').next())
            .map(str::to_owned)
    }
}

#[derive(serde::Deserialize)]
struct SlowQuery {
    ms: u64,
}

fn routes() -> Router {
    Router::new()
        .route("/untouched", get(|| async { "ok" }))
        .route(
            "/get/{key}",
            get(|s: Session, Path(key): Path<String>| async move {
                let v: Option<Value> = s.get(&key).await?;
                Ok::<_, herd::Error>(Json(json!({ "value": v })))
            }),
        )
        .route(
            "/set/{key}/{value}",
            post(
                |s: Session, Path((key, value)): Path<(String, String)>| async move {
                    s.insert(&key, value).await?;
                    Ok::<_, herd::Error>(Json(json!({ "ok": true })))
                },
            ),
        )
        .route(
            "/big/{key}/{size}",
            post(
                |s: Session, Path((key, size)): Path<(String, usize)>| async move {
                    s.insert(&key, "x".repeat(size)).await?;
                    Ok::<_, herd::Error>(Json(json!({ "ok": true })))
                },
            ),
        )
        .route(
            "/incr/{key}",
            get(|s: Session, Path(key): Path<String>| async move {
                let n = s.incr(&key, 1).await?;
                Ok::<_, herd::Error>(Json(json!({ "value": n })))
            }),
        )
        .route(
            "/incr-then-owner/{key}",
            get(|s: Session, Path(key): Path<String>| async move {
                let n = s.incr(&key, 1).await?;
                Ok::<_, herd::Error>(Json(json!({ "value": n, "owner": s.owner().await? })))
            }),
        )
        .route(
            // A set and an incr in one save: the save script, not the field-write script.
            "/set-incr-then-owner/{key}",
            get(|s: Session, Path(key): Path<String>| async move {
                s.insert("other", 1).await?;
                let n = s.incr(&key, 1).await?;
                Ok::<_, herd::Error>(Json(json!({ "value": n, "owner": s.owner().await? })))
            }),
        )
        .route(
            "/read-then-write/{key}",
            post(|s: Session, Path(key): Path<String>| async move {
                let n: i64 = s.get(&key).await?.unwrap_or(0);
                s.insert(&key, n + 1).await?;
                Ok::<_, herd::Error>(Json(json!({ "value": n + 1 })))
            }),
        )
        .route(
            "/slow-read-write",
            post(|s: Session, Query(q): Query<SlowQuery>| async move {
                let _: Option<Value> = s.get("user").await?;
                tokio::time::sleep(Duration::from_millis(q.ms)).await;
                s.insert("late", "written after a pause").await?;
                Ok::<_, herd::Error>(Json(json!({ "ok": true })))
            }),
        )
        .route(
            "/slow-blind-write",
            post(|s: Session, Query(q): Query<SlowQuery>| async move {
                tokio::time::sleep(Duration::from_millis(q.ms)).await;
                s.insert("late", "written after a pause").await?;
                Ok::<_, herd::Error>(Json(json!({ "ok": true })))
            }),
        )
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
            "/cycle",
            post(|s: Session| async move {
                s.cycle_id().await;
                Json(json!({ "ok": true }))
            }),
        )
        .route(
            "/logout",
            post(|s: Session| async move {
                s.destroy().await;
                Json(json!({ "ok": true }))
            }),
        )
        .route(
            "/remove/{key}",
            post(|s: Session, Path(key): Path<String>| async move {
                s.remove(&key).await?;
                Ok::<_, herd::Error>(Json(json!({ "ok": true })))
            }),
        )
        .route(
            "/remove-then-get/{key}",
            post(|s: Session, Path(key): Path<String>| async move {
                s.remove(&key).await?;
                let v: Option<Value> = s.get(&key).await?;
                Ok::<_, herd::Error>(Json(json!({ "value": v })))
            }),
        )
        .route(
            "/clear",
            post(|s: Session| async move {
                s.clear().await;
                Json(json!({ "ok": true }))
            }),
        )
        .route(
            "/clear-then-set/{key}/{value}",
            post(
                |s: Session, Path((key, value)): Path<(String, String)>| async move {
                    s.clear().await;
                    s.insert(&key, value).await?;
                    Ok::<_, herd::Error>(Json(json!({ "entries": s.entries().await? })))
                },
            ),
        )
        .route(
            "/entries",
            get(|s: Session| async move {
                Ok::<_, herd::Error>(Json(json!({ "entries": s.entries().await? })))
            }),
        )
        .route(
            "/change-then-entries",
            post(|s: Session| async move {
                s.insert("added", true).await?;
                s.remove("seed").await?;
                Ok::<_, herd::Error>(Json(json!({ "entries": s.entries().await? })))
            }),
        )
        .route(
            "/owner",
            get(|s: Session| async move {
                Ok::<_, herd::Error>(Json(json!({ "owner": s.owner().await? })))
            }),
        )
        .route(
            "/set-owner-then-read/{owner}",
            post(|s: Session, Path(owner): Path<String>| async move {
                s.set_owner(&owner).await?;
                Ok::<_, herd::Error>(Json(json!({ "owner": s.owner().await? })))
            }),
        )
        .route(
            "/is-empty",
            get(|s: Session| async move {
                Ok::<_, herd::Error>(Json(json!({ "empty": s.is_empty().await? })))
            }),
        )
        .route(
            "/incr-twice/{key}",
            get(|s: Session, Path(key): Path<String>| async move {
                s.incr(&key, 1).await?;
                let n = s.incr(&key, 1).await?;
                Ok::<_, herd::Error>(Json(json!({ "value": n })))
            }),
        )
        .route(
            "/incr-then-set/{key}",
            post(|s: Session, Path(key): Path<String>| async move {
                let n = s.incr(&key, 1).await?;
                s.insert("after", n).await?;
                Ok::<_, herd::Error>(Json(json!({ "value": n })))
            }),
        )
        .route(
            "/remember-me/{ms}",
            post(|s: Session, Path(ms): Path<u64>| async move {
                let _: Option<Value> = s.get("user").await?;
                s.set_idle_timeout(Duration::from_millis(ms)).await;
                s.incr("visits", 1).await?;
                s.insert("remembered", true).await?;
                Ok::<_, herd::Error>(Json(json!({ "ok": true })))
            }),
        )
        .route(
            "/cycle-then-write",
            post(|s: Session| async move {
                let _: Option<Value> = s.get("user").await?;
                s.cycle_id().await;
                s.incr("visits", 1).await?;
                s.insert("after-cycle", true).await?;
                Ok::<_, herd::Error>(Json(json!({ "ok": true })))
            }),
        )
        .route(
            "/slow-incr",
            post(|s: Session, Query(q): Query<SlowQuery>| async move {
                tokio::time::sleep(Duration::from_millis(q.ms)).await;
                let n = s.incr("late", 1).await?;
                Ok::<_, herd::Error>(Json(json!({ "value": n })))
            }),
        )
        .route(
            "/idle/{ms}",
            post(|s: Session, Path(ms): Path<u64>| async move {
                s.set_idle_timeout(Duration::from_millis(ms)).await;
                Json(json!({ "ok": true }))
            }),
        )
}

impl App {
    fn new(server: &RedisServer, name: &str) -> App {
        App::with(server, name, |l| l)
    }

    fn with(server: &RedisServer, name: &str, f: impl FnOnce(SessionLayer) -> SessionLayer) -> App {
        let client = RedisClient::new(config(server, name)).expect("client");
        App::from_client(client, f)
    }

    fn from_client(client: RedisClient, f: impl FnOnce(SessionLayer) -> SessionLayer) -> App {
        let layer = f(SessionLayer::new(client.clone())
            .with_key(support::test_key())
            .with_secure(false));
        App {
            router: routes().layer(layer),
            client,
        }
    }

    async fn send(&self, method: &str, path: &str, cookie: Option<&str>) -> Reply {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(c) = cookie {
            req = req.header(header::COOKIE, c);
        }
        self.send_req(req.body(Body::empty()).expect("request"))
            .await
    }

    async fn send_req(&self, req: Request<Body>) -> Reply {
        let res = self.router.clone().oneshot(req).await.expect("infallible");
        let status = res.status();
        let set_cookie = res
            .headers()
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap_or_default().to_owned())
            .collect();
        let retry_after = res
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        let bytes = res.into_body().collect().await.expect("body").to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Reply {
            status,
            set_cookie,
            retry_after,
            body,
        }
    }

    fn session_keys(&self, server: &RedisServer) -> Vec<String> {
        server.keys(&format!("{}:s:*", self.client.config().prefix()))
    }

    /// The one session hash of this app, field → value as Redis holds it.
    fn only_session(&self, server: &RedisServer) -> (String, HashMap<String, String>) {
        let keys = self.session_keys(server);
        assert_eq!(keys.len(), 1, "expected one session: {keys:?}");
        let fields: HashMap<String, String> = server.cmd(&["HGETALL", &keys[0]]);
        (keys[0].clone(), fields)
    }

    /// Sends a request and counts the client's round trips while it runs.
    async fn counted(&self, method: &str, path: &str, cookie: Option<&str>) -> (u64, Reply) {
        let before = self.client.round_trips();
        let r = self.send(method, path, cookie).await;
        (self.client.round_trips() - before, r)
    }
}

/// Part `n` of a session's timing record `$c` (`created:touched:idle:indexed`), `None` if empty.
fn timing_part(fields: &HashMap<String, String>, n: usize) -> Option<String> {
    fields
        .get("$c")
        .and_then(|c| c.split(':').nth(n))
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
}

/// The user fields of a session hash (without herd's `$` meta fields).
fn user_fields(fields: &HashMap<String, String>) -> HashMap<&str, &str> {
    fields
        .iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// Creates a session with `key=value` and returns its cookie.
async fn new_session(app: &App) -> String {
    let r = app.send("POST", "/set/seed/1", None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.cookie().expect("a new session sets a cookie")
}

#[tokio::test]
async fn cookie_round_trip_and_attributes() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::new(&server, "roundtrip");
    let r = app.send("POST", "/set/color/blue", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.set_cookie.len(), 1);
    let set = &r.set_cookie[0];
    assert!(set.starts_with("herd_session="), "{set}");
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Lax") && set.contains("Path=/"));
    assert!(
        !set.contains("Secure"),
        "with_secure(false) must drop Secure: {set}"
    );
    let cookie = r.cookie().expect("cookie");

    let r = app.send("GET", "/get/color", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "value": "blue" }));
    assert!(
        r.set_cookie.is_empty(),
        "no Set-Cookie for an existing session"
    );
    let r = app.send("POST", "/set/size/xl", Some(&cookie)).await;
    assert!(
        r.set_cookie.is_empty(),
        "no Set-Cookie for a write to an existing session"
    );
    let r = app.send("GET", "/get/size", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "value": "xl" }));
    // The raw cookie value never appears in a key; the key holds only the verified id.
    let value = cookie.split_once('=').map(|(_, v)| v).unwrap_or_default();
    let keys = app.session_keys(&server);
    assert_eq!(keys.len(), 1);
    assert!(!keys[0].contains(value));
    assert!(value.ends_with(&keys[0][keys[0].len() - 33..keys[0].len() - 1]));
}

#[tokio::test]
async fn secure_defaults_and_host_prefix() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let client = RedisClient::new(config(&server, "secure")).expect("client");
    let app = App {
        router: routes().layer(SessionLayer::new(client.clone()).with_key(support::test_key())),
        client: client.clone(),
    };
    let r = app.send("POST", "/set/a/1", None).await;
    let set = &r.set_cookie[0];
    assert!(set.contains("Secure") && set.contains("HttpOnly") && set.contains("SameSite=Lax"));
    let app = App {
        router: routes().layer(
            SessionLayer::new(client.clone())
                .with_key(support::test_key())
                .with_host_prefix(true)
                .with_secure(false),
        ),
        client,
    };
    let r = app.send("POST", "/set/a/1", None).await;
    let set = &r.set_cookie[0];
    assert!(set.starts_with("__Host-herd_session="), "{set}");
    assert!(set.contains("Secure") && set.contains("Path=/") && !set.contains("Domain"));
}

#[tokio::test]
async fn tampered_cookies_are_anonymous_never_5xx_and_create_nothing() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::new(&server, "tamper");
    let cookie = new_session(&app).await;
    let value = cookie
        .split_once('=')
        .map(|(_, v)| v.to_owned())
        .unwrap_or_default();
    let keys_before = server.dbsize();

    let mut flipped = value.clone().into_bytes();
    flipped[10] = if flipped[10] == b'A' { b'B' } else { b'A' };
    let mut flipped_id = value.clone().into_bytes();
    let last = flipped_id.len() - 1;
    flipped_id[last] = if flipped_id[last] == b'0' { b'1' } else { b'0' };
    let id = &value[44..];
    let other_key = cookie::Key::generate();
    let mut jar = cookie::CookieJar::new();
    jar.signed_mut(&other_key)
        .add(cookie::Cookie::new("herd_session", id.to_owned()));
    let forged = jar
        .get("herd_session")
        .map(|c| c.value().to_owned())
        .unwrap_or_default();
    let variants: Vec<(&str, String)> = vec![
        (
            "flipped signature byte",
            String::from_utf8(flipped).unwrap_or_default(),
        ),
        (
            "flipped id byte",
            String::from_utf8(flipped_id).unwrap_or_default(),
        ),
        ("truncated", value[..value.len() - 5].to_owned()),
        ("signature only", value[..44].to_owned()),
        (
            "multibyte at the signature boundary",
            format!("{}é{}", &value[..43], &value[45..]),
        ),
        ("10 KB", "A".repeat(10 * 1024)),
        ("empty", String::new()),
        ("unsigned id", id.to_owned()),
        ("signed with another key", forged),
        ("hostile id", format!("{}*{{x}}\\r\\n", &value[..44])),
    ];
    for (what, bad) in &variants {
        let header = format!("herd_session={bad}");
        let mut req = Request::builder().method("GET").uri("/get/seed");
        req = req.header(header::COOKIE, header.as_bytes());
        let r = app.send_req(req.body(Body::empty()).expect("req")).await;
        assert_eq!(r.status, StatusCode::OK, "{what}: {:?}", r.body);
        assert_eq!(
            r.body,
            json!({ "value": null }),
            "{what}: the forged cookie was honoured"
        );
        assert!(
            r.set_cookie.is_empty(),
            "{what}: a read must not set a cookie"
        );
    }
    assert_eq!(
        server.dbsize(),
        keys_before,
        "a read with a bad cookie created a key"
    );

    // A write with a bad cookie gets a fresh session with a fresh id, never the claimed one.
    for (what, bad) in &variants {
        let r = app
            .send("GET", "/incr/n", Some(&format!("herd_session={bad}")))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{what}");
        assert_eq!(r.body, json!({ "value": 1 }), "{what}");
        let fresh = r.cookie().expect("fresh cookie");
        assert_ne!(fresh, format!("herd_session={bad}"));
    }
    // Non-UTF-8 bytes in the Cookie header: ignored.
    let req = Request::builder()
        .uri("/get/seed")
        .header(
            header::COOKIE,
            http::HeaderValue::from_bytes(b"herd_session=\xff\xfe").expect("bytes"),
        )
        .body(Body::empty())
        .expect("req");
    let r = app.send_req(req).await;
    assert_eq!(r.status, StatusCode::OK);
    // The genuine cookie still works.
    let r = app.send("GET", "/get/seed", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "value": "1" }));
}

#[tokio::test]
async fn concurrent_incr_on_one_session_is_exact() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::new(&server, "incr");
    let cookie = new_session(&app).await;
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let app = app.clone();
            let cookie = cookie.clone();
            tokio::spawn(async move {
                let r = app.send("GET", "/incr/hits", Some(&cookie)).await;
                assert_eq!(r.status, StatusCode::OK);
                r.body["value"].as_i64().expect("number")
            })
        })
        .collect();
    let mut seen = HashSet::new();
    for t in tasks {
        assert!(
            seen.insert(t.await.expect("task")),
            "a value was handed out twice"
        );
    }
    assert_eq!(seen.len(), 200);
    assert_eq!(seen.iter().max(), Some(&200));
    let r = app.send("GET", "/get/hits", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "value": 200 }));
}

#[tokio::test]
async fn concurrent_writes_of_different_keys_all_survive() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::new(&server, "fields");
    let cookie = new_session(&app).await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let router = app.router.clone();
        let cookie = cookie.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::builder()
                .method("POST")
                .uri(format!("/set/field{i}/v{i}"))
                .header(header::COOKIE, cookie)
                .body(Body::empty())
                .expect("req");
            router.oneshot(req).await.expect("infallible").status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), StatusCode::OK);
    }
    for i in 0..100 {
        let r = app
            .send("GET", &format!("/get/field{i}"), Some(&cookie))
            .await;
        assert_eq!(r.body, json!({ "value": format!("v{i}") }), "field{i} lost");
    }
}

#[tokio::test]
async fn logout_racing_a_slow_writer_never_resurrects() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::new(&server, "race");
    let cookie = {
        let r = app.send("POST", "/login/alice", None).await;
        r.cookie().expect("cookie")
    };
    assert_eq!(app.session_keys(&server).len(), 1);

    // The slow request read the session, then logout lands, then it tries to save.
    let slow = {
        let router = app.router.clone();
        let cookie = cookie.clone();
        tokio::spawn(async move {
            let req = Request::builder()
                .method("POST")
                .uri("/slow-read-write?ms=400")
                .header(header::COOKIE, cookie)
                .body(Body::empty())
                .expect("req");
            router.oneshot(req).await.expect("infallible")
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = app.send("POST", "/logout", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.set_cookie.iter().any(|c| c.contains("Max-Age=0")),
        "logout clears the cookie"
    );
    let slow = slow.await.expect("task");
    assert_eq!(
        slow.status(),
        StatusCode::CONFLICT,
        "the late save must be refused, not reported as done"
    );
    assert!(
        app.session_keys(&server).is_empty(),
        "the destroyed session came back"
    );
    let r = app.send("GET", "/get/user", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "value": null }));

    // A slow *blind* writer: its change goes to a fresh session, the old id stays dead.
    let r = app.send("POST", "/login/bob", None).await;
    let cookie = r.cookie().expect("cookie");
    let old_key = app.session_keys(&server).pop().expect("bob's session");
    let slow = {
        let router = app.router.clone();
        let cookie = cookie.clone();
        tokio::spawn(async move {
            let req = Request::builder()
                .method("POST")
                .uri("/slow-blind-write?ms=300")
                .header(header::COOKIE, cookie)
                .body(Body::empty())
                .expect("req");
            router.oneshot(req).await.expect("infallible")
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    app.send("POST", "/logout", Some(&cookie)).await;
    let slow = slow.await.expect("task");
    assert_eq!(slow.status(), StatusCode::OK);
    assert!(
        slow.headers().get(header::SET_COOKIE).is_some(),
        "the fresh session gets a cookie"
    );
    let keys = app.session_keys(&server);
    assert_eq!(keys.len(), 1);
    assert_ne!(keys[0], old_key, "the destroyed id was resurrected");
    let r = app.send("GET", "/get/user", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "value": null }));
}

#[tokio::test]
async fn cycle_id_moves_data_and_kills_the_old_id() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::new(&server, "cycle");
    let old = new_session(&app).await;
    app.send("POST", "/set/cart/3-items", Some(&old)).await;
    let r = app.send("POST", "/login/carol", Some(&old)).await;
    assert_eq!(r.status, StatusCode::OK);
    let new = r.cookie().expect("login sets a new cookie");
    assert_ne!(new, old);
    assert_eq!(
        live_sessions(&app, &server).len(),
        1,
        "the old session must be gone"
    );
    // What stays under the old id is a tombstone: no data, no pointer to the new id, one minute.
    let tombstone = app
        .session_keys(&server)
        .into_iter()
        .find(|k| server.cmd::<i64>(&["HEXISTS", k, "$c"]) == 0)
        .expect("a tombstone under the old id");
    let fields: HashMap<String, String> = server.cmd(&["HGETALL", &tombstone]);
    assert_eq!(fields.keys().collect::<Vec<_>>(), vec!["$t"], "{fields:?}");
    let pttl: i64 = server.cmd(&["PTTL", &tombstone]);
    assert!((1..=60_000).contains(&pttl), "tombstone TTL {pttl}");
    let r = app.send("GET", "/get/cart", Some(&new)).await;
    assert_eq!(
        r.body,
        json!({ "value": "3-items" }),
        "data kept across the cycle"
    );
    let r = app.send("GET", "/get/user", Some(&new)).await;
    assert_eq!(r.body, json!({ "value": "carol" }));
    let r = app.send("GET", "/get/cart", Some(&old)).await;
    assert_eq!(
        r.status,
        StatusCode::CONFLICT,
        "the old cookie gains nothing: {:?}",
        r.body
    );
    assert!(r.set_cookie.is_empty(), "{:?}", r.set_cookie);
    // A bare cycle (no other change) also works and moves the data.
    let r = app.send("POST", "/cycle", Some(&new)).await;
    let newer = r.cookie().expect("cycled cookie");
    let r = app.send("GET", "/get/cart", Some(&newer)).await;
    assert_eq!(r.body, json!({ "value": "3-items" }));
    let r = app.send("GET", "/get/cart", Some(&new)).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    // A logout carrying the cycled-away id deletes neither the tombstone nor the new session.
    let r = app.send("POST", "/logout", Some(&new)).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert!(r.set_cookie.is_empty(), "{:?}", r.set_cookie);
    let r = app.send("GET", "/get/cart", Some(&newer)).await;
    assert_eq!(r.body, json!({ "value": "3-items" }));
}

#[tokio::test]
async fn idle_timeout_expires_and_reads_keep_a_session_alive() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::with(&server, "idle", |l| {
        l.with_idle_timeout(Duration::from_millis(1500))
    });
    let idle = new_session(&app).await;
    let active = new_session(&app).await;
    // Keep `active` busy with read-only requests for longer than the idle timeout.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(3000) {
        let r = app.send("GET", "/get/seed", Some(&active)).await;
        assert_eq!(r.body, json!({ "value": "1" }), "an active session expired");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let r = app.send("GET", "/get/seed", Some(&idle)).await;
    assert_eq!(
        r.body,
        json!({ "value": null }),
        "the idle session did not expire"
    );
    let ttl: i64 = server.cmd(&["PTTL", &app.session_keys(&server)[0]]);
    assert!(ttl > 0 && ttl <= 1500, "TTL {ttl}");
}

#[tokio::test]
async fn absolute_timeout_is_not_extended_by_activity() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::with(&server, "absolute", |l| {
        l.with_idle_timeout(Duration::from_secs(60))
            .with_absolute_timeout(Duration::from_millis(1500))
    });
    let cookie = new_session(&app).await;
    let start = Instant::now();
    let mut expired_at = None;
    while start.elapsed() < Duration::from_secs(4) {
        let r = app.send("POST", "/read-then-write/n", Some(&cookie)).await;
        if r.status != StatusCode::OK || r.set_cookie.iter().any(|c| !c.contains("Max-Age=0")) {
            // The session ended: the write either was refused or went to a fresh session.
            expired_at = Some(start.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let expired_at = expired_at.expect("activity kept the session alive past its absolute timeout");
    assert!(
        expired_at >= Duration::from_millis(1200),
        "ended early: {expired_at:?}"
    );
    let r = app.send("GET", "/get/seed", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "value": null }));
}

#[tokio::test]
async fn log_out_everywhere() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::new(&server, "owner");
    let mut alice = Vec::new();
    for _ in 0..3 {
        alice.push(
            app.send("POST", "/login/alice", None)
                .await
                .cookie()
                .expect("cookie"),
        );
    }
    let bob = app
        .send("POST", "/login/bob", None)
        .await
        .cookie()
        .expect("cookie");
    let store = herd::SessionStore::new(app.client.clone());
    let before = app.client.round_trips();
    assert_eq!(store.destroy_owner("alice").await.expect("destroy"), 3);
    assert_eq!(app.client.round_trips() - before, 2);
    for c in &alice {
        let r = app.send("GET", "/get/user", Some(c)).await;
        assert_eq!(r.body, json!({ "value": null }));
    }
    let r = app.send("GET", "/get/user", Some(&bob)).await;
    assert_eq!(r.body, json!({ "value": "bob" }));
    // The index never outlives its sessions: it has a TTL no longer than the absolute timeout.
    let index_keys = server.keys(&format!("{}:o:*", app.client.config().prefix()));
    assert_eq!(
        index_keys.len(),
        1,
        "only bob's index remains: {index_keys:?}"
    );
    let ttl: i64 = server.cmd(&["PTTL", &index_keys[0]]);
    assert!(ttl > 0 && ttl <= 7 * 24 * 3600 * 1000, "index TTL {ttl}");
    assert_eq!(store.destroy_owner("nobody").await.expect("destroy"), 0);
}

#[tokio::test]
async fn anonymous_flood_creates_no_keys_and_no_cookies() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::new(&server, "flood");
    let before = server.dbsize();
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let router = app.router.clone();
        tasks.push(tokio::spawn(async move {
            let path = if i % 2 == 0 {
                "/untouched"
            } else {
                "/get/anything"
            };
            let req = Request::builder()
                .uri(path)
                .body(Body::empty())
                .expect("req");
            let res = router.oneshot(req).await.expect("infallible");
            (res.status(), res.headers().contains_key(header::SET_COOKIE))
        }));
    }
    for t in tasks {
        let (status, cookie) = t.await.expect("task");
        assert_eq!(status, StatusCode::OK);
        assert!(!cookie, "an anonymous read got a cookie");
    }
    assert_eq!(server.dbsize(), before);
}

#[tokio::test]
async fn key_rotation_accepts_old_keys_and_signs_with_the_new_one() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let old_key = support::test_key();
    let new_key = herd::cookie::Key::from(&[7u8; 64]);
    let prefix = support::unique_prefix("rotation");
    let make = |key: &herd::cookie::Key, old: Option<&herd::cookie::Key>| {
        let config = herd::Config::builder()
            .redis_url(server.url())
            .prefix(prefix.clone())
            .build()
            .expect("config");
        App::from_client(RedisClient::new(config).expect("client"), |l| {
            l.with_key(key.clone()).with_old_keys(old.cloned())
        })
    };
    let before = make(&old_key, None);
    let cookie = new_session(&before).await;
    let after = make(&new_key, Some(&old_key));
    let r = after.send("GET", "/get/seed", Some(&cookie)).await;
    assert_eq!(
        r.body,
        json!({ "value": "1" }),
        "a cookie signed with the old key must still verify"
    );
    let fresh = after
        .send("POST", "/set/x/1", None)
        .await
        .cookie()
        .expect("cookie");
    let r = before.send("GET", "/get/x", Some(&fresh)).await;
    assert_eq!(
        r.body,
        json!({ "value": null }),
        "new cookies must be signed with the new key"
    );
    let r = after.send("GET", "/get/x", Some(&fresh)).await;
    assert_eq!(r.body, json!({ "value": "1" }));
}

#[tokio::test]
async fn redis_down_gives_fast_503_and_recovers_without_restart() {
    let mut server = RedisServer::start(crate::TOPOLOGY);
    let app = App::new(&server, "down");
    let cookie = new_session(&app).await;
    server.kill();
    for path in ["/get/seed", "/incr/n"] {
        let start = Instant::now();
        let r = app.send("GET", path, Some(&cookie)).await;
        let took = start.elapsed();
        assert_eq!(
            r.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{path}: {:?}",
            r.body
        );
        assert_eq!(r.retry_after.as_deref(), Some("1"));
        assert!(took < Duration::from_secs(2), "{path} took {took:?}");
        assert!(
            !r.body.to_string().contains("127.0.0.1"),
            "internal details leaked"
        );
    }
    // A blind write whose save fails after the handler: the success is replaced by the 503.
    let r = app.send("POST", "/set/a/1", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    // Routes that do not need Redis still answer.
    let r = app.send("GET", "/untouched", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::OK);

    server.restart();
    let start = Instant::now();
    loop {
        let r = app.send("GET", "/incr/n", None).await;
        if r.status == StatusCode::OK {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no recovery: {:?}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn oversize_values_and_sessions_are_413_and_write_nothing() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::with(&server, "size", |l| {
        l.with_max_value_size(1000).with_max_session_size(2500)
    });
    let r = app.send("POST", "/big/a/2000", None).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(r.set_cookie.is_empty());
    assert_eq!(server.dbsize(), 0);
    let cookie = new_session(&app).await;
    // Blind writes: the script checks the total.
    assert_eq!(
        app.send("POST", "/big/a/900", Some(&cookie)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        app.send("POST", "/big/b/900", Some(&cookie)).await.status,
        StatusCode::OK
    );
    let r = app.send("POST", "/big/c/900", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    let r = app.send("GET", "/get/c", Some(&cookie)).await;
    assert_eq!(
        r.body,
        json!({ "value": null }),
        "a refused write was stored"
    );
    // Replacing a value within the limit is fine.
    assert_eq!(
        app.send("POST", "/big/a/800", Some(&cookie)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn undecodable_values_and_non_integers_are_clear_errors() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let client = RedisClient::new(config(&server, "decode")).expect("client");
    let app = App::from_client(client.clone(), |l| l);
    let cookie = new_session(&app).await;
    app.send("POST", "/set/word/hello", Some(&cookie)).await;
    let r = app.send("GET", "/incr/word", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    let r = app.send("GET", "/get/word", Some(&cookie)).await;
    assert_eq!(
        r.body,
        json!({ "value": "hello" }),
        "a refused incr changed the value"
    );

    // Corrupt a stored value behind herd's back, then read it through the API.
    let key = app.session_keys(&server).pop().expect("key");
    let _: () = server.cmd(&["HSET", &key, "broken", "{not json"]);
    let router = Router::new()
        .route(
            "/typed",
            get(|s: Session| async move {
                match s.get::<Vec<u32>>("broken").await {
                    Err(herd::Error::Decode { key, .. }) => format!("decode error on {key}"),
                    other => format!("unexpected: {other:?}"),
                }
            }),
        )
        .layer(
            SessionLayer::new(client)
                .with_key(support::test_key())
                .with_secure(false),
        );
    let req = Request::builder()
        .uri("/typed")
        .header(header::COOKIE, &cookie)
        .body(Body::empty())
        .expect("req");
    let res = router.oneshot(req).await.expect("infallible");
    let body = res.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"decode error on broken");
}

/// What either write script answers reaches the handler exactly: a counter past 2^53 (Lua numbers
/// are doubles) and an owner with spaces (the reply is one string, the owner its last part).
#[tokio::test]
async fn write_replies_carry_large_counters_and_owners_exactly() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::new(&server, "replies");
    let r = app.send("POST", "/login/Ada%20Lovelace", None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let cookie = r.cookie().expect("login cookie");
    let key = app.session_keys(&server).pop().expect("key");
    let starts = [
        "9007199254740993",
        "-9007199254740995",
        "9223372036854775806",
        "41",
    ];
    for (route, start) in ["/incr-then-owner/n", "/set-incr-then-owner/n"]
        .into_iter()
        .flat_map(|route| starts.map(|start| (route, start)))
    {
        let _: () = server.cmd(&["HSET", &key, "n", start]);
        let expected = start.parse::<i64>().expect("i64") + 1;
        // Blind: the write script's reply is all the handler learns.
        let r = app.send("GET", route, Some(&cookie)).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(
            r.body,
            json!({ "value": expected, "owner": "Ada Lovelace" }),
            "{route} after {start}"
        );
        let stored: String = server.cmd(&["HGET", &key, "n"]);
        assert_eq!(stored, expected.to_string());
    }
}

#[tokio::test]
async fn extractor_without_layer_says_what_is_missing() {
    let router: Router = Router::new().route("/", get(|_s: Session| async { "unreachable" }));
    let res = router
        .oneshot(
            Request::builder()
                .uri("/")
                .body(Body::empty())
                .expect("req"),
        )
        .await
        .expect("infallible");
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = res.into_body().collect().await.expect("body").to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("SessionLayer"), "{text}");
}

/// Round trips per request kind, counted by the client and cross-checked with Redis's commandstats.
#[tokio::test]
async fn round_trip_budget() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::with(&server, "budget", |l| {
        l.with_idle_timeout(Duration::from_secs(3600))
    });
    let cookie = new_session(&app).await; // also loads the save script into Redis
    app.send("GET", "/incr/warm", Some(&cookie)).await;

    async fn measure(
        app: &App,
        server: &RedisServer,
        method: &str,
        path: &str,
        cookie: Option<&str>,
    ) -> (u64, u64, Reply) {
        server.reset_stats();
        let before = app.client.round_trips();
        let r = app.send(method, path, cookie).await;
        assert!(r.status.is_success(), "{path}: {:?}", r.body);
        // Give a (wrongly) spawned background command the chance to show up in the stats.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let trips = app.client.round_trips() - before;
        let calls = server.command_calls();
        let commands: u64 = calls
            .iter()
            .filter(|(name, _)| {
                !matches!(
                    name.as_str(),
                    "info"
                        | "config|resetstat"
                        | "config"
                        | "ping"
                        | "client|setinfo"
                        | "client"
                        | "hello"
                        // Each sentinel's hello, every 2 s, at any moment; herd sends none.
                        | "publish"
                )
            })
            .map(|(_, n)| n)
            .sum();
        (trips, commands, r)
    }

    // On a cluster the new id lives in another slot: mark + read, write, delete (store.rs).
    let cycle_budget = if server.topology() == Topology::Cluster {
        3
    } else {
        1
    };
    let cases: [(&str, &str, &str, bool, u64); 8] = [
        ("untouched, no cookie", "GET", "/untouched", false, 0),
        ("untouched, cookie", "GET", "/untouched", true, 0),
        ("read-only", "GET", "/get/seed", true, 1),
        ("blind write", "POST", "/set/k/v", true, 1),
        ("read then write", "POST", "/read-then-write/n", true, 2),
        ("incr", "GET", "/incr/hits", true, 1),
        (
            "cycle id (login)",
            "POST",
            "/login/dave",
            true,
            cycle_budget,
        ),
        ("anonymous read", "GET", "/get/seed", false, 0),
    ];
    let mut cookie = cookie;
    println!("| case | round trips | Redis commands |");
    for (name, method, path, with_cookie, budget) in cases {
        let (trips, commands, r) = measure(
            &app,
            &server,
            method,
            path,
            with_cookie.then_some(cookie.as_str()),
        )
        .await;
        println!("| {name} | {trips} | {commands} |");
        assert_eq!(
            trips, budget,
            "{name}: {trips} round trips, budget {budget}"
        );
        if budget == 0 {
            assert_eq!(commands, 0, "{name}: Redis saw commands");
        } else {
            assert!(commands >= 1, "{name}: Redis saw no command");
        }
        if let Some(c) = r.cookie() {
            cookie = c;
        }
    }
    let (trips, commands, _) = measure(&app, &server, "POST", "/logout", Some(&cookie)).await;
    println!("| destroy (logout) | {trips} | {commands} |");
    assert_eq!(trips, 1, "destroy");
    // One script: it checks for a tombstone (a cycled-away id is not deleted), then deletes.
    assert!(commands <= 3, "destroy: {commands} commands");
    let calls = server.command_calls();
    assert_eq!(calls.get("del"), Some(&1));
}

/// `incr` on a session that has ended starts a fresh one and leaves no stray hash under the old id;
/// its TTL never runs past the absolute deadline.
#[tokio::test]
async fn incr_never_resurrects_and_respects_the_absolute_deadline() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::with(&server, "incr-dead", |l| {
        l.with_idle_timeout(Duration::from_secs(60))
            .with_absolute_timeout(Duration::from_secs(5))
    });
    let cookie = new_session(&app).await;
    let old_key = app.session_keys(&server).pop().expect("key");
    let r = app.send("GET", "/incr/n", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "value": 1 }));
    let ttl: i64 = server.cmd(&["PTTL", &old_key]);
    assert!(
        ttl > 0 && ttl <= 5000,
        "TTL {ttl} runs past the absolute deadline"
    );
    // Logged out elsewhere, then the old cookie increments.
    let _: i64 = server.cmd(&["DEL", &old_key]);
    let r = app.send("GET", "/incr/n", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.body,
        json!({ "value": 1 }),
        "a fresh session counts from 1"
    );
    let fresh = r.cookie().expect("a fresh session gets a cookie");
    assert_ne!(fresh, cookie);
    let keys = app.session_keys(&server);
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_ne!(keys[0], old_key, "the ended session came back");
}

/// `Session::remove`: deletes one field in Redis (a blind write: one round trip), nothing else;
/// the same request sees its own removal; no session is made for a visitor without one.
#[tokio::test]
async fn remove_deletes_one_field_and_nothing_else() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::new(&server, "remove");
    let cookie = new_session(&app).await;
    app.send("POST", "/set/a/x", Some(&cookie)).await;
    app.send("POST", "/set/b/y", Some(&cookie)).await;
    let (key, before) = app.only_session(&server);

    let (trips, r) = app.counted("POST", "/remove/a", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(trips, 1, "a blind remove is one round trip");
    assert!(r.set_cookie.is_empty(), "remove must not set a cookie");
    let (same_key, after) = app.only_session(&server);
    assert_eq!(same_key, key, "remove must keep the session id");
    assert_eq!(
        user_fields(&after),
        HashMap::from([("seed", "\"1\""), ("b", "\"y\"")])
    );
    for part in [0, 2, 3] {
        assert_eq!(
            timing_part(&after, part),
            timing_part(&before, part),
            "created-at, idle timeout and index coverage untouched"
        );
    }
    assert_eq!(after.get("$o"), before.get("$o"), "owner untouched");
    let r = app.send("GET", "/get/a", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "value": null }));

    // Removing a field that is not there changes nothing; removing and reading in one request
    // sees the removal.
    let r = app.send("POST", "/remove/nope", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app.send("POST", "/remove-then-get/b", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "value": null }));
    let (_, after) = app.only_session(&server);
    assert_eq!(user_fields(&after), HashMap::from([("seed", "\"1\"")]));

    // A reserved name is refused before anything is sent; the meta field survives.
    let (trips, r) = app.counted("POST", "/remove/$c", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{:?}", r.body);
    assert_eq!(trips, 0);
    let (_, again) = app.only_session(&server);
    assert_eq!(again.get("$c"), after.get("$c"));

    // No cookie: nothing to remove from, so no key, no cookie, no round trip.
    let (trips, r) = app.counted("POST", "/remove/seed", None).await;
    assert_eq!((r.status, trips), (StatusCode::OK, 0));
    assert!(r.set_cookie.is_empty());
    assert_eq!(app.session_keys(&server).len(), 1);
}

/// `Session::clear`: every user field goes, the session (id, created-at, owner) stays, in one
/// round trip; later writes land in the same session.
#[tokio::test]
async fn clear_empties_the_session_but_keeps_it() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::new(&server, "clear");
    let cookie = app
        .send("POST", "/login/erin", None)
        .await
        .cookie()
        .expect("cookie");
    app.send("POST", "/set/a/x", Some(&cookie)).await;
    app.send("GET", "/incr/n", Some(&cookie)).await;
    let (key, before) = app.only_session(&server);
    assert_eq!(user_fields(&before).len(), 3, "{before:?}");

    let (trips, r) = app.counted("POST", "/clear", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(trips, 1, "a blind clear is one round trip");
    assert!(r.set_cookie.is_empty(), "clear keeps the id: no new cookie");
    let (same_key, after) = app.only_session(&server);
    assert_eq!(same_key, key);
    assert!(user_fields(&after).is_empty(), "{after:?}");
    assert_eq!(
        timing_part(&after, 0),
        timing_part(&before, 0),
        "created-at kept"
    );
    assert_eq!(
        after.get("$o").map(String::as_str),
        Some("erin"),
        "owner kept"
    );
    let ttl: i64 = server.cmd(&["PTTL", &key]);
    assert!(ttl > 0, "the cleared session lost its TTL: {ttl}");

    let r = app.send("GET", "/entries", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "entries": {} }));
    let r = app.send("GET", "/owner", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "owner": "erin" }));
    let r = app.send("GET", "/is-empty", Some(&cookie)).await;
    assert_eq!(
        r.body,
        json!({ "empty": false }),
        "a cleared session still exists"
    );

    // The cookie still names the session: later writes go into it.
    let r = app.send("POST", "/set/c/z", Some(&cookie)).await;
    assert!(r.set_cookie.is_empty());
    let (same_key, after) = app.only_session(&server);
    assert_eq!(same_key, key);
    assert_eq!(user_fields(&after), HashMap::from([("c", "\"z\"")]));

    // Clear then write in one request: only the new value remains.
    let r = app.send("POST", "/clear-then-set/d/w", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "entries": { "d": "w" } }));
    let (_, after) = app.only_session(&server);
    assert_eq!(user_fields(&after), HashMap::from([("d", "\"w\"")]));

    // Log out everywhere still finds the cleared session.
    let store = herd::SessionStore::new(app.client.clone());
    assert_eq!(store.destroy_owner("erin").await.expect("destroy"), 1);
    assert!(app.session_keys(&server).is_empty());

    // No cookie: nothing to clear, nothing created.
    let (trips, r) = app.counted("POST", "/clear", None).await;
    assert_eq!((r.status, trips), (StatusCode::OK, 0));
    assert!(r.set_cookie.is_empty());
    assert!(app.session_keys(&server).is_empty());
}

/// `Session::entries`: the user fields as JSON values (no meta fields), including the request's
/// own changes; one round trip; empty for a visitor without a session, with nothing created.
#[tokio::test]
async fn entries_lists_the_user_fields_with_this_requests_changes() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::new(&server, "entries");
    let (trips, r) = app.counted("GET", "/entries", None).await;
    assert_eq!(r.body, json!({ "entries": {} }));
    assert_eq!(trips, 0, "no cookie: nothing to read");
    assert!(r.set_cookie.is_empty());
    assert_eq!(server.dbsize(), 0);

    let cookie = app
        .send("POST", "/login/gus", None)
        .await
        .cookie()
        .expect("cookie");
    app.send("POST", "/set/seed/1", Some(&cookie)).await;
    app.send("GET", "/incr/n", Some(&cookie)).await;
    app.send("GET", "/incr/n", Some(&cookie)).await;
    let (trips, r) = app.counted("GET", "/entries", Some(&cookie)).await;
    assert_eq!(trips, 1, "entries is one read");
    assert!(r.set_cookie.is_empty());
    assert_eq!(
        r.body,
        json!({ "entries": { "seed": "1", "n": 2, "user": "gus" } }),
        "user fields only, values decoded (the counter as a number)"
    );

    let r = app
        .send("POST", "/change-then-entries", Some(&cookie))
        .await;
    assert_eq!(
        r.body,
        json!({ "entries": { "n": 2, "user": "gus", "added": true } })
    );
    let (_, stored) = app.only_session(&server);
    assert_eq!(
        user_fields(&stored),
        HashMap::from([("n", "2"), ("user", "\"gus\""), ("added", "true")])
    );
}

/// `Session::owner` and `set_owner`: stored as the `$o` meta field, indexed under the hex of the
/// owner, read back in later requests (one round trip) and in the same request.
#[tokio::test]
async fn owner_is_stored_indexed_and_read_back() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::new(&server, "owner-api");
    let prefix = app.client.config().prefix().to_owned();
    let r = app.send("GET", "/owner", None).await;
    assert_eq!(r.body, json!({ "owner": null }));
    assert_eq!(server.dbsize(), 0);

    let cookie = new_session(&app).await;
    let (trips, r) = app.counted("GET", "/owner", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "owner": null }));
    assert_eq!(trips, 1);

    // An owner with characters that must never reach a key unencoded.
    let owner = "a}{b";
    let r = app
        .send("POST", "/set-owner-then-read/a%7D%7Bb", Some(&cookie))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        r.body,
        json!({ "owner": owner }),
        "the request sees its own owner"
    );
    assert!(r.set_cookie.is_empty());
    let (key, fields) = app.only_session(&server);
    assert_eq!(fields.get("$o").map(String::as_str), Some(owner));
    let index = format!("{prefix}:o:{{617d7b62}}");
    assert_eq!(server.keys(&format!("{prefix}:o:*")), vec![index.clone()]);
    let id = &key[key.len() - 33..key.len() - 1];
    let score: Option<f64> = server.cmd(&["ZSCORE", &index, id]);
    assert!(score.is_some(), "the session is not in its owner's index");

    let (trips, r) = app.counted("GET", "/owner", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "owner": owner }));
    assert_eq!(trips, 1);
    let store = herd::SessionStore::new(app.client.clone());
    assert_eq!(store.destroy_owner(owner).await.expect("destroy"), 1);
    let r = app.send("GET", "/owner", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "owner": null }));
}

/// `Session::is_empty`: true without a stored session (no cookie, a forged one, after logout),
/// false with one; one round trip with a cookie, none without; never creates anything.
#[tokio::test]
async fn is_empty_says_whether_a_session_is_stored() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::new(&server, "is-empty");
    let (trips, r) = app.counted("GET", "/is-empty", None).await;
    assert_eq!((r.body.clone(), trips), (json!({ "empty": true }), 0));
    assert!(r.set_cookie.is_empty());
    assert_eq!(server.dbsize(), 0);

    let cookie = new_session(&app).await;
    let (trips, r) = app.counted("GET", "/is-empty", Some(&cookie)).await;
    assert_eq!((r.body.clone(), trips), (json!({ "empty": false }), 1));
    assert!(r.set_cookie.is_empty());

    let forged = format!("herd_session={}", "A".repeat(76));
    let r = app.send("GET", "/is-empty", Some(&forged)).await;
    assert_eq!(r.body, json!({ "empty": true }));

    app.send("POST", "/logout", Some(&cookie)).await;
    let r = app.send("GET", "/is-empty", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "empty": true }));
    assert!(r.set_cookie.is_empty());
    assert_eq!(server.dbsize(), 0, "is_empty created something");
}

/// `Session::set_idle_timeout`: stored in the timing record `$c`, sets the TTL now (one round trip),
/// is kept by later saves and TTL refreshes, never outlives the absolute timeout, and the session
/// does end after it.
#[tokio::test]
async fn set_idle_timeout_is_per_session_and_sticks() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::with(&server, "idle-override", |l| {
        l.with_idle_timeout(Duration::from_secs(60))
            .with_absolute_timeout(Duration::from_secs(3600))
    });
    let cookie = new_session(&app).await;
    let other = new_session(&app).await;
    let keys_before = app.session_keys(&server);

    let (trips, r) = app.counted("POST", "/idle/5000", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(trips, 1);
    assert!(r.set_cookie.is_empty());
    assert_eq!(app.session_keys(&server).len(), keys_before.len());
    let key = {
        let mut found = None;
        for k in &keys_before {
            let fields: HashMap<String, String> = server.cmd(&["HGETALL", k]);
            let i = timing_part(&fields, 2);
            if i.is_some() {
                assert!(found.is_none(), "both sessions got the override");
                found = Some((k.clone(), i));
            }
        }
        let (k, i) = found.expect("no session has its own idle timeout");
        assert_eq!(i.as_deref(), Some("5000"));
        k
    };
    let other_key = keys_before
        .iter()
        .find(|k| **k != key)
        .expect("other")
        .clone();
    let pttl = |k: &str| server.cmd::<i64>(&["PTTL", k]);
    assert!((1..=5000).contains(&pttl(&key)), "TTL {}", pttl(&key));
    assert!(pttl(&other_key) > 5000, "the other session changed too");

    // A later write keeps the session's own timeout (not the layer's 60 s).
    app.send("POST", "/set/x/y", Some(&cookie)).await;
    assert!((1..=5000).contains(&pttl(&key)), "TTL {}", pttl(&key));
    // So does a TTL refresh after a read: age the session as if 4 s had passed, then read.
    age_session(&server, &key, 4000);
    let r = app.send("GET", "/get/x", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "value": "y" }));
    let deadline = Instant::now() + Duration::from_secs(5);
    while pttl(&key) <= 1000 {
        assert!(
            Instant::now() < deadline,
            "the read did not refresh the TTL"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        (1000..=5000).contains(&pttl(&key)),
        "refreshed to {} instead of the session's 5 s",
        pttl(&key)
    );
    let _ = other;

    // Never past the absolute deadline.
    let capped = App::with(&server, "idle-capped", |l| {
        l.with_idle_timeout(Duration::from_secs(10))
            .with_absolute_timeout(Duration::from_secs(30))
    });
    let c = new_session(&capped).await;
    capped.send("POST", "/idle/600000", Some(&c)).await;
    let (k, fields) = capped.only_session(&server);
    assert_eq!(timing_part(&fields, 2).as_deref(), Some("600000"));
    assert!(
        (1..=30_000).contains(&pttl(&k)),
        "TTL {} runs past the absolute timeout",
        pttl(&k)
    );

    // A short override ends the session (Redis expires it; only an upper bound is waited for).
    let short = App::new(&server, "idle-short");
    let c = new_session(&short).await;
    short.send("POST", "/idle/300", Some(&c)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !short.session_keys(&server).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the session outlived its idle timeout"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = short.send("GET", "/get/seed", Some(&c)).await;
    assert_eq!(r.body, json!({ "value": null }));
}

/// Makes a session look `ms` older to its idle timeout, as time passing would: its TTL `ms`
/// shorter, and the time its TTL was last pushed back (in the timing record `$c`) `ms` earlier.
fn age_session(server: &RedisServer, key: &str, ms: i64) {
    move_record_back(server, key, 1, ms);
    let pttl: i64 = server.cmd(&["PTTL", key]);
    let _: i64 = server.cmd(&["PEXPIRE", key, &(pttl - ms).to_string()]);
}

/// Moves part `n` of a session's timing record `$c` (`created:touched:idle:indexed`) `ms` earlier.
fn move_record_back(server: &RedisServer, key: &str, n: usize, ms: i64) {
    let record: String = server.cmd(&["HGET", key, "$c"]);
    let mut parts: Vec<String> = record.split(':').map(str::to_owned).collect();
    let value: i64 = parts[n].parse().expect("a timing record part");
    parts[n] = (value - ms).to_string();
    let _: i64 = server.cmd(&["HSET", key, "$c", &parts.join(":")]);
}

/// Commands that change a session's data, or its TTL; a read-only request must send none of them.
/// A refresh runs the save script with nothing to change: one `EVALSHA`, in which one `HSET` (of
/// the timing record `$c` only: the test compares the data) and one `PEXPIRE`.
const SESSION_WRITES: [&str; 11] = [
    "hset", "hdel", "hincrby", "evalsha", "eval", "del", "unlink", "rename", "expire", "persist",
    "zadd",
];

/// Exactly one refresh: the save script once, pushing the TTL back and recording when, and nothing
/// else written.
fn assert_one_refresh(calls: &HashMap<String, u64>, what: &str) {
    assert_eq!(calls.get("pexpire"), Some(&1), "{what}: {calls:?}");
    assert_eq!(calls.get("evalsha"), Some(&1), "{what}: {calls:?}");
    assert_eq!(calls.get("hset"), Some(&1), "{what}: {calls:?}");
    for cmd in SESSION_WRITES {
        if !matches!(cmd, "hset" | "evalsha") {
            assert_eq!(calls.get(cmd), None, "{what}: sent {cmd}: {calls:?}");
        }
    }
}

/// Waits up to `within` for Redis to have run at least `n` `PEXPIRE`s, then a little more, so that a
/// second (wrong) one would show too; returns the command stats.
async fn settle(server: &RedisServer, n: u64, within: Duration) -> HashMap<String, u64> {
    let deadline = Instant::now() + within;
    while server.command_calls().get("pexpire").copied().unwrap_or(0) < n
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.command_calls()
}

fn assert_no_data_write(calls: &HashMap<String, u64>, what: &str) {
    for cmd in SESSION_WRITES {
        assert_eq!(calls.get(cmd), None, "{what}: sent {cmd}: {calls:?}");
    }
}

/// Idle refresh: a read-only request sends no write at all while the TTL is fresh (less than a
/// tenth of the idle timeout has passed), and exactly one refresh (no data write) once more than
/// a tenth has passed. "Time passing" is simulated by ageing the session ([`age_session`]), and
/// checked with one real wait too.
#[tokio::test]
async fn read_only_requests_refresh_the_ttl_at_most_once_per_tenth() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let idle = 600_000_i64; // a tenth is 60 s: "within a tenth" needs no tight timing
    let app = App::with(&server, "refresh", |l| {
        l.with_idle_timeout(Duration::from_millis(idle as u64))
    });
    let cookie = new_session(&app).await;
    let key = app.session_keys(&server).pop().expect("key");
    let pttl = || server.cmd::<i64>(&["PTTL", &key]);

    // Within a tenth: reads send no PEXPIRE, HSET or script.
    for _ in 0..3 {
        server.reset_stats();
        let r = app.send("GET", "/get/seed", Some(&cookie)).await;
        assert_eq!(r.body, json!({ "value": "1" }));
        assert!(r.set_cookie.is_empty());
        let calls = settle(&server, 1, Duration::from_millis(300)).await;
        assert_eq!(
            calls.get("pexpire"),
            None,
            "a fresh TTL was refreshed: {calls:?}"
        );
        assert_no_data_write(&calls, "read within a tenth");
    }
    assert!(pttl() > idle - idle / 10, "TTL {}", pttl());

    // More than a tenth later (100 s of 600 s): one refresh back to the full timeout, no data write.
    age_session(&server, &key, 100_000);
    let data_before: HashMap<String, String> = server.cmd(&["HGETALL", &key]);
    server.reset_stats();
    let r = app.send("GET", "/get/seed", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "value": "1" }));
    assert!(r.set_cookie.is_empty(), "a refresh must not set a cookie");
    let calls = settle(&server, 1, Duration::from_secs(5)).await;
    assert_one_refresh(&calls, "read after a tenth");
    let data_after: HashMap<String, String> = server.cmd(&["HGETALL", &key]);
    assert_eq!(user_fields(&data_after), user_fields(&data_before));
    assert!(pttl() > idle - idle / 10, "TTL not pushed back: {}", pttl());

    // Right after the refresh the clock starts again: the next read sends nothing.
    server.reset_stats();
    app.send("GET", "/get/seed", Some(&cookie)).await;
    let calls = settle(&server, 1, Duration::from_millis(300)).await;
    assert_eq!(calls.get("pexpire"), None, "refreshed twice: {calls:?}");
    assert_no_data_write(&calls, "read after the refresh");

    // The same with real time: idle 10 s, a tenth is 1 s; a wait of 1.5 s is more than a tenth
    // however slow the machine (a slow machine only waits longer; the session would need 8.5 s
    // more to expire).
    let app = App::with(&server, "refresh-real", |l| {
        l.with_idle_timeout(Duration::from_secs(10))
    });
    let cookie = new_session(&app).await;
    let key = app.session_keys(&server).pop().expect("key");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.reset_stats();
    let r = app.send("GET", "/get/seed", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "value": "1" }));
    let calls = settle(&server, 1, Duration::from_secs(5)).await;
    assert_one_refresh(&calls, "read after a real tenth");
    let ttl: i64 = server.cmd(&["PTTL", &key]);
    assert!(ttl > 9000, "TTL not pushed back: {ttl}");
}

/// The common writes (`incr`, read-then-write) leave the TTL as it is and push it back as reads
/// do: no `PEXPIRE` while less than a tenth of the idle timeout has passed, exactly one refresh
/// (off the request's path) once more has.
#[tokio::test]
async fn field_writes_refresh_the_ttl_at_most_once_per_tenth() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let idle = 600_000_i64;
    let app = App::with(&server, "write-refresh", |l| {
        l.with_idle_timeout(Duration::from_millis(idle as u64))
    });
    let cookie = new_session(&app).await;
    let key = app.session_keys(&server).pop().expect("key");
    let pttl = || server.cmd::<i64>(&["PTTL", &key]);

    // Within a tenth: the write and nothing else.
    for (method, path) in [("GET", "/incr/n"), ("POST", "/read-then-write/m")] {
        let before = pttl();
        server.reset_stats();
        let r = app.send(method, path, Some(&cookie)).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {:?}", r.body);
        assert!(r.set_cookie.is_empty(), "{path}");
        let calls = settle(&server, 1, Duration::from_millis(300)).await;
        assert_eq!(calls.get("pexpire"), None, "{path}: {calls:?}");
        assert_eq!(calls.get("evalsha"), Some(&1), "{path}: {calls:?}");
        assert!(
            pttl() <= before,
            "{path}: TTL pushed back: {} > {before}",
            pttl()
        );
    }

    // More than a tenth later: the increment, then one refresh to the full timeout.
    age_session(&server, &key, 100_000);
    server.reset_stats();
    let r = app.send("GET", "/incr/n", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "value": 2 }));
    let calls = settle(&server, 1, Duration::from_secs(5)).await;
    assert_eq!(calls.get("hincrby"), Some(&1), "{calls:?}");
    assert_eq!(calls.get("pexpire"), Some(&1), "{calls:?}");
    assert_eq!(
        calls.get("evalsha"),
        Some(&2),
        "the write and the refresh: {calls:?}"
    );
    assert!(pttl() > idle - idle / 10, "TTL not pushed back: {}", pttl());

    // The clock starts again.
    server.reset_stats();
    app.send("GET", "/incr/n", Some(&cookie)).await;
    let calls = settle(&server, 1, Duration::from_millis(300)).await;
    assert_eq!(calls.get("pexpire"), None, "refreshed twice: {calls:?}");
}

/// A session past its absolute deadline by its record is over even while Redis still holds the key
/// (clocks of different machines, or a key about to expire): a blind `incr`, which learns it from
/// the write's reply, starts a fresh session; a read-then-write learns it from the read. No read
/// sees the old session again.
#[tokio::test]
async fn a_field_write_into_a_session_past_its_deadline_keeps_nothing() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let absolute = 3_600_000_i64;
    let app = App::with(&server, "write-deadline", |l| {
        l.with_absolute_timeout(Duration::from_millis(absolute as u64))
    });
    let past_deadline = |key: &str| move_record_back(&server, key, 0, absolute + 1000);

    let cookie = new_session(&app).await;
    let old_key = app.session_keys(&server).pop().expect("key");
    past_deadline(&old_key);
    let r = app.send("GET", "/incr/n", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        r.body,
        json!({ "value": 1 }),
        "a fresh session counts from 1"
    );
    let fresh = r.cookie().expect("a fresh session gets a cookie");
    assert_ne!(fresh, cookie);
    let r = app.send("GET", "/get/seed", Some(&cookie)).await;
    assert_eq!(
        r.body,
        json!({ "value": null }),
        "the old session was read again"
    );

    let cookie = new_session(&app).await;
    let r = app.send("POST", "/read-then-write/m", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::OK);
    let key = app
        .session_keys(&server)
        .into_iter()
        .find(|k| *k != old_key && server.cmd::<Option<String>>(&["HGET", k, "m"]).is_some())
        .expect("the session just written");
    past_deadline(&key);
    let r = app.send("POST", "/read-then-write/m", Some(&cookie)).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "a read that finds it over starts afresh: {:?}",
        r.body
    );
    assert_eq!(r.body, json!({ "value": 1 }));
}

/// Cookie attributes set on the layer: `Max-Age` for a persistent cookie (the absolute timeout,
/// also after a new id; none by default), `SameSite`, `Domain`, `Path`, on the cookie that is set
/// and on the one that removes it; the cookie still round-trips; `__Host-` overrides domain/path.
#[tokio::test]
async fn cookie_attributes_from_the_layer() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let attrs = |set: &str| -> Vec<String> {
        set.split(';')
            .skip(1)
            .map(|a| a.trim().to_owned())
            .collect()
    };

    // Default: a browser-session cookie (no Max-Age, no Expires).
    let app = App::new(&server, "cookie-default");
    let r = app.send("POST", "/set/a/1", None).await;
    let set = &r.set_cookie[0];
    assert!(
        !set.contains("Max-Age") && !set.contains("Expires"),
        "{set}"
    );

    // Persistent: Max-Age = the absolute timeout, on creation and after a new id; no Set-Cookie
    // on later requests (the absolute timeout does not move, so neither does the cookie's end).
    let app = App::with(&server, "cookie-persistent", |l| {
        l.with_persistent_cookie(true)
            .with_absolute_timeout(Duration::from_secs(7200))
    });
    let r = app.send("POST", "/set/a/1", None).await;
    let a = attrs(&r.set_cookie[0]);
    assert!(a.contains(&"Max-Age=7200".to_owned()), "{a:?}");
    let cookie = r.cookie().expect("cookie");
    let r = app.send("GET", "/get/a", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "value": "1" }));
    assert!(r.set_cookie.is_empty(), "{:?}", r.set_cookie);
    let r = app.send("POST", "/cycle", Some(&cookie)).await;
    assert!(attrs(&r.set_cookie[0]).contains(&"Max-Age=7200".to_owned()));
    let cookie = r.cookie().expect("cycled cookie");
    let r = app.send("POST", "/logout", Some(&cookie)).await;
    assert!(
        attrs(&r.set_cookie[0]).contains(&"Max-Age=0".to_owned()),
        "{:?}",
        r.set_cookie
    );

    // SameSite, Domain, Path.
    let app = App::with(&server, "cookie-attrs", |l| {
        l.with_same_site(cookie::SameSite::Strict)
            .with_domain("example.com")
            .with_path("/app")
            .with_cookie_name("sid")
    });
    let r = app.send("POST", "/set/a/1", None).await;
    let set = &r.set_cookie[0];
    assert!(set.starts_with("sid="), "{set}");
    let a = attrs(set);
    for want in [
        "SameSite=Strict",
        "Domain=example.com",
        "Path=/app",
        "HttpOnly",
    ] {
        assert!(a.contains(&want.to_owned()), "{want} missing: {set}");
    }
    assert!(
        !a.iter().any(|x| x == "SameSite=Lax" || x == "Path=/"),
        "{set}"
    );
    // The cookie round-trips under its own name; the default name is not ours any more.
    let cookie = r.cookie().expect("cookie");
    let r = app.send("GET", "/get/a", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "value": "1" }));
    let renamed = cookie.replacen("sid=", "herd_session=", 1);
    let r = app.send("GET", "/get/a", Some(&renamed)).await;
    assert_eq!(r.body, json!({ "value": null }));
    // The removal must carry the same Domain and Path, or the browser keeps the cookie.
    let r = app.send("POST", "/logout", Some(&cookie)).await;
    let a = attrs(&r.set_cookie[0]);
    for want in ["Domain=example.com", "Path=/app", "Max-Age=0"] {
        assert!(
            a.contains(&want.to_owned()),
            "{want} missing: {:?}",
            r.set_cookie
        );
    }

    // SameSite=None (cross-site use) keeps Secure, which browsers require with it.
    let app = App::with(&server, "cookie-none", |l| {
        l.with_secure(true).with_same_site(cookie::SameSite::None)
    });
    let r = app.send("POST", "/set/a/1", None).await;
    let a = attrs(&r.set_cookie[0]);
    assert!(
        a.contains(&"SameSite=None".to_owned()) && a.contains(&"Secure".to_owned()),
        "{a:?}"
    );

    // `__Host-` wins over a domain and a path, whichever order they are set in.
    for order in [0, 1] {
        let app = App::with(&server, "cookie-host", |l| {
            if order == 0 {
                l.with_host_prefix(true)
                    .with_domain("example.com")
                    .with_path("/app")
            } else {
                l.with_domain("example.com")
                    .with_path("/app")
                    .with_host_prefix(true)
            }
        });
        let r = app.send("POST", "/set/a/1", None).await;
        let set = &r.set_cookie[0];
        let a = attrs(set);
        assert!(set.starts_with("__Host-herd_session="), "{set}");
        assert!(
            a.contains(&"Path=/".to_owned())
                && a.contains(&"Secure".to_owned())
                && !set.contains("Domain"),
            "order {order}: {set}"
        );
    }
}

/// The keys of this app's stored sessions (hashes with a timing record `$c`; a cycled-away id's
/// short-lived tombstone is not a session).
fn live_sessions(app: &App, server: &RedisServer) -> Vec<String> {
    app.session_keys(server)
        .into_iter()
        .filter(|k| server.cmd::<i64>(&["HEXISTS", k, "$c"]) == 1)
        .collect()
}

/// Regression: a first visit whose handler increments twice, or increments and then writes, gets
/// its session (the timing record a script save wrote is what the next write of the request uses).
#[tokio::test]
async fn first_visit_incr_then_more_writes_keeps_one_session() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::new(&server, "first-incr");
    let r = app.send("GET", "/incr-twice/n", None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body, json!({ "value": 2 }));
    let cookie = r.cookie().expect("a new session sets a cookie");
    let keys = live_sessions(&app, &server);
    assert_eq!(keys.len(), 1, "{keys:?}");
    let r = app.send("GET", "/get/n", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "value": 2 }));

    let other = App::new(&server, "first-incr-set");
    let r = other.send("POST", "/incr-then-set/n", None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert!(
        !r.set_cookie.iter().any(|c| c.contains("Max-Age=0")),
        "no removal cookie: {:?}",
        r.set_cookie
    );
    let cookie = r.cookie().expect("a new session sets a cookie");
    let (_, fields) = other.only_session(&server);
    let user = user_fields(&fields);
    assert_eq!(user.get("n"), Some(&"1"));
    assert_eq!(user.get("after"), Some(&"1"));
    let r = other.send("GET", "/get/after", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "value": 1 }));
}

/// Regression: a per-session idle timeout set between a read and an `incr` survives the request's
/// final write; after `cycle_id` the TTL counts from the new creation time, not the old deadline.
#[tokio::test]
async fn per_session_idle_timeout_and_cycle_survive_later_writes_of_the_request() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::with(&server, "remember", |l| {
        l.with_idle_timeout(Duration::from_secs(60))
            .with_absolute_timeout(Duration::from_secs(7 * 24 * 3600))
    });
    let cookie = new_session(&app).await;
    let three_days = 3 * 24 * 3600 * 1000u64;
    let r = app
        .send("POST", &format!("/remember-me/{three_days}"), Some(&cookie))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let (key, fields) = app.only_session(&server);
    assert_eq!(
        timing_part(&fields, 2),
        Some(three_days.to_string()),
        "the session's own idle timeout"
    );
    let pttl: i64 = server.cmd(&["PTTL", &key]);
    assert!(
        pttl > 60_000,
        "TTL {pttl} ms: the layer's idle timeout replaced the session's"
    );

    // A session one second from its absolute deadline logs in (cycle) and writes again.
    let capped = App::with(&server, "remember-cycle", |l| {
        l.with_idle_timeout(Duration::from_secs(60))
            .with_absolute_timeout(Duration::from_secs(120))
    });
    let cookie = new_session(&capped).await;
    let (key, fields) = capped.only_session(&server);
    let record = fields.get("$c").expect("timing record");
    let mut parts: Vec<String> = record.split(':').map(str::to_owned).collect();
    let created: u64 = parts[0].parse().expect("created");
    parts[0] = (created - 119_000).to_string();
    let _: i64 = server.cmd(&["HSET", &key, "$c", &parts.join(":")]);
    let r = capped
        .send("POST", "/cycle-then-write", Some(&cookie))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let new = r.cookie().expect("cycled cookie");
    assert_ne!(new, cookie);
    let keys = live_sessions(&capped, &server);
    assert_eq!(keys.len(), 1, "{keys:?}");
    let pttl: i64 = server.cmd(&["PTTL", &keys[0]]);
    assert!(
        pttl > 30_000,
        "TTL {pttl} ms: capped by the deadline from before the cycle"
    );
    let r = capped.send("GET", "/get/after-cycle", Some(&new)).await;
    assert_eq!(r.body, json!({ "value": true }));
}

/// Sends `path` with `cookie` in a task of its own (a request that is slow to write).
fn spawn_request(app: &App, path: &str, cookie: &str) -> tokio::task::JoinHandle<Reply> {
    let app = app.clone();
    let path = path.to_owned();
    let cookie = cookie.to_owned();
    tokio::spawn(async move { app.send("POST", &path, Some(&cookie)).await })
}

/// Regression: a request that carries the pre-login id and writes after the login moved the
/// session gets `409` without any `Set-Cookie` (so it cannot delete or replace the login's cookie),
/// and creates no session; the old id stays unusable, the login's cookie keeps working.
#[tokio::test]
async fn a_request_racing_a_login_never_undoes_it() {
    let server = RedisServer::start(crate::TOPOLOGY);
    for (name, slow) in [
        ("race-rmw", "/slow-read-write?ms=400"),
        ("race-blind", "/slow-blind-write?ms=400"),
        ("race-incr", "/slow-incr?ms=400"),
    ] {
        let app = App::new(&server, name);
        let cookie = new_session(&app).await;
        let pending = spawn_request(&app, slow, &cookie);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = app.send("POST", "/login/alice", Some(&cookie)).await;
        assert_eq!(r.status, StatusCode::OK, "{name}: {:?}", r.body);
        let login = r.cookie().expect("login sets a cookie");
        let late = pending.await.expect("task");
        assert_eq!(late.status, StatusCode::CONFLICT, "{name}: {:?}", late.body);
        assert!(
            late.set_cookie.is_empty(),
            "{name}: the late request sent {:?}",
            late.set_cookie
        );
        let keys = live_sessions(&app, &server);
        assert_eq!(keys.len(), 1, "{name}: {keys:?}");
        let r = app.send("GET", "/get/user", Some(&login)).await;
        assert_eq!(r.body, json!({ "value": "alice" }), "{name}");
        let r = app.send("GET", "/get/late", Some(&login)).await;
        assert_eq!(r.body, json!({ "value": null }), "{name}: late write kept");
        // The pre-login id, within the tombstone's life: 409, no cookie, nothing created.
        for path in ["/set/k/v", "/incr/k"] {
            let method = if path.starts_with("/set") {
                "POST"
            } else {
                "GET"
            };
            let r = app.send(method, path, Some(&cookie)).await;
            assert_eq!(
                r.status,
                StatusCode::CONFLICT,
                "{name} {path}: {:?}",
                r.body
            );
            assert!(r.set_cookie.is_empty(), "{name} {path}: {:?}", r.set_cookie);
        }
        assert_eq!(live_sessions(&app, &server).len(), 1, "{name}");
    }
}

/// Regression: the longest timeouts (`Duration::MAX`) neither overflow nor break a session.
#[tokio::test]
async fn the_longest_timeouts_work() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::with(&server, "longest", |l| {
        l.with_idle_timeout(Duration::MAX)
            .with_absolute_timeout(Duration::MAX)
    });
    let r = app.send("POST", "/login/max", None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let cookie = r.cookie().expect("cookie");
    for (method, path) in [
        ("GET", "/get/user"),
        ("POST", "/read-then-write/n"),
        ("GET", "/incr/n"),
        ("POST", &format!("/idle/{}", u64::MAX) as &str),
        ("POST", "/set/k/v"),
    ] {
        let r = app.send(method, path, Some(&cookie)).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {:?}", r.body);
    }
    let (key, _) = app.only_session(&server);
    let pttl: i64 = server.cmd(&["PTTL", &key]);
    assert!(pttl > 24 * 3600 * 1000, "TTL {pttl}");
    let r = app.send("GET", "/get/user", Some(&cookie)).await;
    assert_eq!(r.body, json!({ "value": "max" }));
}

/// Regression: a slower request that read the session before another request shortened its idle
/// timeout ("sudo mode") does not lengthen the TTL again when it writes.
#[tokio::test]
async fn a_stale_request_never_overrides_a_shorter_idle_timeout() {
    let server = RedisServer::start(crate::TOPOLOGY);
    let app = App::with(&server, "sudo", |l| {
        l.with_idle_timeout(Duration::from_secs(3600))
    });
    let cookie = new_session(&app).await;
    let slow = spawn_request(&app, "/slow-read-write?ms=400", &cookie);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = app.send("POST", "/idle/5000", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let late = slow.await.expect("task");
    assert_eq!(late.status, StatusCode::OK, "{:?}", late.body);
    let (key, fields) = app.only_session(&server);
    assert_eq!(timing_part(&fields, 2).as_deref(), Some("5000"));
    let pttl: i64 = server.cmd(&["PTTL", &key]);
    assert!(
        (1..=5000).contains(&pttl),
        "TTL {pttl} ms: the stale request's write restored the longer idle timeout"
    );
}
