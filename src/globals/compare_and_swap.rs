//! The compare-and-swap script: optimistic writes of globals on every topology, the replacement of
//! `WATCH`/`MULTI`/`EXEC` on a Redis Cluster (where no connection can be lent out for `WATCH`).

use crate::client::{Effect, RedisClient};
use crate::error::Result;

/// Optimistic write that works on every topology (single server, Sentinel, Redis Cluster): sets
/// `keys[i]` to `new[i]` (`None` deletes it, a value keeps the key's TTL) **only if** every key
/// still holds `expected[i]` (`None`: the key must not exist), all in one script, so atomically.
/// Returns `Ok(true)` when written, `Ok(false)` when some key had changed (read again and retry,
/// with jitter, like a failed `WATCH`).
///
/// This is the cluster replacement for `WATCH`/`MULTI`/`EXEC`: on a cluster the keys must share a
/// hash tag (one group of globals), else Redis answers `CROSSSLOT`. Values are compared as bytes.
/// A timeout is [`Error::OutcomeUnknown`](crate::Error::OutcomeUnknown), as for every write; running the same call again is
/// then safe: if the first one was applied the keys no longer hold `expected` (unless
/// `new == expected`) and it answers `false`.
///
/// # Errors
/// [`Error::Unavailable`](crate::Error::Unavailable), [`Error::OutcomeUnknown`](crate::Error::OutcomeUnknown), or [`Error::Redis`](crate::Error::Redis) (a key holds a
/// non-string value, `CROSSSLOT`).
pub(crate) async fn compare_and_swap(
    client: &RedisClient,
    keys: &[String],
    expected: &[Option<Vec<u8>>],
    new: &[Option<Vec<u8>>],
) -> Result<bool> {
    static CAS: std::sync::LazyLock<redis::Script> =
        std::sync::LazyLock::new(|| redis::Script::new(include_str!("compare_and_swap.lua")));
    assert!(keys.len() == expected.len() && keys.len() == new.len());
    let mut invocation = CAS.prepare_invoke();
    for key in keys {
        invocation.key(key);
    }
    for value in expected.iter().chain(new) {
        match value {
            Some(v) => invocation.arg(1).arg(v.as_slice()),
            None => invocation.arg(0).arg(""),
        };
    }
    let written: i64 = client
        .run(Effect::MayWrite, |mut c| async move {
            invocation.invoke_async(&mut c).await
        })
        .await?;
    Ok(written == 1)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::Config;

    /// A throwaway `redis-server` for the crate-private helpers (the integration tests have the full
    /// harness in `tests/support`).
    struct Server(std::process::Child, u16);

    impl Server {
        fn start() -> Server {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("free port");
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server on PATH");
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "redis-server did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Server(child, port)
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[tokio::test]
    async fn compare_and_swap_writes_only_what_was_read() {
        let server = Server::start();
        let config = Config::builder()
            .redis_url(format!("redis://127.0.0.1:{}", server.1))
            .build()
            .expect("config");
        let client = RedisClient::connect(config).await.expect("connect");
        let keys = ["t:g:{bank}:a".to_owned(), "t:g:{bank}:b".to_owned()];
        let v = |s: &str| Some(s.as_bytes().to_vec());
        // Both absent: create them.
        assert!(
            compare_and_swap(&client, &keys, &[None, None], &[v("10"), v("0")])
                .await
                .expect("cas")
        );
        // A stale read: nothing written.
        assert!(
            !compare_and_swap(&client, &keys, &[v("9"), v("0")], &[v("0"), v("9")])
                .await
                .expect("cas")
        );
        // The current values: moved, and a delete.
        assert!(
            compare_and_swap(&client, &keys, &[v("10"), v("0")], &[v("4"), None])
                .await
                .expect("cas")
        );
        let (a, b): (Option<String>, Option<String>) = client
            .run(Effect::ReadOnly, |mut c| async move {
                redis::cmd("MGET")
                    .arg("t:g:{bank}:a")
                    .arg("t:g:{bank}:b")
                    .query_async(&mut c)
                    .await
            })
            .await
            .expect("mget");
        assert_eq!((a.as_deref(), b), (Some("4"), None));
    }
}
