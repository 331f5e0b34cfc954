//! Property tests through the public HTTP layer (an axum router with `SessionLayer`) against a real
//! Redis: random cookie headers, well-shaped forged cookies, and garbage written straight into a
//! session hash. Nothing panics, nothing answers a 5xx for a bad cookie, no forged cookie is ever
//! accepted, and nothing is stored for a visitor who did not write.
//!
//! Case counts are modest (CI time); set `PROPTEST_CASES` to run more.

mod support;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use axum::body::Body;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use herd::{RedisClient, Session, SessionLayer};
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use serde_json::{json, Value};
use support::RedisServer;
use tower::ServiceExt;

const COOKIE: &str = "herd_session";

/// The app under test: reads, a counter and a write, all through the session layer.
fn app(client: &RedisClient) -> Router {
    Router::new()
        .route("/untouched", get(|| async { "ok" }))
        .route(
            "/read",
            get(|s: Session| async move {
                let a: Option<Value> = s.get("a").await?;
                let n: Option<Value> = s.get("n").await?;
                Ok::<_, herd::Error>(Json(json!({ "a": a, "n": n })))
            }),
        )
        .route(
            "/incr",
            get(|s: Session| async move { s.incr("n", 1).await.map(|n| n.to_string()) }),
        )
        .route(
            "/set",
            post(|s: Session| async move {
                s.insert("a", "written").await?;
                Ok::<_, herd::Error>("ok")
            }),
        )
        .layer(
            SessionLayer::new(client.clone())
                .with_key(support::test_key())
                .with_secure(false),
        )
}

struct Reply {
    status: StatusCode,
    body: String,
    set_cookie: Option<String>,
}

async fn send(app: &Router, method: &str, path: &str, cookie: Option<HeaderValue>) -> Reply {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(c) = cookie {
        req = req.header(header::COOKIE, c);
    }
    let res = app
        .clone()
        .oneshot(req.body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    let status = res.status();
    let set_cookie = res
        .headers()
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_owned);
    let body = res.into_body().collect().await.expect("body").to_bytes();
    Reply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        set_cookie,
    }
}

/// Data commands Redis has run since the last reset (connection housekeeping excluded).
fn data_commands(server: &RedisServer) -> HashMap<String, u64> {
    server
        .command_calls()
        .into_iter()
        .filter(|(c, _)| {
            !matches!(
                c.as_str(),
                "info" | "config|resetstat" | "ping" | "client|setinfo" | "hello" | "dbsize"
            )
        })
        .collect()
}

fn runner(cases: u32) -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(cases);
    TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    })
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if ok {
        Ok(())
    } else {
        Err(TestCaseError::fail(what()))
    }
}

/// Cookie headers: raw bytes (obs-text, so non-UTF-8, included), our cookie name with a random
/// value, and our cookie among others.
fn cookie_headers() -> impl Strategy<Value = Vec<u8>> {
    // Mostly bytes a header may carry (tab, visible ASCII, obs-text 0x80-0xFF: not UTF-8), now
    // and then any byte (a control character makes the header unrepresentable).
    let byte = prop_oneof![
        30 => prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff],
        1 => any::<u8>(),
    ];
    let bytes = move |max: usize| proptest::collection::vec(byte.clone(), 0..max);
    prop_oneof![
        bytes(400),
        bytes(400).prop_map(|v| {
            let mut h = format!("{COOKIE}=").into_bytes();
            h.extend(v);
            h
        }),
        ("[ -~]{0,40}", bytes(120), "[ -~]{0,40}").prop_map(|(before, v, after)| {
            let mut h = format!("{before}; {COOKIE}=").into_bytes();
            h.extend(v);
            h.extend(format!("; {after}").into_bytes());
            h
        }),
        // A signed-looking value: 44 base64 characters and anything after them.
        ("[A-Za-z0-9+/]{43}=", "[ -~]{0,64}")
            .prop_map(|(mac, id)| format!("{COOKIE}={mac}{id}").into_bytes()),
    ]
}

