//! A single-process axum app with a session counter.
//!
//! Run (needs a Redis on 127.0.0.1:6379, or set REDIS_URL):
//!
//! ```sh
//! cargo run --example counter
//! curl -c /tmp/jar -b /tmp/jar http://127.0.0.1:3000/   # 1, 2, 3, ... per cookie jar
//! ```

use axum::{routing::get, Router};
use herd::{Config, RedisClient, Session, SessionLayer};

async fn counter(session: Session) -> herd::Result<String> {
    // One round trip: HINCRBY in Redis, atomic even when many requests of this visitor race.
    let n = session.incr("counter", 1).await?;
    Ok(format!("You have been here {n} time(s).\n"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let redis = RedisClient::connect(Config::from_env()?).await?;
    let app = Router::new()
        .route("/", get(counter))
        // Plain http on localhost: browsers drop `Secure` cookies there. Keep the default in production.
        .layer(SessionLayer::new(redis).with_secure(false));
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("counter: listening on http://{addr}");
    axum::serve(listener, app).await?;
    Ok(())
}
