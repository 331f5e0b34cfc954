//! Shared by the examples (not an example itself; include it with
//! `#[path = "support/private_redis.rs"] mod private_redis;`): the Redis an example runs against.
//!
//! * `REDIS_URL` set: that Redis, as given (nothing is started; if it does not answer, the example
//!   says so and stops).
//! * `REDIS_URL` unset and something answers on `127.0.0.1:6379`: that one.
//! * Otherwise: a private `redis-server` on a free loopback port, started for this run (one line
//!   says so) and stopped when the example ends. Its data is not kept.

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the example's Redis is; stops the private server, if one was started, when dropped.
pub(crate) struct ExampleRedis {
    /// The URL to connect to.
    pub(crate) url: String,
    /// Where the URL came from, for error messages (never the URL itself: it may hold a password).
    pub(crate) source: &'static str,
    private: Option<Child>,
}

impl Drop for ExampleRedis {
    fn drop(&mut self) {
        if let Some(child) = self.private.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Finds the Redis for the example named `example` (used in the one line printed when a private
/// server is started).
///
/// # Errors
/// A sentence saying what to do when nothing answers on the default address and `redis-server`
/// cannot be started.
pub(crate) fn find_or_start(example: &str) -> Result<ExampleRedis, String> {
    if let Some(url) = std::env::var("REDIS_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
    {
        return Ok(ExampleRedis {
            url,
            source: "REDIS_URL",
            private: None,
        });
    }
    if answers(6379, Duration::from_millis(300)) {
        return Ok(ExampleRedis {
            url: "redis://127.0.0.1:6379".into(),
            source: "the default address redis://127.0.0.1:6379",
            private: None,
        });
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port for a private redis-server: {e}"))?
        .port();
    let child = spawn_server(port)?;
    let redis = ExampleRedis {
        url: format!("redis://127.0.0.1:{port}"),
        source: "the private redis-server",
        private: Some(child),
    };
    wait_until_up(port)?;
    println!(
        "{example}: no Redis on 127.0.0.1:6379 and REDIS_URL is unset, so a private redis-server \
         runs on {} for this run (data is not kept; it stops with {example})",
        redis.url
    );
    Ok(redis)
}

/// Starts `redis-server` on `127.0.0.1:port` without persistence, in its own process group (a
/// Ctrl-C to the example's terminal does not stop it mid-drain) and, on Linux, killed when the
/// process that started it dies (no orphan after a `SIGKILL`).
///
/// # Errors
/// A sentence saying how to install `redis-server` when it is not on `PATH`.
pub(crate) fn spawn_server(port: u16) -> Result<Child, String> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .process_group(0);
    #[cfg(all(target_os = "linux", feature = "launcher"))]
    {
        let parent = std::process::id();
        // SAFETY: runs in the forked child before exec and only makes async-signal-safe calls
        // (prctl, getppid) on plain integers, allocating nothing. The death signal is tied to the
        // thread that forks; the examples spawn from threads that live as long as they do.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || {
                use nix::libc;
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died before the prctl: nobody would ever stop this Redis.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
    cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            "no Redis answers on 127.0.0.1:6379 and redis-server is not installed. Install it \
             (`sudo apt-get install redis-server`, `brew install redis`) or set REDIS_URL to a \
             running Redis."
                .to_owned()
        } else {
            format!("cannot start redis-server: {e}")
        }
    })
}

/// Waits (up to 5 s) until the private server on `port` accepts connections.
///
/// # Errors
/// When it does not.
pub(crate) fn wait_until_up(port: u16) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !answers(port, Duration::from_millis(100)) {
        if Instant::now() > deadline {
            return Err(format!(
                "the private redis-server on port {port} did not start"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// True when something accepts connections on `127.0.0.1:port`.
fn answers(port: u16, timeout: Duration) -> bool {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    TcpStream::connect_timeout(&addr, timeout).is_ok()
}