/// (a) Random cookie headers: never a 5xx, never a key created, no Redis command at all on routes
/// that only read; a write route starts a fresh session (one new key, named by the new cookie).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_cookie_headers_are_anonymous_visitors() {
    let server = RedisServer::start();
    let client = RedisClient::connect(support::config(&server, "hostile-a"))
        .await
        .expect("connect");
    let app = app(&client);
    let handle = tokio::runtime::Handle::current();
    let (sendable, refused_by_http) = (Cell::new(0u32), Cell::new(0u32));
    let result = tokio::task::block_in_place(|| {
        runner(300).run(&cookie_headers(), |bytes| {
            let Ok(header) = HeaderValue::from_bytes(&bytes) else {
                // CR, LF, NUL and DEL cannot travel in a header: no request carries them.
                refused_by_http.set(refused_by_http.get() + 1);
                return Ok(());
            };
            sendable.set(sendable.get() + 1);
            handle.block_on(async {
                server.reset_stats();
                let keys_before = server.dbsize();
                for (method, path) in [("GET", "/untouched"), ("GET", "/read")] {
                    let r = send(&app, method, path, Some(header.clone())).await;
                    check(r.status == StatusCode::OK, || {
                        format!("{path}: {} {}", r.status, r.body)
                    })?;
                    check(r.set_cookie.is_none(), || {
                        format!("{path} set a cookie: {:?}", r.set_cookie)
                    })?;
                }
                let calls = data_commands(&server);
                check(calls.is_empty(), || {
                    format!("a random cookie reached Redis: {calls:?}")
                })?;
                check(server.dbsize() == keys_before, || {
                    "a key was created".into()
                })?;

                // A write: a fresh session, whatever the cookie said.
                let r = send(&app, "GET", "/incr", Some(header.clone())).await;
                check(r.status == StatusCode::OK && r.body == "1", || {
                    format!("/incr: {} {}", r.status, r.body)
                })?;
                let new = r
                    .set_cookie
                    .ok_or_else(|| TestCaseError::fail("no new cookie"))?;
                let id = &new[new.len() - 32..];
                let keys = server.keys(&format!("{}:s:*", client.config().prefix()));
                check(server.dbsize() == keys_before + 1, || {
                    format!("{} keys after one write", server.dbsize())
                })?;
                check(keys.iter().any(|k| k.contains(id)), || {
                    format!("the new key is not the new id's: {keys:?}")
                })?;
                for k in keys {
                    let _: i64 = server.cmd(&["DEL", &k]);
                }
                Ok(())
            })
        })
    });
    let (sendable, refused_by_http) = (sendable.get(), refused_by_http.get());
    println!("random cookie headers: {sendable} sent, {refused_by_http} not representable in HTTP");
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(sendable > 100, "too few cookies could be sent: {sendable}");
}

/// What a forger tries, given one genuine cookie `MAC ‖ id`.
#[derive(Debug, Clone)]
enum Forgery {
    /// A well-formed id with a random 32-byte "signature".
    RandomMac { id: String, mac: Vec<u8> },
    /// The genuine id, its genuine signature with one bit flipped.
    FlippedBit { bit: usize },
    /// The genuine signature on another well-formed id.
    OtherId { id: String },
    /// The genuine id with a random signature.
    GenuineIdRandomMac { mac: Vec<u8> },
}

fn forgeries() -> impl Strategy<Value = Forgery> {
    let id = "[0-9a-f]{32}";
    let mac = proptest::collection::vec(any::<u8>(), 32);
    prop_oneof![
        (id, mac.clone()).prop_map(|(id, mac)| Forgery::RandomMac { id, mac }),
        (0usize..256).prop_map(|bit| Forgery::FlippedBit { bit }),
        id.prop_map(|id| Forgery::OtherId { id }),
        mac.prop_map(|mac| Forgery::GenuineIdRandomMac { mac }),
    ]
}

/// (b) Well-shaped forged cookies (a valid-format id and a signature of the right length) are
/// never accepted: the visitor is anonymous, the genuine session is neither read nor changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_cookies_of_the_right_shape_are_never_accepted() {
    let server = RedisServer::start();
    let client = RedisClient::connect(support::config(&server, "hostile-b"))
        .await
        .expect("connect");
    let app = app(&client);
    let genuine = send(&app, "GET", "/incr", None)
        .await
        .set_cookie
        .expect("a session");
    let value = genuine
        .strip_prefix(&format!("{COOKIE}="))
        .expect("our cookie");
    let (mac_b64, id) = value.split_at(value.len() - 32);
    let mac = base64::engine::general_purpose::STANDARD
        .decode(mac_b64)
        .expect("base64 MAC");
    assert_eq!(mac.len(), 32, "HMAC-SHA256");
    // The control: the genuine cookie reads its session.
    let r = send(&app, "GET", "/read", Some(genuine.parse().expect("header"))).await;
    assert_eq!(r.body, r#"{"a":null,"n":1}"#, "the genuine cookie works");

    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let handle = tokio::runtime::Handle::current();
    let result = tokio::task::block_in_place(|| {
        runner(200).run(&forgeries(), |forgery| {
            let forged = match &forgery {
                Forgery::RandomMac { id, mac } => format!("{}{id}", b64(mac)),
                Forgery::FlippedBit { bit } => {
                    let mut m = mac.clone();
                    m[bit / 8] ^= 1 << (bit % 8);
                    format!("{}{id}", b64(&m))
                }
                Forgery::OtherId { id: other } => format!("{mac_b64}{other}"),
                Forgery::GenuineIdRandomMac { mac } => format!("{}{id}", b64(mac)),
            };
            if forged == value {
                return Ok(()); // a random draw equal to the genuine cookie (never, in practice)
            }
            handle.block_on(async {
                let header: HeaderValue = format!("{COOKIE}={forged}").parse().expect("header");
                server.reset_stats();
                let r = send(&app, "GET", "/read", Some(header.clone())).await;
                check(
                    r.status == StatusCode::OK && r.body == r#"{"a":null,"n":null}"#,
                    || format!("{forgery:?} read {} {}", r.status, r.body),
                )?;
                let calls = data_commands(&server);
                check(calls.is_empty(), || {
                    format!("{forgery:?} reached Redis: {calls:?}")
                })?;
                // A write with it starts a new session and leaves the genuine one alone.
                let r = send(&app, "GET", "/incr", Some(header)).await;
                check(r.status == StatusCode::OK && r.body == "1", || {
                    format!("{forgery:?} incr {} {}", r.status, r.body)
                })?;
                let new = r.set_cookie.unwrap_or_default();
                check(!new.ends_with(id) && new.len() == genuine.len(), || {
                    format!("{forgery:?}: the new cookie {new:?}")
                })?;
                let key = format!(
                    "{}:s:{{{}}}",
                    client.config().prefix(),
                    &new[new.len() - 32..]
                );
                let _: i64 = server.cmd(&["DEL", &key]);
                Ok(())
            })
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let r = send(&app, "GET", "/read", Some(genuine.parse().expect("header"))).await;
    assert_eq!(
        r.body, r#"{"a":null,"n":1}"#,
        "the genuine session is unchanged"
    );
}

/// Field names: ours, herd's meta fields (`$c` created-at, `$m` moving, `$o` owner, `$i` idle
/// timeout), and arbitrary bytes.
fn fields() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"a".to_vec()),
        Just(b"n".to_vec()),
        Just(b"$c".to_vec()),
        Just(b"$m".to_vec()),
        Just(b"$o".to_vec()),
        Just(b"$i".to_vec()),
        "[a-z$]{1,6}".prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 0..24),
    ]
}

