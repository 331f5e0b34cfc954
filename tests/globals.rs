//! Shared globals against a real Redis, in one process: the API, atomic groups and their failures,
//! `update` (conflicts, aborts, cancellation, timeouts), round trips per operation, pub/sub.
//! The claims about several processes are in `globals_processes.rs`.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use herd::globals::{Outcome, Received, UpdateError};
use herd::{Error, Globals, RedisClient};
use support::{config, unique_prefix, RedisServer};

fn globals_for(server: &RedisServer, name: &str) -> Globals {
    Globals::new(RedisClient::new(config(server, name)).expect("client"))
}

/// A config with roomy timeouts, for tests that load the machine.
fn roomy_config(server: &RedisServer, name: &str) -> herd::Config {
    herd::Config::builder()
        .redis_url(server.url())
        .prefix(unique_prefix(name))
        .command_timeout(Duration::from_secs(2))
        .pool_wait_timeout(Duration::from_secs(10))
        .build()
        .expect("config")
}

fn key(globals: &Globals, group: &str, name: &str) -> String {
    format!(
        "{}:g:{{{group}}}:{name}",
        globals.client().config().prefix()
    )
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Motd {
    text: String,
    level: u8,
}

#[tokio::test]
async fn typed_variables() {
    let server = RedisServer::start();
    let globals = globals_for(&server, "typed");
    let g = globals.group("site").unwrap();

    assert_eq!(g.get::<Motd>("motd").await.unwrap(), None);
    let motd = Motd {
        text: "hello".into(),
        level: 2,
    };
    g.set("motd", &motd).await.unwrap();
    assert_eq!(g.get::<Motd>("motd").await.unwrap(), Some(motd));
    // The key layout is the documented one (group = hash tag).
    let raw: String = server.cmd(&["GET", &key(&globals, "site", "motd")]);
    assert_eq!(raw, r#"{"text":"hello","level":2}"#);

    // Counters are plain integers: INCRBY works on what `set` wrote and `get::<i64>` reads them.
    assert_eq!(g.incr("hits", 5).await.unwrap(), 5);
    assert_eq!(g.decr("hits", 2).await.unwrap(), 3);
    g.set("hits", &40_i64).await.unwrap();
    assert_eq!(g.incr("hits", 2).await.unwrap(), 42);
    assert_eq!(g.get::<i64>("hits").await.unwrap(), Some(42));
    let err = g.incr("motd", 1).await.unwrap_err();
    assert!(
        matches!(err, Error::NotAnInteger { ref key } if key == "motd"),
        "{err:?}"
    );

    // A consistent snapshot of several variables, with gaps.
    let many = g
        .get_many::<serde_json::Value>(&["hits", "nope", "motd"])
        .await
        .unwrap();
    assert_eq!(many[0], Some(serde_json::json!(42)));
    assert_eq!(many[1], None);
    assert_eq!(many[2].as_ref().unwrap()["level"], 2);
    assert!(g.get_many::<i64>(&[]).await.unwrap().is_empty());

    // Delete.
    assert!(g.delete("hits").await.unwrap());
    assert!(!g.delete("hits").await.unwrap());
    assert_eq!(g.get::<i64>("hits").await.unwrap(), None);

    // TTL.
    g.set_with_ttl("flash", &"soon gone", Duration::from_millis(300))
        .await
        .unwrap();
    let pttl: i64 = server.cmd(&["PTTL", &key(&globals, "site", "flash")]);
    assert!(pttl > 0 && pttl <= 300, "{pttl}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(g.get::<String>("flash").await.unwrap(), None);

    // Decoding into the wrong type is a clear error.
    g.set("word", &"abc").await.unwrap();
    let err = g.get::<i64>("word").await.unwrap_err();
    assert!(
        matches!(err, Error::Decode { ref key, .. } if key == "word"),
        "{err:?}"
    );
}

#[tokio::test]
async fn names_and_limits_are_checked_before_anything_is_sent() {
    let server = RedisServer::start();
    let client = RedisClient::new(config(&server, "names")).unwrap();
    let globals = Globals::new(client.clone()).with_max_value_size(100);
    for bad in ["", "a}b", "{x}", "a b", "x*"] {
        assert!(
            matches!(globals.group(bad), Err(Error::InvalidName { .. })),
            "{bad:?}"
        );
    }
    let g = globals.group("limits").unwrap();
    let before = client.round_trips();
    assert!(matches!(
        g.get::<i64>("a{b}").await,
        Err(Error::InvalidName { .. })
    ));
    assert!(matches!(
        g.set("big", &"x".repeat(200)).await,
        Err(Error::TooLarge {
            size: 202,
            limit: 100,
            ..
        })
    ));
    let names: Vec<String> = (0..=herd::globals::MAX_GROUP_LEN)
        .map(|i| format!("v{i}"))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert!(matches!(
        g.get_many::<i64>(&names).await,
        Err(Error::GroupTooLarge { .. })
    ));
    // A bad write poisons the whole group: nothing is sent.
    let err = g
        .atomic()
        .set("ok", &1)
        .set("bad name", &2)
        .set("ok2", &3)
        .apply()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidName { .. }), "{err:?}");
    assert!(g.atomic().apply().await.unwrap().is_empty());
    assert_eq!(client.round_trips(), before, "nothing may reach Redis");
    assert_eq!(server.dbsize(), 0);
}

#[tokio::test]
async fn atomic_group_applies_everything_and_reports_each_outcome() {
    let server = RedisServer::start();
    let globals = globals_for(&server, "atomic");
    let g = globals.group("inv").unwrap();
    g.set("apples", &10).await.unwrap();
    g.set("old", &true).await.unwrap();
    let outcomes = g
        .atomic()
        .decr("apples", 3)
        .incr("sold", 3)
        .set("last", &"now")
        .set_with_ttl("lock", &1, Duration::from_secs(30))
        .delete("old")
        .delete("never-was")
        .apply()
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![
            Outcome::Counter(7),
            Outcome::Counter(3),
            Outcome::Set,
            Outcome::Set,
            Outcome::Deleted(true),
            Outcome::Deleted(false),
        ]
    );
    assert_eq!(
        g.get::<String>("last").await.unwrap().as_deref(),
        Some("now")
    );
    let pttl: i64 = server.cmd(&["PTTL", &key(&globals, "inv", "lock")]);
    assert!(pttl > 29_000, "{pttl}");
}

