//! Raw commands through herd's client (`RedisClient::query*`): results, errors, and the
//! timeout semantics (a lost reply to a write is "outcome unknown", to a read "unavailable"),
//! on one server and on a cluster (following `MOVED`).

mod support;

use std::time::Duration;

use herd::RedisClient;
use support::RedisServer;

async fn client(server: &RedisServer) -> RedisClient {
    RedisClient::connect(support::config(server, "raw"))
        .await
        .expect("connect")
}

#[tokio::test]
async fn commands_pipelines_and_scripts_run_and_count_one_round_trip_each() {
    let server = RedisServer::start();
    let redis = client(&server).await;
    let before = redis.round_trips();
    let added: i64 = redis
        .query(redis::cmd("SADD").arg("app:tags").arg("a").arg("b"))
        .await
        .expect("sadd");
    assert_eq!(added, 2);
    let mut members: Vec<String> = redis
        .query_read_only(redis::cmd("SMEMBERS").arg("app:tags"))
        .await
        .expect("smembers");
    members.sort();
    assert_eq!(members, ["a", "b"]);
    let (n, ttl): (i64, i64) = redis
        .query_pipeline(
            redis::pipe()
                .atomic()
                .incr("app:n", 5)
                .expire("app:n", 60)
                .ignore()
                .ttl("app:n"),
        )
        .await
        .expect("pipeline");
    assert_eq!(n, 5);
    assert!((1..=60).contains(&ttl));
    let script = redis::Script::new("return redis.call('INCRBY', KEYS[1], ARGV[1])");
    let n: i64 = redis
        .query_script(script.key("app:n").arg(2))
        .await
        .expect("script");
    assert_eq!(n, 7);
    assert_eq!(redis.round_trips() - before, 4);
    // Redis' own errors come back as `Error::Redis`, not as unavailability.
    let e = redis
        .query::<i64>(redis::cmd("INCR").arg("app:tags"))
        .await
        .expect_err("WRONGTYPE");
    assert!(matches!(e, herd::Error::Redis(_)), "{e:?}");
}

#[tokio::test]
async fn a_lost_reply_is_outcome_unknown_for_writes_and_unavailable_for_reads() {
    let server = RedisServer::start();
    let redis = client(&server).await;
    let _: () = redis
        .query(redis::cmd("SET").arg("k").arg("v"))
        .await
        .expect("set");
    server.freeze();
    let write = redis.query::<()>(redis::cmd("SET").arg("k").arg("w")).await;
    let read = redis
        .query_read_only::<Option<String>>(redis::cmd("GET").arg("k"))
        .await;
    server.thaw();
    assert!(write.expect_err("frozen").is_outcome_unknown());
    assert!(read.expect_err("frozen").is_unavailable());
    // Service returns by itself.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = redis
            .query_read_only::<Option<String>>(redis::cmd("GET").arg("k"))
            .await;
        if let Ok(v) = got {
            // The write sent while frozen ran once Redis thawed: its outcome was indeed unknown.
            assert!(matches!(v.as_deref(), Some("v" | "w")), "{v:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(feature = "cluster")]
#[tokio::test]
async fn on_a_cluster_commands_reach_the_node_of_their_slot() {
    let cluster = support::cluster::RedisCluster::start();
    let config = herd::Config::builder()
        .redis_url(cluster.url())
        .prefix(support::unique_prefix("raw-cluster"))
        .build()
        .expect("config");
    let redis = RedisClient::connect(config).await.expect("connect");
    for i in 0..20 {
        let key = format!("app:{{user-{i}}}:n");
        let (n, _): (i64, i64) = redis
            .query_pipeline(redis::pipe().atomic().incr(&key, i).expire(&key, 60))
            .await
            .expect("pipeline on one slot");
        assert_eq!(n, i);
        let back: i64 = redis
            .query_read_only(redis::cmd("GET").arg(&key))
            .await
            .expect("get");
        assert_eq!(back, i);
    }
}
