//! TLS (`rediss://`): a server with certificates made for this run; the right CA connects and
//! serves sessions, a wrong CA (or none: the system roots) fails clearly and quickly.
//! `cargo test --features tls --test tls`.
#![cfg(feature = "tls")]

mod support;

use std::time::{Duration, Instant};

use herd::{Config, RedisClient, Session, SessionLayer};
use support::tls::TlsRedis;

fn config(server: &TlsRedis, ca: Option<std::path::PathBuf>) -> herd::Result<Config> {
    let mut b = Config::builder()
        .redis_url(server.url())
        .prefix(support::unique_prefix("tls"))
        .command_timeout(Duration::from_millis(1000))
        .connect_timeout(Duration::from_millis(1000));
    if let Some(ca) = ca {
        b = b.ca_file(ca);
    }
    b.build()
}

#[tokio::test]
async fn the_right_ca_connects_and_serves_sessions() {
    use axum::routing::get;
    use tower::ServiceExt;
    let server = TlsRedis::start();
    let client = RedisClient::connect(config(&server, Some(server.ca_file())).expect("config"))
        .await
        .expect("TLS with the right CA must connect");
    let app = axum::Router::new()
        .route(
            "/incr",
            get(|s: Session| async move { s.incr("n", 1).await.map(|n| n.to_string()) }),
        )
        .layer(
            SessionLayer::new(client.clone())
                .with_key(support::test_key())
                .with_secure(false),
        );
    let res = app
        .clone()
        .oneshot(
            http::Request::get("/incr")
                .body(axum::body::Body::empty())
                .expect("req"),
        )
        .await
        .expect("infallible");
    assert_eq!(res.status(), http::StatusCode::OK);
    let cookie = res.headers()[http::header::SET_COOKIE]
        .to_str()
        .expect("ascii")
        .split(';')
        .next()
        .expect("cookie")
        .to_owned();
    let res = app
        .oneshot(
            http::Request::get("/incr")
                .header(http::header::COOKIE, cookie)
                .body(axum::body::Body::empty())
                .expect("req"),
        )
        .await
        .expect("infallible");
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(&body[..], b"2", "the session lives on the TLS server");
}

#[tokio::test]
async fn a_wrong_ca_or_no_ca_fails_clearly() {
    let server = TlsRedis::start();
    for (what, ca) in [
        ("a wrong CA", Some(server.wrong_ca_file())),
        ("the system roots", None),
    ] {
        let start = Instant::now();
        let err = RedisClient::connect(config(&server, ca).expect("config"))
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: connected to a server it must not trust"));
        let took = start.elapsed();
        assert!(err.is_unavailable(), "{what}: {err:?}");
        let chain = format!("{err} / {:?}", std::error::Error::source(&err));
        println!("{what}: {chain} ({took:?})");
        assert!(
            err.to_string().contains(
                "the Redis server's TLS certificate is not trusted (check HERD_REDIS_CA_FILE)"
            ),
            "{what}: the error must say the certificate is not trusted and what to check: {chain}"
        );
        assert!(
            chain.contains("UnknownIssuer"),
            "{what}: the cause must name the problem: {chain}"
        );
        assert!(took < Duration::from_secs(2), "{what}: took {took:?}");
    }
}

#[test]
fn a_missing_ca_file_is_a_startup_error() {
    let err = Config::builder()
        .redis_url("rediss://127.0.0.1:1")
        .ca_file("/nonexistent/ca.pem")
        .build()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("cannot read the Redis CA file"), "{err}");
}

/// The pool of dedicated connections (`WATCH`, for globals `update`) goes over TLS too, with the
/// configured CA: an `update` and an atomic group work on a `rediss://` server, and with a wrong CA
/// an `update` fails clearly (not trusted) instead of falling back to anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn globals_update_uses_tls_pooled_connections() {
    use herd::globals::UpdateError;
    use herd::Globals;
    let server = TlsRedis::start();
    let client = RedisClient::connect(config(&server, Some(server.ca_file())).expect("config"))
        .await
        .expect("TLS with the right CA must connect");
    let group = Globals::new(client).group("tls").expect("group");
    let add = |group: herd::globals::Group| async move {
        group
            .update(&["x"], |v: &mut [Option<i64>]| {
                v[0] = Some(v[0].unwrap_or(0) + 1);
                Ok::<(), std::convert::Infallible>(())
            })
            .await
    };
    // Concurrent updates: several pooled connections, each a TLS connection.
    let tasks: Vec<_> = (0..8).map(|_| tokio::spawn(add(group.clone()))).collect();
    for t in tasks {
        t.await.expect("task").expect("update over TLS");
    }
    group
        .atomic()
        .set("a", &1_i64)
        .incr("x", 10)
        .apply()
        .await
        .expect("atomic group over TLS");
    assert_eq!(group.get::<i64>("x").await.expect("read"), Some(18));

    // With a wrong CA: a client built lazily (no PING first) fails its first update clearly.
    let wrong = RedisClient::new(config(&server, Some(server.wrong_ca_file())).expect("config"))
        .expect("client");
    let err = match add(Globals::new(wrong).group("tls").expect("group")).await {
        Err(UpdateError::Failed(e)) => e,
        other => panic!("an update with a wrong CA: {other:?}"),
    };
    let chain = format!("{err} / {:?}", std::error::Error::source(&err));
    println!("update with a wrong CA: {chain}");
    assert!(err.is_unavailable(), "{err:?}");
    assert!(
        err.to_string().contains(
            "the Redis server's TLS certificate is not trusted (check HERD_REDIS_CA_FILE)"
        ),
        "the pooled connection's error must say what the shared one says: {chain}"
    );
}