#[tokio::test]
async fn wrongtype_inside_exec_is_reported_with_its_position() {
    let server = RedisServer::start();
    let globals = globals_for(&server, "wrongtype");
    let g = globals.group("grp").unwrap();
    // `b` is a list, put there behind herd's back.
    let _: i64 = server.cmd(&["LPUSH", &key(&globals, "grp", "b"), "x"]);
    let err = g
        .atomic()
        .set("a", &1)
        .incr("b", 1)
        .set("c", &2)
        .apply()
        .await
        .unwrap_err();
    match &err {
        Error::GroupCommandFailed { index, source } => {
            assert_eq!(*index, 1);
            assert!(source.to_string().contains("WRONGTYPE"), "{source}");
        }
        other => panic!("expected GroupCommandFailed, got {other:?}"),
    }
    // Redis does not roll back: the other commands of the group ran (as documented).
    assert_eq!(g.get::<i64>("a").await.unwrap(), Some(1));
    assert_eq!(g.get::<i64>("c").await.unwrap(), Some(2));

    // A failure at position 0 and one at the end are located as well.
    let err = g.atomic().incr("b", 1).apply().await.unwrap_err();
    assert!(
        matches!(err, Error::GroupCommandFailed { index: 0, .. }),
        "{err:?}"
    );
    let err = g
        .atomic()
        .set("a", &5)
        .delete("c")
        .incr("b", 1)
        .apply()
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::GroupCommandFailed { index: 2, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn execabort_on_a_read_only_server_applies_nothing_and_the_app_recovers() {
    let server = RedisServer::start();
    let globals = globals_for(&server, "readonly");
    let g = globals.group("grp").unwrap();
    g.set("a", &1).await.unwrap();

    // Turn the server into a replica of a dead address: it refuses writes (READONLY), which makes
    // every write inside MULTI abort the transaction with EXECABORT.
    let _: () = server.cmd(&["REPLICAOF", "127.0.0.1", "1"]);
    let err = g
        .atomic()
        .set("a", &2)
        .incr("b", 1)
        .apply()
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(format!("{err}").contains("unavailable"), "{err}");
    let err = g
        .update(&["a"], |v: &mut [Option<i64>]| {
            v[0] = Some(99);
            Ok::<_, std::convert::Infallible>(())
        })
        .await
        .unwrap_err();
    assert!(err.failed().is_some_and(Error::is_unavailable), "{err:?}");
    // Reads still work on a stale replica, and show that nothing was applied.
    assert_eq!(
        g.get_many::<i64>(&["a", "b"]).await.unwrap(),
        vec![Some(1), None]
    );

    let _: () = server.cmd(&["REPLICAOF", "NO", "ONE"]);
    g.atomic().set("a", &2).incr("b", 1).apply().await.unwrap();
    assert_eq!(
        g.get_many::<i64>(&["a", "b"]).await.unwrap(),
        vec![Some(2), Some(1)]
    );
}

#[tokio::test]
async fn execabort_from_an_acl_rule_names_the_refused_command() {
    let server = RedisServer::start();
    // A user who may read and run transactions but not write.
    let _: () = server.cmd(&[
        "ACL", "SETUSER", "reader", "on", ">pw", "~*", "&*", "+@all", "-@write",
    ]);
    let admin = globals_for(&server, "acl");
    let prefix = admin.client().config().prefix().to_owned();
    admin.group("grp").unwrap().set("a", &1).await.unwrap();

    let url = server.url().replace("redis://", "redis://reader:pw@");
    let cfg = herd::Config::builder()
        .redis_url(url)
        .prefix(prefix)
        .build()
        .unwrap();
    let reader = Globals::new(RedisClient::connect(cfg).await.unwrap());
    let g = reader.group("grp").unwrap();
    let err = g
        .atomic()
        .set("a", &2)
        .set("b", &2)
        .apply()
        .await
        .unwrap_err();
    match &err {
        Error::GroupAborted { index, source } => {
            assert_eq!(*index, 0);
            assert!(source.to_string().contains("no permissions"), "{source}");
        }
        other => panic!("expected GroupAborted, got {other:?}"),
    }
    assert_eq!(
        g.get_many::<i64>(&["a", "b"]).await.unwrap(),
        vec![Some(1), None]
    );
    // The client keeps working.
    assert_eq!(g.get::<i64>("a").await.unwrap(), Some(1));
}

#[derive(Debug, PartialEq)]
struct InsufficientFunds {
    balance: i64,
}

async fn transfer(
    bank: &herd::globals::Group,
    from: &str,
    to: &str,
    amount: i64,
) -> Result<i64, UpdateError<InsufficientFunds>> {
    bank.update(&[from, to], |b: &mut [Option<i64>]| {
        let balance = b[0].unwrap_or(0);
        if balance < amount {
            return Err(InsufficientFunds { balance });
        }
        b[0] = Some(balance - amount);
        b[1] = Some(b[1].unwrap_or(0) + amount);
        Ok(balance - amount)
    })
    .await
}

#[tokio::test]
async fn update_commits_or_refuses_with_the_callers_error() {
    let server = RedisServer::start();
    let globals = globals_for(&server, "update");
    let bank = globals.group("bank").unwrap();
    bank.set("alice", &100_i64).await.unwrap();
    bank.set_with_ttl("bob", &0_i64, Duration::from_secs(100))
        .await
        .unwrap();

    assert_eq!(transfer(&bank, "alice", "bob", 30).await.unwrap(), 70);
    assert_eq!(
        bank.get_many::<i64>(&["alice", "bob"]).await.unwrap(),
        vec![Some(70), Some(30)]
    );
    // The expiry of a variable survives an update (SET … KEEPTTL).
    let pttl: i64 = server.cmd(&["PTTL", &key(&globals, "bank", "bob")]);
    assert!(pttl > 90_000, "{pttl}");

    // A refused transfer returns the caller's error and writes nothing: no MULTI, no SET.
    server.reset_stats();
    let err = transfer(&bank, "alice", "bob", 1_000).await.unwrap_err();
    assert!(
        matches!(err, UpdateError::Aborted(InsufficientFunds { balance: 70 })),
        "{err:?}"
    );
    let calls = server.command_calls();
    for cmd in ["multi", "exec", "set", "del"] {
        assert_eq!(calls.get(cmd), None, "{cmd} was sent: {calls:?}");
    }
    assert_eq!(
        bank.get_many::<i64>(&["alice", "bob"]).await.unwrap(),
        vec![Some(70), Some(30)]
    );

    // Setting a value to None deletes it; an unchanged value is not rewritten.
    bank.update(&["alice", "bob"], |b: &mut [Option<i64>]| {
        b[1] = None;
        Ok::<_, std::convert::Infallible>(())
    })
    .await
    .unwrap();
    assert_eq!(
        bank.get_many::<i64>(&["alice", "bob"]).await.unwrap(),
        vec![Some(70), None]
    );

    // No variables: the closure runs once, nothing is sent.
    let r = bank
        .update(&[], |v: &mut [Option<i64>]| Ok::<_, ()>(v.len()))
        .await;
    assert_eq!(r.unwrap(), 0);

    // A variable named twice is refused: two competing new values would be ambiguous.
    let err = transfer(&bank, "alice", "alice", 1).await.unwrap_err();
    assert!(
        matches!(err.failed(), Some(Error::InvalidName { .. })),
        "{err:?}"
    );

    // With `Infallible`, `?` turns an UpdateError into a herd::Error.
    async fn double(bank: &herd::globals::Group) -> herd::Result<i64> {
        let n = bank
            .update(&["alice"], |b: &mut [Option<i64>]| {
                let n = b[0].unwrap_or(0) * 2;
                b[0] = Some(n);
                Ok::<_, std::convert::Infallible>(n)
            })
            .await?;
        Ok(n)
    }
    assert_eq!(double(&bank).await.unwrap(), 140);
}

#[tokio::test]
async fn update_retries_conflicts_then_gives_up_with_a_conflict_error() {
    let server = RedisServer::start();
    let globals = globals_for(&server, "conflict").with_max_attempts(3);
    let g = globals.group("grp").unwrap();
    g.set("n", &0_i64).await.unwrap();
    let n_key = key(&globals, "grp", "n");

    // Every attempt is spoiled by a write from "another worker" between the read and the commit.
    let calls = AtomicU32::new(0);
    let err = g
        .update(&["n"], |v: &mut [Option<i64>]| {
            calls.fetch_add(1, Ordering::Relaxed);
            let _: i64 = server.cmd(&["INCR", &n_key]);
            v[0] = Some(v[0].unwrap_or(0) + 100);
            Ok::<_, std::convert::Infallible>(())
        })
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err:?}");
    assert!(
        matches!(err.failed(), Some(Error::Conflict { attempts: 3 })),
        "{err:?}"
    );
    assert_eq!(calls.load(Ordering::Relaxed), 3);
    assert_eq!(
        g.get::<i64>("n").await.unwrap(),
        Some(3),
        "only the outside writes landed"
    );

    // One spoiled attempt, then success.
    let calls = AtomicU32::new(0);
    g.update(&["n"], |v: &mut [Option<i64>]| {
        if calls.fetch_add(1, Ordering::Relaxed) == 0 {
            let _: i64 = server.cmd(&["INCR", &n_key]);
        }
        v[0] = Some(v[0].unwrap_or(0) + 100);
        Ok::<_, std::convert::Infallible>(())
    })
    .await
    .unwrap();
    assert_eq!(calls.load(Ordering::Relaxed), 2);
    assert_eq!(g.get::<i64>("n").await.unwrap(), Some(104));
}

async fn add_one(
    g: &herd::globals::Group,
    name: &str,
) -> Result<i64, UpdateError<std::convert::Infallible>> {
    g.update(&[name], |v: &mut [Option<i64>]| {
        let n = v[0].unwrap_or(0) + 1;
        v[0] = Some(n);
        Ok(n)
    })
    .await
}

/// The pool's connections carry no stale `WATCH` or pending reply: updates limited to one attempt,
/// each on its own key, never conflict, on every connection of the pool.
async fn assert_pool_is_clean(globals: &Globals, server: &RedisServer, spoil: &[String]) {
    // Write every key a cancelled update may still be watching.
    for k in spoil {
        let _: () = server.cmd(&["SET", k, "1000"]);
    }
    let one_shot = globals.clone().with_max_attempts(1);
    let g = one_shot.group("hygiene").unwrap();
    for round in 0..4 {
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let g = g.clone();
                tokio::spawn(async move { add_one(&g, &format!("clean-{i}")).await })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let r = t.await.unwrap();
            assert!(r.is_ok(), "round {round}, update {i}: {:?}", r.err());
        }
    }
    // No connection is left inside MULTI.
    let clients: String = server.cmd(&["CLIENT", "LIST"]);
    for line in clients.lines() {
        let flags = line
            .split(' ')
            .find_map(|kv| kv.strip_prefix("flags="))
            .unwrap_or("");
        assert!(
            !flags.contains('x'),
            "a connection is stuck in MULTI: {line}"
        );
    }
}

