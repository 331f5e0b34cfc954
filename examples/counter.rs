//! A single-process axum app with a session counter.
//!
//! Run it with:
//!
//! ```sh
//! cargo run --example counter
//! curl -c /tmp/jar -b /tmp/jar http://127.0.0.1:3000/   # 1, 2, 3, ... per cookie jar
//! ```
//!
//! It uses the Redis at `REDIS_URL`; without `REDIS_URL` the one on `127.0.0.1:6379`, and if none
//! answers there and `redis-server` is installed, a private one started for the run. `ADDR` sets
//! the listening address (default `127.0.0.1:3000`); the other `HERD_*` variables are read as
//! `herd::Config::from_env` documents. Ctrl-C (or SIGTERM) stops it.

use std::process::ExitCode;

use axum::{routing::get, Router};
use herd::{ConfigBuilder, RedisClient, Session, SessionLayer};

async fn counter(session: Session) -> herd::Result<String> {
    // One round trip: HINCRBY in Redis, atomic even when many requests of this visitor race.
    let n = session.incr("counter", 1).await?;
    Ok(format!("You have been here {n} time(s).\n"))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("counter: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    // Kept until the end of `run`: a private redis-server stops when this is dropped.
    let redis_server = herd::testing::LocalRedis::find_or_start("counter")?;
    let config = ConfigBuilder::from_env()?
        .redis_url(redis_server.url())
        .build()?;
    let redis = RedisClient::connect(config)
        .await
        .map_err(|e| format!("no answer from the Redis at {}: {e}", redis_server.source()))?;
    let app = Router::new()
        .route("/", get(counter))
        // Plain http on localhost: browsers drop `Secure` cookies there. Keep the default in production.
        .layer(SessionLayer::from_env(redis)?.with_secure(false));
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    println!("counter: listening on http://{addr}");
    axum::serve(listener, app)
        .with_graceful_shutdown(stop_signal())
        .await?;
    Ok(())
}

/// Ctrl-C or SIGTERM: stop accepting, finish the requests in flight, then return (so that a
/// private redis-server is stopped too).
async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
