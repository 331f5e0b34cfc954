//! A process that competes for a lease, for the cross-process tests in `tests/lease.rs` (and a
//! small demonstration of [`herd::Lease`]).
//!
//! Run two or more side by side against one Redis and watch them take turns:
//!
//! ```sh
//! LEASE_LOG=/tmp/lease.log LEASE_STANDALONE=1 cargo run --example lease_worker &
//! LEASE_LOG=/tmp/lease.log LEASE_STANDALONE=1 cargo run --example lease_worker &
//! tail -f /tmp/lease.log
//! ```
//!
//! Environment: `REDIS_URL`, `HERD_PREFIX`, `LEASE_LOG` (the shared log, appended to),
//! `LEASE_TTL_MS` (default 1000), `LEASE_HOLD_MS` (hold this long, then release; 0 = until lost),
//! `LEASE_STANDALONE=1` (just compete, no HTTP; otherwise it runs under the herd launcher, as its
//! own master with `LEASE_WORKERS` workers on `LEASE_BIND`, or as a worker of `herd run`).
//!
//! While it believes it holds the lease, each process appends `HOLD <token> <pid> <µs>` lines,
//! taking the time *before* checking that it still holds it, so every logged instant lies within
//! its holding. After each line it makes a fenced write (`incr_fenced` of the variable `work`) and
//! logs `WRITE <token> <pid> <µs> <new value or "refused"> <held>`; the write after it found the
//! lease lost is made anyway, as a process paused between its check and its write would.

use std::io::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herd::globals::Group;
use herd::{Config, Globals, Lease, RedisClient};

fn env_ms(name: &str, default: u64) -> Duration {
    Duration::from_millis(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

fn log(line: &str) {
    let Some(path) = std::env::var_os("LEASE_LOG") else {
        println!("{line}");
        return;
    };
    // One `write` of a short line to an O_APPEND file: lines of several processes never mix.
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open LEASE_LOG");
    file.write_all(format!("{line}\n").as_bytes())
        .expect("write LEASE_LOG");
}

/// Competes for the lease forever.
async fn compete(lease: Lease, work: Group, hold: Duration) {
    let pid = std::process::id();
    loop {
        let guard = match lease.acquire().await {
            Ok(guard) => guard,
            Err(e) => {
                eprintln!("acquire: {e}");
                tokio::time::sleep(lease.ttl() / 4).await;
                continue;
            }
        };
        let kept = guard.keep();
        let token = kept.token();
        let started = tokio::time::Instant::now();
        loop {
            let t = now_us();
            let held = kept.is_held();
            if held {
                log(&format!("HOLD {token} {pid} {t}"));
            }
            let written = match work.incr_fenced("work", 1, token).await {
                Ok(Some(v)) => v.to_string(),
                Ok(None) => "refused".to_owned(),
                Err(e) => {
                    eprintln!("write: {e}");
                    "error".to_owned()
                }
            };
            log(&format!(
                "WRITE {token} {pid} {} {written} {}",
                now_us(),
                u8::from(held)
            ));
            if !held {
                break;
            }
            if !hold.is_zero() && started.elapsed() >= hold {
                if let Err(e) = kept.release().await {
                    eprintln!("release: {e}");
                }
                // Let the others have a go.
                tokio::time::sleep(lease.ttl() / 10).await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn setup() -> Result<(Lease, Group), herd::Error> {
    let redis = RedisClient::new(Config::from_env()?)?;
    let globals = Globals::new(redis);
    let lease = globals
        .lease("contest", env_ms("LEASE_TTL_MS", 1000))?
        .with_retry_every(Duration::from_millis(50));
    Ok((lease, globals.group("contest")?))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let hold = env_ms("LEASE_HOLD_MS", 0);
    if std::env::var_os("LEASE_STANDALONE").is_some() {
        let rt = tokio::runtime::Runtime::new()?;
        return rt.block_on(async {
            let (lease, work) = setup().await?;
            compete(lease, work, hold).await;
            Ok(())
        });
    }
    let workers = std::env::var("LEASE_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let bind = std::env::var("LEASE_BIND").unwrap_or_else(|_| "127.0.0.1:0".into());
    herd::launcher::Launcher::new()
        .workers(workers)
        .bind(bind)
        .run(move |worker| async move {
            let (lease, work) = setup().await?;
            let job = tokio::spawn(compete(lease, work, hold));
            let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
            let served = worker.serve(app).await;
            // Dropping the job drops its `KeptLease`, which releases the lease.
            job.abort();
            let _ = job.await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            served.map_err(Box::<dyn std::error::Error + Send + Sync>::from)
        })?;
    Ok(())
}
