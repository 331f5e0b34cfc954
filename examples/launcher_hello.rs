//! A minimal axum app under the herd launcher (no Redis).
//!
//! Run: `cargo run --example launcher_hello -- 127.0.0.1:3000 4`
//! (arguments: bind address, number of workers), then `curl localhost:3000` a few times:
//! different pids answer. `kill -HUP <master pid>` reloads, `Ctrl-C` drains and stops.
//!
//! It also runs unmodified under `herd run -- target/debug/examples/launcher_hello` or systemd
//! socket activation. Routes: `/` answers `pid=.. index=.. generation=..`, `/slow?ms=N` sleeps
//! first (to watch graceful draining).

use std::time::Duration;

use axum::{extract::Query, routing::get, Router};
use herd::launcher::Launcher;

#[derive(serde::Deserialize)]
struct Slow {
    ms: u64,
}

fn main() -> Result<(), herd::launcher::Error> {
    // Master and workers log through tracing; the master's lines about workers start with "herd:".
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let bind = args.next().unwrap_or_else(|| "127.0.0.1:3000".into());
    let workers = args.next().and_then(|n| n.parse().ok()).unwrap_or(2);

    Launcher::new()
        .workers(workers)
        .bind(bind)
        .drain_timeout(Duration::from_secs(10))
        .run(|worker| async move {
            let me = format!(
                "pid={} index={} generation={}",
                std::process::id(),
                worker.index().map_or("-".into(), |i| i.to_string()),
                worker.generation()
            );
            let slow_me = me.clone();
            let app = Router::new()
                .route("/", get(move || async move { me }))
                .route(
                    "/slow",
                    get(move |Query(q): Query<Slow>| async move {
                        tokio::time::sleep(Duration::from_millis(q.ms)).await;
                        slow_me
                    }),
                )
                .layer(worker.requests());
            println!("serving");
            // Reports READY, stops accepting on SIGTERM, then drains in-flight requests.
            worker.serve(app).await
        })
}