/// Values: arbitrary bytes (non-UTF-8 included), numbers (overflowing ones too), JSON of every
/// shape, deeply nested JSON, big strings.
fn values() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        "-?[0-9]{1,30}".prop_map(String::into_bytes),
        Just(i64::MAX.to_string().into_bytes()),
        Just(b"1e400".to_vec()),
        Just(b"\"text\"".to_vec()),
        Just(b"{\"k\":[1,2,{\"x\":null}]}".to_vec()),
        (1usize..3000).prop_map(|depth| {
            let mut v = "[".repeat(depth).into_bytes();
            v.extend("]".repeat(depth).into_bytes());
            v
        }),
        (1usize..200_000).prop_map(|n| format!("\"{}\"", "x".repeat(n)).into_bytes()),
    ]
}

/// (c) Garbage in a session hash (what another program, a bug or an attacker with Redis access
/// could leave): reading, incrementing and writing through the layer never panics and never hangs;
/// every answer is a 200, a fresh session, or an error status with herd's short JSON error body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_a_session_hash_never_crashes_the_layer() {
    let server = RedisServer::start();
    let client = RedisClient::connect(support::config(&server, "hostile-c"))
        .await
        .expect("connect");
    let app = app(&client);
    let prefix = client.config().prefix().to_owned();
    let handle = tokio::runtime::Handle::current();
    let statuses: RefCell<HashMap<(&str, u16), u32>> = RefCell::default();
    let strategy = proptest::collection::vec((fields(), values()), 1..6);
    let result = tokio::task::block_in_place(|| {
        runner(120).run(&strategy, |pairs| {
            handle.block_on(async {
                let made = send(&app, "GET", "/incr", None).await;
                let cookie = made.set_cookie.expect("a session");
                let key = format!("{prefix}:s:{{{}}}", &cookie[cookie.len() - 32..]);
                {
                    let mut conn = server.conn();
                    let mut hset = redis::cmd("HSET");
                    hset.arg(&key);
                    for (f, v) in &pairs {
                        hset.arg(f.as_slice()).arg(v.as_slice());
                    }
                    let _: i64 = hset.query(&mut conn).expect("HSET");
                }
                let header: HeaderValue = cookie.parse().expect("header");
                for (method, path) in [("GET", "/read"), ("GET", "/incr"), ("POST", "/set")] {
                    let r = tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        send(&app, method, path, Some(header.clone())),
                    )
                    .await
                    .map_err(|_| TestCaseError::fail(format!("{path} hung")))?;
                    *statuses
                        .borrow_mut()
                        .entry((path, r.status.as_u16()))
                        .or_default() += 1;
                    if r.status.is_success() {
                        continue;
                    }
                    let body: Value = serde_json::from_str(&r.body).map_err(|_| {
                        TestCaseError::fail(format!("{path}: {} with body {:?}", r.status, r.body))
                    })?;
                    check(
                        body["error"].as_str().is_some_and(|e| !e.is_empty()),
                        || format!("{path}: {} without an error message: {}", r.status, r.body),
                    )?;
                    check(
                        r.status.is_client_error() || r.status.is_server_error(),
                        || format!("{path}: {}", r.status),
                    )?;
                }
                for k in server.keys(&format!("{prefix}:s:*")) {
                    let _: i64 = server.cmd(&["DEL", &k]);
                }
                Ok(())
            })
        })
    });
    let mut statuses: Vec<_> = statuses.into_inner().into_iter().collect();
    statuses.sort();
    println!("garbage session hashes: answers by (route, status) {statuses:?}");
    if let Err(e) = result {
        panic!("{e}");
    }
    // The layer still serves a clean visitor.
    let r = send(&app, "GET", "/incr", None).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "1"));
}
