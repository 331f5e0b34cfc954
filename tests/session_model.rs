//! Model-based test of the session layer: random programs of 1–4 concurrent requests of one
//! visitor (plus "log out everywhere" from another task), interleaved at their Redis steps by a
//! scheduler that holds each request at the layer's pause points (`herd::session::pause`), run
//! against a real Redis — one server, and the test cluster with the `cluster` feature.
//!
//! After every step (all requests held or done) the Redis state is checked; after the program, the
//! responses and the browser's cookie. The reference model is the set of rules the module docs
//! promise:
//! * every live session's TTL follows its stored idle timeout (its own if set, else the layer's),
//!   capped by the absolute deadline and the owner index's coverage;
//! * a session key that was live and then gone is never live again (never resurrected); what
//!   stays under a cycled-away id is a tombstone (`$t` alone), nothing else;
//! * every response is `200` or `409`; a `409` for a cycled-away id carries no `Set-Cookie`;
//! * a login (a `cycle_id` that moved the visitor's session) is never undone: no response that
//!   completes after it sets or removes the cookie, and the browser ends with a live session;
//! * without logouts or clears, the counter ends at its start plus the acknowledged increments
//!   (each counted exactly once), and the acknowledged values are distinct;
//! * a per-session idle timeout stored is one the program set.
//!
//! `HERD_MODEL_CASES=N` runs N cases per topology (CI default: 48).

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::Router;
use herd::session::pause::{self, Step};
use herd::{RedisClient, Session, SessionLayer};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use support::topology::{config, request, TestRedis};
use tokio::sync::{mpsc, oneshot};

const LAYER_IDLE_MS: u64 = 60_000;
const ABSOLUTE_MS: u64 = 3_600_000;
const IDLES: [u64; 2] = [10_000, 600_000];

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Op {
    Get(u8),
    Insert(u8, u8),
    Remove(u8),
    Clear,
    Incr,
    Cycle,
    Destroy,
    SetOwner,
    SetIdle(u8),
}

fn key(k: u8) -> &'static str {
    ["a", "b"][usize::from(k % 2)]
}

#[derive(Clone, Debug)]
struct Program {
    /// The visitor starts with a session (`a=0`, `n=1`, owner `u`) and its cookie.
    existing: bool,
    requests: Vec<Vec<Op>>,
    destroy_owner: bool,
    /// Which held actor goes next, at each step.
    schedule: Vec<u8>,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..2).prop_map(Op::Get),
        3 => (0u8..2, 0u8..4).prop_map(|(k, v)| Op::Insert(k, v)),
        1 => (0u8..2).prop_map(Op::Remove),
        1 => Just(Op::Clear),
        3 => Just(Op::Incr),
        2 => Just(Op::Cycle),
        1 => Just(Op::Destroy),
        1 => Just(Op::SetOwner),
        1 => (0u8..2).prop_map(Op::SetIdle),
    ]
}

fn program() -> impl Strategy<Value = Program> {
    (
        any::<bool>(),
        prop::collection::vec(prop::collection::vec(op(), 1..=4), 1..=4),
        prop::bool::weighted(0.2),
        prop::collection::vec(any::<u8>(), 24),
    )
        .prop_map(|(existing, requests, destroy_owner, schedule)| Program {
            existing,
            requests,
            destroy_owner,
            schedule,
        })
}

// ---- the scheduler ----

enum Msg {
    Held(usize, Step, oneshot::Sender<()>),
    Done(usize),
}

tokio::task_local! {
    static ACTOR: (usize, mpsc::UnboundedSender<Msg>);
}

/// Installs the pause hook once per process: an actor (a task inside `ACTOR.scope`) is held at
/// each step until the scheduler lets it go; every other task passes.
fn install_hook() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        pause::install(|step| {
            let actor = ACTOR.try_with(|(id, tx)| (*id, tx.clone())).ok();
            Box::pin(async move {
                if let Some((id, tx)) = actor {
                    let (go, wait) = oneshot::channel();
                    if tx.send(Msg::Held(id, step, go)).is_ok() {
                        let _ = wait.await;
                    }
                }
            })
        });
    });
}

