//! Why herd sends plain commands over one multiplexed connection: the same one-round-trip
//! `HINCRBY`+`PEXPIRE` from C concurrent tasks, through redis-rs' `ConnectionManager` (shared,
//! pipelined on the wire) and through a deadpool-redis pool of 16 connections, interleaved.
//!
//! `cargo run --release --manifest-path bench/Cargo.toml --bin multiplexed_vs_pool -- redis://127.0.0.1:PORT 64`
//! (use a Redis you can write `k0`..`kC` keys into; 3 rounds of 3 s per mode).

use std::time::{Duration, Instant};

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .ok_or("usage: multiplexed_vs_pool REDIS_URL CONCURRENCY")?;
    let concurrency: usize = args.next().ok_or("missing CONCURRENCY")?.parse()?;
    let secs = 3;
    let manager = redis::aio::ConnectionManager::new(redis::Client::open(url.as_str())?).await?;
    let mut config = deadpool_redis::Config::from_url(url);
    config.pool = Some(deadpool_redis::PoolConfig::new(16));
    let pool = config.create_pool(Some(deadpool_redis::Runtime::Tokio1))?;
    for round in 0..3 {
        for pooled in [false, true] {
            let start = Instant::now();
            let tasks: Vec<_> = (0..concurrency)
                .map(|t| {
                    let (manager, pool) = (manager.clone(), pool.clone());
                    tokio::spawn(async move {
                        let key = format!("k{t}");
                        let mut n = 0u64;
                        while start.elapsed() < Duration::from_secs(secs) {
                            let mut p = redis::pipe();
                            p.cmd("HINCRBY").arg(&key).arg("n").arg(1);
                            p.cmd("PEXPIRE").arg(&key).arg(60_000);
                            let r: redis::RedisResult<(i64, i64)> = if pooled {
                                match pool.get().await {
                                    Ok(mut c) => p.query_async(&mut c).await,
                                    Err(e) => panic!("pool: {e}"),
                                }
                            } else {
                                p.query_async(&mut manager.clone()).await
                            };
                            r.expect("redis");
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            let mut total = 0;
            for t in tasks {
                total += t.await?;
            }
            let mode = if pooled { "pool (16)" } else { "multiplexed" };
            println!(
                "round {round} {mode:12} concurrency {concurrency}: {:.0} ops/s",
                total as f64 / secs as f64
            );
        }
    }
    Ok(())
}
