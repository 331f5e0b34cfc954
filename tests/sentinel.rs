//! Sentinel failover under load: one primary, one replica, three sentinels. Requests increment a
//! session counter from several tasks; the primary is killed; herd asks the sentinels again and
//! serves from the promoted replica. Prints the measured recovery time and what was lost.
//! `cargo test --features sentinel --test sentinel -- --nocapture`.
#![cfg(feature = "sentinel")]

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use herd::RedisClient;
use http::StatusCode;
use support::sentinel::SentinelSetup;

/// The bound this test enforces on recovery, from the kill to the first successful request:
/// `down-after-milliseconds` (1 s) + the election and promotion (~1–3 s) + herd's reconnect.
const RECOVERY_BOUND: Duration = Duration::from_secs(15);

async fn send(
    app: &Router,
    path: &str,
    cookie: Option<&str>,
) -> (StatusCode, String, Option<String>) {
    support::cluster::request(app, "GET", path, cookie).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_under_load_recovers_within_a_bound() {
    let mut setup = SentinelSetup::start();
    let first_master = setup.master_port();
    assert_eq!(first_master, Some(setup.primary.port()));
    let config = herd::Config::builder()
        .redis_url(setup.url())
        .secret_base64(support::test_secret())
        .prefix(support::unique_prefix("sentinel"))
        .command_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .expect("config");
    let client = RedisClient::connect(config)
        .await
        .expect("connect via sentinel");
    let app = support::cluster::counter_app(&client);
    let (status, _, cookie) = send(&app, "/incr", None).await;
    assert_eq!(status, StatusCode::OK);
    let cookie = Arc::new(cookie.expect("cookie"));

    // Load: 4 tasks incrementing the same session counter as fast as they can.
    let acked = Arc::new(AtomicU64::new(1));
    let unknown = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // The first failure seen after the kill.
    let first_failure = Arc::new(Mutex::new(None::<Instant>));
    let first_success_after = Arc::new(Mutex::new(None::<Instant>));
    let killed_at = Arc::new(Mutex::new(None::<Instant>));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (app, cookie, acked, unknown, failed, stop) = (
            app.clone(),
            cookie.clone(),
            acked.clone(),
            unknown.clone(),
            failed.clone(),
            stop.clone(),
        );
        let (first_failure, first_success_after, killed_at) = (
            first_failure.clone(),
            first_success_after.clone(),
            killed_at.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let (status, body, _) = send(&app, "/incr", Some(&cookie)).await;
                let now = Instant::now();
                if status == StatusCode::OK {
                    acked.fetch_add(1, Ordering::Relaxed);
                    // Recovered: a request sent after the outage was seen succeeds.
                    let failed_at = *first_failure.lock().expect("lock");
                    if failed_at.is_some_and(|f| started > f) {
                        first_success_after.lock().expect("lock").get_or_insert(now);
                    }
                } else {
                    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
                    if body.contains("may not have been saved") {
                        unknown.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    if killed_at.lock().expect("lock").is_some() {
                        first_failure.lock().expect("lock").get_or_insert(now);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before_kill = acked.load(Ordering::Relaxed);
    assert!(before_kill > 10, "no load before the kill: {before_kill}");
    let kill_time = Instant::now();
    *killed_at.lock().expect("lock") = Some(kill_time);
    setup.primary.kill();

    // Wait for recovery (a success after at least one failure), bounded.
    loop {
        if first_success_after.lock().expect("lock").is_some() {
            break;
        }
        assert!(
            kill_time.elapsed() < RECOVERY_BOUND,
            "no recovery within {RECOVERY_BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered = first_success_after.lock().expect("lock").expect("set") - kill_time;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("load task");
    }
    assert_eq!(setup.master_port(), Some(setup.replica.port()), "promoted");

    let (status, body, _) = send(&app, "/get", Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let stored: u64 = body.parse().expect("a number");
    let acked = acked.load(Ordering::Relaxed);
    let unknown = unknown.load(Ordering::Relaxed);
    let lost = acked.saturating_sub(stored);
    println!(
        "sentinel failover: recovered {recovered:?} after the kill; {acked} increments acknowledged, \
         {stored} stored, {lost} acknowledged but lost (async replication), {unknown} outcome-unknown \
         (of which {} applied), {} refused (503)",
        stored.saturating_sub(acked - lost),
        failed.load(Ordering::Relaxed)
    );
    assert!(recovered < RECOVERY_BOUND);
    // Acknowledged writes lost: at most those not yet replicated when the primary died; on
    // loopback with a healthy link that is a handful at most.
    assert!(lost <= 8, "{lost} acknowledged increments lost");
    // Nothing is counted twice: every stored increment was acknowledged or had an unknown outcome.
    assert!(
        stored <= acked + unknown,
        "{stored} stored > {acked} acked + {unknown} unknown"
    );
}