/// Acknowledged increments of the running program: (request, value).
type Acks = Arc<Mutex<Vec<(usize, i64)>>>;

#[derive(Clone)]
struct Ctx {
    acks: Acks,
}

fn app(client: &RedisClient, acks: Acks) -> Router {
    Router::new()
        .route(
            "/seed",
            post(|s: Session| async move {
                s.insert("a", 0).await?;
                s.incr("n", 1).await?;
                s.set_owner("u").await?;
                Ok::<_, herd::Error>("ok")
            }),
        )
        .route(
            "/prog/{req}/{ops}",
            post(
                |s: Session,
                 axum::extract::State(ctx): axum::extract::State<Ctx>,
                 axum::extract::Path((req, ops)): axum::extract::Path<(usize, String)>| async move {
                    let ops: Vec<Op> = serde_json::from_str(&ops).expect("ops");
                    let mut out = Vec::new();
                    for op in ops {
                        match op {
                            Op::Get(k) => {
                                let v: Option<serde_json::Value> = s.get(key(k)).await?;
                                out.push(format!("{v:?}"));
                            }
                            Op::Insert(k, v) => s.insert(key(k), v).await?,
                            Op::Remove(k) => s.remove(key(k)).await?,
                            Op::Clear => s.clear().await,
                            Op::Incr => {
                                let n = s.incr("n", 1).await?;
                                ctx.acks.lock().expect("acks").push((req, n));
                            }
                            Op::Cycle => s.cycle_id().await,
                            Op::Destroy => s.destroy().await,
                            Op::SetOwner => s.set_owner("u").await?,
                            Op::SetIdle(i) => {
                                s.set_idle_timeout(Duration::from_millis(IDLES[usize::from(i % 2)]))
                                    .await
                            }
                        }
                    }
                    Ok::<_, herd::Error>(out.join(","))
                },
            ),
        )
        .with_state(Ctx { acks })
        .layer(
            SessionLayer::new(client.clone()).with_key(support::test_key())
                .with_secure(false)
                .with_idle_timeout(Duration::from_millis(LAYER_IDLE_MS))
                .with_absolute_timeout(Duration::from_millis(ABSOLUTE_MS)),
        )
}

struct Reply {
    status: u16,
    /// `name=value` of the first `Set-Cookie` (an empty value: removal).
    set_cookie: Option<String>,
}

/// What Redis holds for the app: live session keys (with `$c`) and every other key's fields.
struct Snapshot {
    live: Vec<String>,
}

fn snapshot(redis: &TestRedis, prefix: &str, what: &str) -> Snapshot {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let mut live = Vec::new();
    for k in redis.keys(&format!("{prefix}:s:*")) {
        // The record and the TTL of one moment: a background refresh (not held by the scheduler)
        // may land between two reads; read again until the record did not change around the PTTL.
        let (fields, pttl) = loop {
            let before: std::collections::HashMap<String, String> = redis.cmd(&["HGETALL", &k]);
            let pttl: i64 = redis.cmd(&["PTTL", &k]);
            let after: Option<String> = redis.cmd(&["HGET", &k, "$c"]);
            if before.get("$c") == after.as_ref() {
                break (before, pttl);
            }
        };
        let Some(record) = fields.get("$c") else {
            // Not a session: only a tombstone (or a cluster cycle's mark) may be here.
            let names: HashSet<&str> = fields.keys().map(String::as_str).collect();
            assert!(
                names.is_empty() || names == HashSet::from(["$t"]),
                "{what}: a stray hash {k}: {fields:?}"
            );
            continue;
        };
        let parts: Vec<&str> = record.split(':').collect();
        let num = |i: usize| parts.get(i).and_then(|p| p.parse::<u64>().ok());
        let created = num(0).expect("created");
        let idle = num(2);
        if let Some(idle) = idle {
            assert!(
                IDLES.contains(&idle),
                "{what}: stored idle {idle}, never set"
            );
        }
        let idle = idle.unwrap_or(LAYER_IDLE_MS);
        let mut limit = idle.min((created + ABSOLUTE_MS).saturating_sub(now));
        if let (Some(indexed), true) = (num(3), fields.contains_key("$o")) {
            limit = limit.min(indexed.saturating_sub(now));
        }
        assert!(pttl > 0, "{what}: {k} has no TTL ({pttl})");
        // Slack for the time since the write (and clock reads of the two processes).
        assert!(
            (pttl as u64) <= limit + 2000,
            "{what}: {k} TTL {pttl} over its limit {limit} ({record})"
        );
        live.push(k);
    }
    Snapshot { live }
}