fn total_connections(server: &RedisServer) -> i64 {
    let info: String = server.cmd(&["INFO", "stats"]);
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("total_connections_received")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_hygiene_concurrent_and_cancelled_updates() {
    let server = RedisServer::start();
    let client = RedisClient::new(roomy_config(&server, "hygiene")).unwrap();
    let globals = Globals::new(client).with_max_attempts(1000);
    let g = globals.group("hygiene").unwrap();

    // 50 concurrent read-modify-writes of one counter (pool of 16): all land, none twice.
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let g = g.clone();
            tokio::spawn(async move { add_one(&g, "hot").await })
        })
        .collect();
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap().expect("update"));
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        (1..=50).collect::<Vec<_>>(),
        "each update saw its own value"
    );
    assert_eq!(g.get::<i64>("hot").await.unwrap(), Some(50));

    let connections_before = total_connections(&server);
    // Cancelled updates: dropped after random short delays (in the pool wait, with WATCH+MGET in
    // flight, with EXEC in flight, in the backoff), and aborted tasks.
    let done = Arc::new(AtomicU32::new(0));
    let mut handles = Vec::new();
    for i in 0..200_u64 {
        let g = g.clone();
        let done = done.clone();
        let h = tokio::spawn(async move {
            let limit = Duration::from_micros((i * 397) % 20_000);
            if let Ok(r) = tokio::time::timeout(limit, add_one(&g, "hot")).await {
                r.expect("update");
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
        handles.push(h);
    }
    for (i, h) in handles.iter().enumerate() {
        if i % 3 == 0 {
            h.abort();
        }
    }
    for h in handles {
        let _ = h.await;
    }
    let completed = i64::from(done.load(Ordering::Relaxed));
    let value = g.get::<i64>("hot").await.unwrap().unwrap();
    // Every update that reported success landed; a cancelled one may or may not have (its EXEC may
    // have been on the wire), but never twice.
    assert!(
        value >= 50 + completed && value <= 250,
        "value {value}, completed {completed}"
    );
    // Updates dropped with a request in flight closed their connection; the pool opened new ones.
    // (`- 1`: the connection this INFO itself uses.)
    let replaced = total_connections(&server) - connections_before - 1;
    eprintln!(
        "cancelled-updates: {completed} of 200 completed, counter {value}, \
         {replaced} pooled connections closed and replaced"
    );
    assert!(replaced > 0, "no update was cancelled mid-request");

    // Updates the closure refuses go back to the pool still holding their WATCH (the pool's
    // recycle step clears it before reuse).
    let refused: Vec<_> = (0..20)
        .map(|_| {
            let g = g.clone();
            tokio::spawn(async move {
                g.update(&["hot"], |_: &mut [Option<i64>]| Err::<(), _>("no"))
                    .await
                    .unwrap_err()
            })
        })
        .collect();
    for r in refused {
        assert!(matches!(r.await.unwrap(), UpdateError::Aborted("no")));
    }

    // Connections left mid-request were closed, not leaked: at most the pool, the shared
    // connection and this test's own connection remain.
    let mut clients = usize::MAX;
    for _ in 0..50 {
        let list: String = server.cmd(&["CLIENT", "LIST"]);
        clients = list.lines().count();
        if clients <= 16 + 1 + 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        clients <= 18,
        "{clients} connections: dropped connections leak"
    );

    assert_pool_is_clean(&globals, &server, &[key(&globals, "hygiene", "hot")]).await;
    // And the pool still serves plain updates.
    assert_eq!(add_one(&g, "after").await.unwrap(), 1);
}

#[tokio::test]
async fn a_lost_exec_reply_is_outcome_unknown_and_never_retried() {
    let server = RedisServer::start();
    let config = config(&server, "unknown"); // 500 ms command timeout
    let globals = Globals::new(RedisClient::new(config.clone()).expect("client"));
    let g = globals.group("grp").unwrap();
    g.set("n", &1_i64).await.unwrap();

    // Freeze Redis between the read and the commit: the EXEC reply never comes in time.
    let calls = AtomicU32::new(0);
    let err = g
        .update(&["n"], |v: &mut [Option<i64>]| {
            if calls.fetch_add(1, Ordering::Relaxed) == 0 {
                server.freeze();
            }
            v[0] = Some(v[0].unwrap_or(0) + 1);
            Ok::<_, std::convert::Infallible>(())
        })
        .await
        .unwrap_err();
    assert!(
        err.failed().is_some_and(Error::is_outcome_unknown),
        "{err:?}"
    );
    assert_eq!(
        calls.load(Ordering::Relaxed),
        1,
        "a lost commit must not be retried"
    );

    // 500 ms without an answer opened the client's circuit breaker: the next call is refused at
    // once, nothing sent (Unavailable, not OutcomeUnknown).
    let t = std::time::Instant::now();
    let err = g.incr("n", 1).await.unwrap_err();
    assert!(
        err.is_unavailable() && t.elapsed() < Duration::from_millis(100),
        "{err:?}"
    );
    // With a client of its own each (a closed breaker): an atomic group and a counter on the
    // shared connection whose replies never come are OutcomeUnknown; a read is Unavailable.
    let fresh = || Globals::new(RedisClient::new(config.clone()).expect("client"));
    let err = fresh()
        .group("grp")
        .unwrap()
        .atomic()
        .incr("n", 1)
        .apply()
        .await
        .unwrap_err();
    assert!(err.is_outcome_unknown(), "{err:?}");
    let err = fresh()
        .group("grp")
        .unwrap()
        .incr("n", 1)
        .await
        .unwrap_err();
    assert!(err.is_outcome_unknown(), "{err:?}");
    let err = fresh()
        .group("grp")
        .unwrap()
        .get::<i64>("n")
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    server.thaw();

    // Service comes back by itself; the connection that lost its reply was not reused dirty.
    let mut ok = false;
    for _ in 0..20 {
        if g.get::<i64>("n").await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "Redis did not come back");
    let before = g.get::<i64>("n").await.unwrap().unwrap();
    assert_eq!(add_one(&g, "n").await.unwrap(), before + 1);
    assert_pool_is_clean(&globals, &server, &[key(&globals, "grp", "n")]).await;
}

fn delta(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> HashMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0);
            (d > 0 && k != "info" && !k.starts_with("client")).then(|| (k.clone(), d))
        })
        .collect()
}

