//! Typed hashes of globals (`Group::hash`): fields written one at a time, read alone or together.

mod support;

use herd::{Globals, RedisClient};
use support::RedisServer;

#[tokio::test]
async fn fields_are_typed_independent_and_counted() {
    let server = RedisServer::start();
    let client = RedisClient::connect(support::config(&server, "hash"))
        .await
        .expect("connect");
    let globals = Globals::new(client);
    let flags = globals
        .group("app")
        .expect("group")
        .hash("flags")
        .expect("hash");
    assert_eq!(flags.get::<bool>("dark").await.expect("get"), None);
    flags.set("dark", &true).await.expect("set");
    flags.set("motd", &"hi").await.expect("set");
    assert_eq!(flags.incr("hits", 2).await.expect("incr"), 2);
    assert_eq!(flags.incr("hits", 1).await.expect("incr"), 3);
    assert_eq!(flags.get::<i64>("hits").await.expect("get"), Some(3));
    assert_eq!(flags.get::<bool>("dark").await.expect("get"), Some(true));
    let all: std::collections::BTreeMap<String, serde_json::Value> =
        flags.get_all().await.expect("all");
    assert_eq!(
        serde_json::to_string(&all).expect("json"),
        r#"{"dark":true,"hits":3,"motd":"hi"}"#
    );
    // One key, a hash, under the globals' naming scheme.
    let key = format!("{}:g:{{app}}:flags", globals.prefix());
    assert_eq!(server.cmd::<String>(&["TYPE", &key]), "hash");
    assert!(flags.delete("motd").await.expect("delete"));
    assert!(!flags.delete("motd").await.expect("delete"));
    let e = flags.incr("dark", 1).await.expect_err("not an integer");
    assert!(matches!(e, herd::Error::NotAnInteger { .. }), "{e:?}");
    assert!(flags.get::<i64>("").await.is_err());
    assert!(flags.set(&"x".repeat(257), &1).await.is_err());
}