/// What a run covered, summed over its cases (a guard against a model that checks nothing).
#[derive(Default)]
struct Coverage {
    steps: usize,
    logins: usize,
    calm: usize,
    conflicts: usize,
}

async fn run_case(
    redis: &TestRedis,
    case: usize,
    p: &Program,
    coverage: &Mutex<Coverage>,
) -> Result<(), TestCaseError> {
    install_hook();
    let cfg = config(redis, &format!("model{case}"));
    let prefix = cfg.prefix().to_owned();
    let client = RedisClient::new(cfg).expect("client");
    let acks: Acks = Arc::default();
    let router = app(&client, acks.clone());
    let what = format!("{p:?}");

    let mut cookie: Option<String> = None;
    if p.existing {
        let (status, body, set) = request(&router, "POST", "/seed", None).await;
        prop_assert_eq!(status.as_u16(), 200, "seed: {}", body);
        cookie = set;
    }
    let seeded: Vec<String> = snapshot(redis, &prefix, &what).live;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for (i, ops) in p.requests.iter().enumerate() {
        let path = format!(
            "/prog/{i}/{}",
            urlencode(&serde_json::to_string(ops).expect("json"))
        );
        let router = router.clone();
        let cookie = cookie.clone();
        let tx = tx.clone();
        tasks.push(tokio::spawn(ACTOR.scope((i, tx.clone()), async move {
            let (status, _, set_cookie) = request(&router, "POST", &path, cookie.as_deref()).await;
            let _ = tx.send(Msg::Done(i));
            Some(Reply {
                status: status.as_u16(),
                set_cookie,
            })
        })));
    }
    if p.destroy_owner {
        let i = p.requests.len();
        let store = herd::SessionStore::new(client.clone());
        let tx = tx.clone();
        tasks.push(tokio::spawn(ACTOR.scope((i, tx.clone()), async move {
            store.destroy_owner("u").await.expect("destroy_owner");
            let _ = tx.send(Msg::Done(i));
            None
        })));
    }
    drop(tx);

    let mut running = tasks.len();
    let mut held: Vec<(usize, Step, oneshot::Sender<()>)> = Vec::new();
    let mut order: Vec<usize> = Vec::new();
    let mut ever_live: HashSet<String> = seeded.iter().cloned().collect();
    let mut gone: HashSet<String> = HashSet::new();
    let mut step = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        while running > 0 {
            let msg = tokio::time::timeout_at(deadline.into(), rx.recv())
                .await
                .expect("a program got stuck")
                .expect("channel");
            running -= 1;
            match msg {
                Msg::Held(id, s, go) => held.push((id, s, go)),
                Msg::Done(id) => order.push(id),
            }
        }
        // Everyone is held or done: check Redis.
        let snap = snapshot(redis, &prefix, &what);
        for k in &snap.live {
            prop_assert!(!gone.contains(k), "{}: {} was resurrected", what, k);
            ever_live.insert(k.clone());
        }
        for k in &ever_live {
            if !snap.live.contains(k) {
                gone.insert(k.clone());
            }
        }
        if held.is_empty() {
            break;
        }
        let pick = usize::from(p.schedule[step % p.schedule.len()]) % held.len();
        step += 1;
        let (_, _, go) = held.remove(pick);
        running += 1;
        let _ = go.send(());
    }

    coverage.lock().expect("coverage").steps += step;
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.expect("task"));
    }
    // The browser applies cookies in the order responses complete.
    let mut browser = cookie.clone();
    let mut login_done = false;
    for &i in &order {
        let Some(reply) = &replies[i] else { continue };
        prop_assert!(
            reply.status == 200 || reply.status == 409,
            "{}: request {} got {}",
            what,
            i,
            reply.status
        );
        if login_done {
            prop_assert!(
                reply.set_cookie.is_none(),
                "{}: request {} completed after the login and sent {:?}",
                what,
                i,
                reply.set_cookie
            );
        }
        if let Some(set) = &reply.set_cookie {
            browser = if set.ends_with('=') {
                None
            } else {
                Some(set.clone())
            };
        }
        // A login: this request cycled the visitor's (live) session; its old key is a tombstone.
        let cycled = p.existing
            && reply.status == 200
            && reply
                .set_cookie
                .as_deref()
                .is_some_and(|c| !c.ends_with('='))
            && p.requests[i].iter().any(|o| matches!(o, Op::Cycle))
            && !p.requests[i].iter().any(|o| matches!(o, Op::Destroy))
            && seeded
                .iter()
                .all(|k| redis.cmd::<Option<String>>(&["HGET", k, "$t"]).is_some());
        login_done |= cycled;
        if reply.status == 409 {
            coverage.lock().expect("coverage").conflicts += 1;
        }
    }
    if login_done {
        coverage.lock().expect("coverage").logins += 1;
    }

    let all_ops = || p.requests.iter().flatten();
    let calm =
        p.existing && !p.destroy_owner && !all_ops().any(|o| matches!(o, Op::Destroy | Op::Clear));
    if calm || login_done && !p.destroy_owner && !all_ops().any(|o| matches!(o, Op::Destroy)) {
        // The browser ends with a live session.
        let c = browser.clone().expect("the browser lost its cookie");
        let (status, body, _) =
            request(&router, "POST", "/prog/99/%5B%22Incr%22%5D", Some(&c)).await;
        prop_assert_eq!(
            status.as_u16(),
            200,
            "{}: the final cookie does not work: {}",
            what,
            body
        );
        acks.lock().expect("acks").pop();
    }
    if calm {
        coverage.lock().expect("coverage").calm += 1;
        // Each acknowledged increment counted once, in the session the browser ends with.
        let acks = acks.lock().expect("acks").clone();
        let mut values: Vec<i64> = acks.iter().map(|(_, n)| *n).collect();
        values.sort_unstable();
        let before = values.len();
        values.dedup();
        prop_assert_eq!(
            values.len(),
            before,
            "{}: an increment counted twice: {:?}",
            what,
            acks
        );
        let live = snapshot(redis, &prefix, &what).live;
        prop_assert_eq!(live.len(), 1, "{}: {:?}", what, live);
        // The final check above incremented once more.
        let n: i64 = redis.cmd(&["HGET", &live[0], "n"]);
        prop_assert_eq!(
            n,
            1 + acks.len() as i64 + 1,
            "{}: counter {} after acks {:?}",
            what,
            n,
            acks
        );
    }
    Ok(())
}

/// Percent-encodes the characters of a JSON op list that a path segment cannot hold.
fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn cases() -> u32 {
    std::env::var("HERD_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48)
}

fn run_model(redis: &TestRedis) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let counter = std::sync::atomic::AtomicUsize::new(0);
    let coverage = Mutex::new(Coverage::default());
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&program(), |p| {
        let case = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        rt.block_on(run_case(redis, case, &p, &coverage))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let c = coverage.into_inner().expect("coverage");
    let n = cases() as usize;
    println!(
        "{n} cases: {} interleaved steps, {} logins checked, {} counter checks, {} conflicts",
        c.steps, c.logins, c.calm, c.conflicts
    );
    assert!(c.steps >= n, "the programs were not interleaved");
    if n >= 32 {
        assert!(
            c.logins > 0 && c.calm > 0 && c.conflicts > 0,
            "the programs missed the rules"
        );
    }
}

#[test]
fn model_on_one_server() {
    run_model(&TestRedis::Single(support::RedisServer::start()));
}

#[cfg(feature = "cluster")]
#[test]
fn model_on_a_cluster() {
    run_model(&TestRedis::Cluster(support::cluster::RedisCluster::start()));
}