fn calls(list: &[(&str, u64)]) -> HashMap<String, u64> {
    list.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// Round trips per operation, counted twice: by the client's own counter and by Redis'
/// `INFO commandstats`. Printed for the report.
#[tokio::test]
async fn round_trips_per_operation() {
    let server = RedisServer::start();
    let client = RedisClient::new(config(&server, "rtt")).unwrap();
    let globals = Globals::new(client.clone());
    let g = globals.group("rt").unwrap();
    // Warm up both kinds of connection so that connection setup is not counted.
    client.ping().await.unwrap();
    add_one(&g, "warm").await.unwrap();

    macro_rules! measure {
        ($label:expr, $expected_rt:expr, $expected_calls:expr, $op:expr) => {{
            let stats = server.command_calls();
            let rt = client.round_trips();
            let out = $op;
            let rt = client.round_trips() - rt;
            let got = delta(&stats, &server.command_calls());
            eprintln!("round-trips: {:<32} {rt}   commands: {got:?}", $label);
            assert_eq!(rt, $expected_rt, "{}", $label);
            assert_eq!(got, calls(&$expected_calls), "{}", $label);
            out
        }};
    }

    measure!("set", 1, [("set", 1)], g.set("a", &1).await.unwrap());
    measure!("set_with_ttl", 1, [("set", 1)], {
        g.set_with_ttl("t", &1, Duration::from_secs(9))
            .await
            .unwrap()
    });
    measure!("get", 1, [("get", 1)], g.get::<i64>("a").await.unwrap());
    measure!("incr", 1, [("incrby", 1)], g.incr("c", 1).await.unwrap());
    measure!("decr", 1, [("decrby", 1)], g.decr("c", 1).await.unwrap());
    measure!("delete", 1, [("del", 1)], g.delete("t").await.unwrap());
    measure!("get_many (10 variables)", 1, [("mget", 1)], {
        g.get_many::<i64>(&["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"])
            .await
            .unwrap()
    });
    measure!(
        "atomic apply (4 writes)",
        1,
        [
            ("multi", 1),
            ("set", 2),
            ("incrby", 1),
            ("del", 1),
            ("exec", 1)
        ],
        g.atomic()
            .set("a", &2)
            .set("b", &2)
            .incr("c", 1)
            .delete("d")
            .apply()
            .await
            .unwrap()
    );
    // `update`: 2 counted round trips (WATCH+MGET, MULTI..EXEC), plus the UNWATCH+PING pipeline
    // deadpool-redis sends when it hands out an idle pooled connection (1 more round trip, not
    // counted by the client because it happens inside the pool).
    measure!(
        "update (2 variables)",
        2,
        [
            ("unwatch", 1),
            ("ping", 1),
            ("watch", 1),
            ("mget", 1),
            ("multi", 1),
            ("set", 2),
            ("exec", 1)
        ],
        transfer(&g, "a", "b", 1).await.unwrap()
    );
    measure!(
        "update refused by the closure",
        1,
        [("unwatch", 1), ("ping", 1), ("watch", 1), ("mget", 1)],
        transfer(&g, "a", "b", 1_000).await.unwrap_err()
    );
    let channel = globals.channel::<String>("rt").unwrap();
    measure!(
        "publish",
        1,
        [("publish", 1)],
        channel.publish(&"x".into()).await.unwrap()
    );
}

async fn next(s: &mut herd::globals::Subscription<Motd>) -> Option<Received<Motd>> {
    tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("no message within 10 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_in_one_process_and_across_a_restart() {
    let mut server = RedisServer::start();
    let globals = globals_for(&server, "pubsub");
    let channel = globals.channel::<Motd>("news").unwrap();
    let mut a = channel.subscribe().await.unwrap();
    let mut b = globals
        .channel::<Motd>("news")
        .unwrap()
        .subscribe()
        .await
        .unwrap();
    let msg = |n: u8| Motd {
        text: format!("m{n}"),
        level: n,
    };
    assert_eq!(channel.publish(&msg(1)).await.unwrap(), 2);
    assert_eq!(next(&mut a).await, Some(Received::Message(msg(1))));
    assert_eq!(next(&mut b).await, Some(Received::Message(msg(1))));

    // A message that does not decode is skipped, not fatal.
    let _: i64 = server.cmd(&["PUBLISH", channel.redis_channel(), "not json"]);
    assert_eq!(channel.publish(&msg(2)).await.unwrap(), 2);
    assert_eq!(next(&mut a).await, Some(Received::Message(msg(2))));
    assert_eq!(next(&mut b).await, Some(Received::Message(msg(2))));

    // Redis restarts: the subscriptions come back and say so.
    server.kill();
    server.restart();
    assert_eq!(next(&mut a).await, Some(Received::Reconnected));
    assert_eq!(next(&mut b).await, Some(Received::Reconnected));
    let mut published = None;
    for _ in 0..30 {
        match channel.publish(&msg(3)).await {
            Ok(n) => {
                published = Some(n);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(published, Some(2));
    assert_eq!(next(&mut a).await, Some(Received::Message(msg(3))));
    assert_eq!(next(&mut b).await, Some(Received::Message(msg(3))));

    // Dropping a subscription unsubscribes.
    drop(b);
    let mut n = 2;
    for _ in 0..50 {
        n = channel.publish(&msg(4)).await.unwrap();
        if n == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(n, 1);
}

/// `Globals::with_prefix`: variables and channels under a prefix of their own, apart from the
/// sessions' prefix; the group is still the hash tag; a bad prefix is a clear error.
#[tokio::test]
async fn globals_under_their_own_prefix() {
    let server = RedisServer::start();
    let client = RedisClient::new(config(&server, "own-prefix")).unwrap();
    let session_prefix = client.config().prefix().to_owned();
    let shared = unique_prefix("shared-globals");
    let globals = Globals::new(client.clone()).with_prefix(&shared).unwrap();
    assert_eq!(globals.prefix(), shared);
    assert_eq!(Globals::new(client.clone()).prefix(), session_prefix);

    let stats = globals.group("stats").unwrap();
    stats.set("motd", &"hi").await.unwrap();
    assert_eq!(stats.incr("hits", 2).await.unwrap(), 2);
    stats
        .atomic()
        .set("a", &1_i64)
        .set("b", &1_i64)
        .apply()
        .await
        .unwrap();
    let n = stats
        .update(&["a", "b"], |v: &mut [Option<i64>]| {
            v[0] = Some(v[0].unwrap_or(0) + 10);
            Ok::<_, std::convert::Infallible>(v[0])
        })
        .await
        .unwrap();
    assert_eq!(n, Some(11));
    assert_eq!(
        stats.get_many::<i64>(&["a", "b", "hits"]).await.unwrap(),
        vec![Some(11), Some(1), Some(2)]
    );

    // Every key is `<own prefix>:g:{<group>}:<name>`; nothing under the config's prefix.
    let mut keys = server.keys(&format!("{shared}:*"));
    keys.sort();
    assert_eq!(
        keys,
        ["a", "b", "hits", "motd"]
            .iter()
            .map(|n| format!("{shared}:g:{{stats}}:{n}"))
            .collect::<Vec<_>>()
    );
    assert!(
        server.keys(&format!("{session_prefix}:*")).is_empty(),
        "a global landed under the sessions' prefix"
    );
    let raw: String = server.cmd(&["GET", &format!("{shared}:g:{{stats}}:motd")]);
    assert_eq!(raw, r#""hi""#);

    // Another handle over the same client but the default prefix does not see these variables;
    // one with the same own prefix over a client with another config prefix does.
    let default = Globals::new(client.clone()).group("stats").unwrap();
    assert_eq!(default.get::<i64>("hits").await.unwrap(), None);
    let other_app = RedisClient::new(config(&server, "other-app")).unwrap();
    assert_ne!(other_app.config().prefix(), session_prefix);
    let same = Globals::new(other_app).with_prefix(&shared).unwrap();
    assert_eq!(
        same.group("stats")
            .unwrap()
            .get::<i64>("hits")
            .await
            .unwrap(),
        Some(2)
    );

    // Channels follow the globals' prefix too.
    let channel = globals.channel::<Motd>("news").unwrap();
    assert_eq!(channel.redis_channel(), format!("{shared}:chan:news"));
    let mut sub = same
        .channel::<Motd>("news")
        .unwrap()
        .subscribe()
        .await
        .unwrap();
    let msg = Motd {
        text: "over the own prefix".into(),
        level: 1,
    };
    assert_eq!(channel.publish(&msg).await.unwrap(), 1);
    assert_eq!(next(&mut sub).await, Some(Received::Message(msg)));
    assert_eq!(
        Globals::new(client.clone())
            .channel::<Motd>("news")
            .unwrap()
            .redis_channel(),
        format!("{session_prefix}:chan:news")
    );

    // A prefix that could break the key scheme is refused, with the rule in the message.
    for bad in ["", "a{b}", "a}b", "has space", "x*", &"p".repeat(65)] {
        let err = Globals::new(client.clone()).with_prefix(bad).unwrap_err();
        assert!(
            matches!(err, Error::Config(ref m) if m.contains("prefix") && m.contains("_.:-")),
            "{bad:?}: {err:?}"
        );
    }
    // Settings chained before or after the prefix are kept.
    let tuned = Globals::new(client)
        .with_max_value_size(10)
        .with_prefix(&shared)
        .unwrap();
    assert!(matches!(
        tuned
            .group("stats")
            .unwrap()
            .set("big", &"x".repeat(20))
            .await,
        Err(Error::TooLarge { .. })
    ));
}

/// On a real 3-primary Redis Cluster, a group under `with_prefix` still lives in one slot: atomic
/// groups, `get_many` and `update` (all multi-key, all refused across slots) work.
#[cfg(feature = "cluster")]
#[tokio::test]
async fn own_prefix_keeps_each_group_in_one_cluster_slot() {
    let cluster = support::cluster::RedisCluster::start();
    let config = herd::Config::builder()
        .redis_url(cluster.url())
        .prefix(unique_prefix("cluster-sessions"))
        .command_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let shared = unique_prefix("cluster-globals");
    let globals = Globals::new(RedisClient::new(config).unwrap())
        .with_prefix(&shared)
        .unwrap();
    // Names chosen so that, without the hash tag, their keys would spread over the nodes.
    let names: Vec<String> = (0..12).map(|i| format!("v{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let slots: std::collections::HashSet<u16> = names
        .iter()
        .map(|n| cluster.slot_of(&format!("{shared}:g:stats:{n}")))
        .collect();
    assert!(slots.len() > 1, "the names do not spread without a tag");
    let tagged: std::collections::HashSet<u16> = names
        .iter()
        .map(|n| cluster.slot_of(&format!("{shared}:g:{{stats}}:{n}")))
        .collect();
    assert_eq!(tagged.len(), 1);

    let stats = globals.group("stats").unwrap();
    let mut writes = stats.atomic();
    for n in &names {
        writes = writes.set(n, &1_i64);
    }
    writes.apply().await.unwrap();
    let sum = stats
        .update(&names, |v: &mut [Option<i64>]| {
            for x in v.iter_mut() {
                *x = Some(x.unwrap_or(0) + 1);
            }
            Ok::<_, std::convert::Infallible>(v.len())
        })
        .await
        .unwrap();
    assert_eq!(sum, names.len());
    let values = stats.get_many::<i64>(&names).await.unwrap();
    assert_eq!(values, vec![Some(2); names.len()]);
    assert_eq!(
        cluster.keys(&format!("{shared}:g:{{stats}}:*")).len(),
        names.len()
    );
}

#[test]
fn globals_handle_is_cheap_shared_state() {
    fn assert_state<T: Clone + Send + Sync + 'static>() {}
    assert_state::<Globals>();
    assert_state::<herd::globals::Group>();
    assert_state::<herd::globals::Channel<String>>();
}
