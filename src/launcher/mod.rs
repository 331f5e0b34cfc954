//! A pre-fork supervisor: N worker processes share one listening socket.
//!
//! This is what PM2's cluster mode, Node's `cluster` module or Gunicorn's arbiter do, for Rust web
//! apps. One program plays two roles:
//!
//! * the **master** binds the listening socket once (socket2, backlog 1024) and keeps it for its
//!   whole life; it spawns workers, restarts crashed ones with exponential backoff, replaces them one
//!   by one on `SIGHUP` (rolling reload), scales on `SIGTTIN`/`SIGTTOU`, drains them on
//!   `SIGTERM`/`SIGINT` and answers a unix control socket (`herd status|reload|scale|stop`);
//! * a **worker** receives the socket as fd 3 with `LISTEN_FDS=1` (the systemd socket-activation
//!   convention), builds a tokio runtime and hands the app a ready [`tokio::net::TcpListener`] and a
//!   shutdown signal through [`Worker`].
//!
//! [`Launcher::run`] decides which role the current process plays, so the same `main` works as a
//! stand-alone server (it becomes the master), under the `herd run` command, or under systemd socket
//! activation (it is a single worker).
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use herd::launcher::Launcher;
//!
//! fn main() -> Result<(), herd::launcher::Error> {
//!     // No tokio runtime here: the master must not have threads when it spawns workers,
//!     // and each worker builds its own runtime.
//!     Launcher::new()
//!         .workers(4)
//!         .bind("127.0.0.1:3000")
//!         .run(|worker| async move {
//!             let app = Router::new().route("/", get(|| async { "hello" }));
//!             // Reports READY to the master, stops accepting on SIGTERM, drains in-flight
//!             // requests. For other servers: worker.listener(), worker.ready(),
//!             // worker.shutdown().
//!             worker.serve(app).await
//!         })
//! }
//! ```
//!
//! # Protocol between master and worker
//!
//! | what | how |
//! |---|---|
//! | listening socket | fd 3, `LISTEN_FDS=1`, `LISTEN_PID` = the worker's pid (set through `/bin/sh -c 'export LISTEN_PID=$$; exec "$0" "$@"'`, because the pid is only known after `fork` and setting the environment between `fork` and `exec` is not async-signal-safe) |
//! | master channel | fd 4 (`HERD_MASTER_FD=4`), a unix stream socket: the worker writes `READY\n` (and `RECYCLE\n` to ask for a replacement); end-of-file means the master died, and the worker drains and exits |
//! | heartbeat | `HERD_HANG_TIMEOUT_MS` when the master's [hang timeout](Launcher::hang_timeout) is on: the worker writes `ALIVE\n` four times per timeout (at most once a second) from a task on its runtime; a worker that sent one and then stays silent for the timeout is killed and replaced |
//! | identity | `HERD_WORKER_INDEX` (0-based slot, the lowest free one is reused), `HERD_GENERATION` (bumped by each reload) |
//! | cookie key | `HERD_SECRET`: the master's own, checked at its start (a malformed key stops the master with a clear error) and passed through unchanged; when unset or blank, 64 random bytes (base64) generated once per master life |
//! | limits | `HERD_DRAIN_TIMEOUT_MS`, `HERD_MAX_REQUESTS` (when set) |
//! | lame duck | the master writes `DRAINING\n` on fd 4 when its lame-duck period begins (see [below](#lame-duck-several-hosts-behind-a-load-balancer)); the worker's [`Worker::is_draining`] turns true |
//! | metrics | `HERD_METRICS=1` when the master runs with [`Launcher::metrics`] or [`Launcher::dashboard`]: a worker built with the `metrics` feature then writes `METRICS "<Prometheus text as a JSON string>"` on fd 4 once a second (see [`crate::observe`]); other lines are ignored by the master, so programs that do not send it still work |
//!
//! Each worker runs in its own process group; stdout and stderr lines are prefixed with
//! `[worker N]` by the master. Workers also get `PR_SET_PDEATHSIG=SIGTERM` on Linux, so even a
//! program that does not watch fd 4 is told when the master dies.
//!
//! # Signals understood by the master
//!
//! | signal | effect |
//! |---|---|
//! | `SIGTERM`, `SIGINT` | graceful stop: with a [lame duck](Launcher::lame_duck) period, the workers first report draining for that long while they keep serving; then workers get `SIGTERM`, `SIGKILL` after the drain timeout (30 s); exit 0 when every worker stopped cleanly. Another one during the lame-duck period starts the drain at once; one during the drain kills at once. |
//! | `SIGHUP` | rolling reload: per slot, start a new worker from the program's path, wait for `READY`, then stop the old one gracefully. A new worker that fails to become ready aborts the reload; the old ones keep serving. |
//! | `SIGTTIN` / `SIGTTOU` | one more / one fewer worker |
//! | `SIGUSR1` | reopen the [log file](Launcher::log_file) (after logrotate moved it) |
//!
//! # Lame duck: several hosts behind a load balancer
//!
//! A load balancer (HAProxy, nginx, a cloud one) learns that a host goes away from its health
//! check, a few checks after the fact. A host that stopped accepting at once would refuse the
//! connections sent meanwhile. With [`Launcher::lame_duck`] (`herd run --lame-duck S`,
//! `HERD_LAME_DUCK_MS`) a stop first enters a **lame-duck period**: the master tells every worker
//! that the host is draining, the workers keep serving everything, and the app's health route
//! answers `503` ([`healthz`] does it, or read [`is_draining`] / [`Worker::is_draining`]), so
//! the balancer moves traffic away; only then the usual drain begins. Choose a period longer
//! than the balancer's checks need to mark the host down (HAProxy: `fall` × `inter`), plus a
//! margin. `docs/several-machines.md` has the whole setup and its measured costs.
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use herd::launcher::{healthz, Launcher};
//!
//! fn main() -> Result<(), herd::launcher::Error> {
//!     Launcher::new()
//!         .lame_duck(std::time::Duration::from_secs(3))
//!         .run(|worker| async move {
//!             // 200 {"ok":true}; 503 {"ok":false,"draining":true} during the lame-duck period.
//!             let app = Router::new().route("/healthz", get(healthz));
//!             worker.serve(app).await
//!         })
//! }
//! ```
//!
//! Only a stop makes a host a lame duck: a rolling reload replaces workers behind a socket that
//! never closes, so the host keeps reporting healthy through it, and old workers being replaced
//! do not report draining. A worker run without a master (systemd socket activation of the
//! program itself) does the same on its own: on `SIGTERM` it reports draining for the period,
//! then drains.

mod control;
mod dashboard;
mod file;
mod lame_duck;
mod logs;
mod master;
mod master_channel;
mod max_requests;
mod spawn;
mod systemd;
mod worker;

use std::ffi::OsString;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

pub use control::{read_logs, request, socket_path, Request, Response, Status, WorkerStatus};
pub use file::RunFile;
pub use lame_duck::{healthz, is_draining};
pub use logs::{log_timestamp, LogWriter};
pub use max_requests::{MaxRequestsLayer, MaxRequestsService};
pub use systemd::{systemd_socket_unit, systemd_unit, UnitOptions};
pub use worker::Worker;

/// Environment variable carrying the shared cookie key to every worker.
pub const ENV_SECRET: &str = crate::session::signing::ENV_SECRET;
/// Environment variable carrying the worker's 0-based slot index.
pub const ENV_WORKER_INDEX: &str = "HERD_WORKER_INDEX";
/// Environment variable carrying the worker's generation (bumped by each reload).
pub const ENV_GENERATION: &str = "HERD_GENERATION";
/// Environment variable naming the fd of the channel to the master (always `4`).
pub const ENV_MASTER_FD: &str = "HERD_MASTER_FD";
/// Environment variable carrying the drain timeout in milliseconds.
pub const ENV_DRAIN_TIMEOUT_MS: &str = "HERD_DRAIN_TIMEOUT_MS";
/// Environment variable carrying the request limit after which a worker asks to be recycled.
pub const ENV_MAX_REQUESTS: &str = "HERD_MAX_REQUESTS";
/// Environment variable carrying the master's [hang timeout](Launcher::hang_timeout) in
/// milliseconds, when it is on: the worker then sends heartbeats.
pub const ENV_HANG_TIMEOUT_MS: &str = "HERD_HANG_TIMEOUT_MS";
/// Environment variable read by [`Launcher::new`] as the default [lame-duck
/// period](Launcher::lame_duck), in milliseconds.
pub const ENV_LAME_DUCK_MS: &str = "HERD_LAME_DUCK_MS";
/// The most workers one master runs (`Launcher::workers`, `herd scale`, `SIGTTIN`, the dashboard).
pub const MAX_WORKERS: usize = 1024;
/// Environment variable set to `1` when the master collects metrics: the worker (built with the
/// `metrics` feature) installs the Prometheus recorder and sends its series on the master channel.
pub const ENV_METRICS: &str = "HERD_METRICS";

/// Errors of the launcher.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The listening socket could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address that was asked for.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Another master with the same name is running (its control socket answers).
    #[error("a master named {0:?} is already running (control socket answers)")]
    AlreadyRunning(String),
    /// The control socket returned an error or an unexpected answer.
    #[error("control: {0}")]
    Control(String),
    /// The master stopped, but at least one worker had to be killed or failed.
    #[error("{0} worker(s) did not stop cleanly")]
    UncleanStop(usize),
    /// The app run by a worker returned an error.
    #[error("worker app failed: {0}")]
    App(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A setting is unusable (a malformed `HERD_SECRET`, too many workers): found at the master's
    /// start, before any worker runs.
    #[error("{0}")]
    Config(String),
    /// The directory of the default control socket is not private to this user (another user
    /// could have created it to intercept `herd` commands).
    #[error("refusing to put the control socket in {dir}: {reason}")]
    UnsafeDir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong with it, and what to do.
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result alias of the launcher.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Settings of the master, shared by [`Launcher::run`] and [`Launcher::supervise`].
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) workers: usize,
    pub(crate) bind: String,
    pub(crate) name: Option<String>,
    pub(crate) socket: Option<PathBuf>,
    pub(crate) drain_timeout: Duration,
    pub(crate) hang_timeout: Duration,
    pub(crate) lame_duck: Duration,
    pub(crate) ready_timeout: Duration,
    pub(crate) min_uptime: Duration,
    pub(crate) max_restarts: u32,
    pub(crate) restart_backoff: Duration,
    pub(crate) max_memory: Option<u64>,
    pub(crate) max_requests: Option<u64>,
    pub(crate) worker_threads: Option<usize>,
    pub(crate) ready_after: Option<Duration>,
    pub(crate) metrics: Option<String>,
    pub(crate) dashboard: Option<String>,
    pub(crate) dashboard_token: Option<String>,
    pub(crate) dashboard_allow_remote: bool,
    pub(crate) log_file: Option<PathBuf>,
    pub(crate) log_timestamps: bool,
    /// The configuration file, read again at each reload for its `[env]`.
    pub(crate) file: Option<RunFile>,
    /// Environment of the workers, on top of the master's own.
    pub(crate) env: std::collections::BTreeMap<String, String>,
}

/// Builder of the pre-fork launcher. See the [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct Launcher {
    config: Config,
}

impl Default for Launcher {
    fn default() -> Self {
        Self::new()
    }
}

impl Launcher {
    /// A launcher with the defaults: one worker per CPU, `127.0.0.1:3000`, drain timeout 30 s,
    /// no lame-duck period (unless `HERD_LAME_DUCK_MS` says otherwise), ready timeout 30 s,
    /// crash loop = 5 quick crashes in a row (uptime under 5 s), backoff from
    /// 500 ms doubling up to 30 s.
    pub fn new() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Launcher {
            config: Config {
                workers: cpus,
                bind: "127.0.0.1:3000".to_owned(),
                name: None,
                socket: None,
                drain_timeout: Duration::from_secs(30),
                hang_timeout: Duration::from_secs(30),
                lame_duck: std::env::var(ENV_LAME_DUCK_MS)
                    .ok()
                    .and_then(|ms| ms.trim().parse().ok())
                    .map_or(Duration::ZERO, Duration::from_millis),
                ready_timeout: Duration::from_secs(30),
                min_uptime: Duration::from_secs(5),
                max_restarts: 5,
                restart_backoff: Duration::from_millis(500),
                max_memory: None,
                max_requests: None,
                worker_threads: None,
                ready_after: None,
                metrics: None,
                dashboard: None,
                dashboard_token: None,
                dashboard_allow_remote: false,
                log_file: None,
                log_timestamps: false,
                file: None,
                env: std::collections::BTreeMap::new(),
            },
        }
    }

    /// Number of worker processes (at least 1). Default: the CPU count. More than
    /// [`MAX_WORKERS`] is refused when the master starts.
    ///
    /// ```
    /// let launcher = herd::launcher::Launcher::new().workers(4);
    /// ```
    pub fn workers(mut self, n: usize) -> Self {
        self.config.workers = n.max(1);
        self
    }

    /// Address the master binds, e.g. `"0.0.0.0:8080"` or `"[::1]:3000"`.
    ///
    /// ```
    /// let launcher = herd::launcher::Launcher::new().bind("0.0.0.0:8080");
    /// ```
    pub fn bind(mut self, addr: impl Into<String>) -> Self {
        self.config.bind = addr.into();
        self
    }

    /// Name of this app: keys the control socket (`herd status --name NAME`). Default: the file
    /// name of the program.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = Some(name.into());
        self
    }

    /// Explicit path of the control socket (overrides the one derived from [`name`](Self::name)).
    pub fn control_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.socket = Some(path.into());
        self
    }

    /// How long a stopping worker may take to finish its in-flight requests before `SIGKILL`.
    /// Default 30 s.
    ///
    /// ```
    /// use std::time::Duration;
    /// let launcher = herd::launcher::Launcher::new().drain_timeout(Duration::from_secs(10));
    /// ```
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.config.drain_timeout = timeout;
        self
    }

    /// A worker whose runtime sent no heartbeat for this long is **hung**: the master kills it
    /// (`SIGTERM`, then `SIGKILL` after a second) and starts a replacement, as after a crash
    /// (logged as "hung", counted in `herd status`, the metrics and the dashboard). Zero turns
    /// the check off. Default 30 s (Gunicorn's `--timeout`).
    ///
    /// The heartbeat is a task on the worker's own runtime, so a deadlock, a blocking call on
    /// every runtime thread or a CPU loop stops it. Only workers that send heartbeats are judged:
    /// programs built with [`Launcher::run`]; other programs under `herd run` never are.
    ///
    /// ```
    /// use std::time::Duration;
    /// let launcher = herd::launcher::Launcher::new().hang_timeout(Duration::from_secs(10));
    /// ```
    pub fn hang_timeout(mut self, timeout: Duration) -> Self {
        self.config.hang_timeout = timeout;
        self
    }

    /// How long a stopping host keeps serving while it reports draining, before its workers
    /// stop accepting: the [lame-duck period](self#lame-duck-several-hosts-behind-a-load-balancer)
    /// that lets a load balancer's health checks move traffic away first. Default: zero (stop
    /// at once), or `HERD_LAME_DUCK_MS` when set.
    ///
    /// ```
    /// use std::time::Duration;
    /// let launcher = herd::launcher::Launcher::new().lame_duck(Duration::from_secs(3));
    /// ```
    pub fn lame_duck(mut self, period: Duration) -> Self {
        self.config.lame_duck = period;
        self
    }

    /// How long a new worker may take to report ready during a reload before the reload is
    /// aborted. Default 30 s.
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.config.ready_timeout = timeout;
        self
    }

    /// A worker that ran at least this long before crashing resets its slot's backoff. Default 5 s.
    pub fn min_uptime(mut self, uptime: Duration) -> Self {
        self.config.min_uptime = uptime;
        self
    }

    /// After this many quick crashes in a row a slot is marked errored and no longer restarted
    /// (until the next reload). Default 5.
    pub fn max_restarts(mut self, n: u32) -> Self {
        self.config.max_restarts = n;
        self
    }

    /// First backoff delay; the first restart after a crash is immediate, then the delay starts
    /// here and doubles (capped at 30 s). Default 500 ms.
    pub fn restart_backoff(mut self, delay: Duration) -> Self {
        self.config.restart_backoff = delay;
        self
    }

    /// Recycle (rolling replacement) a worker whose resident memory exceeds `bytes`, read from
    /// `/proc/PID/status` every second.
    pub fn max_memory(mut self, bytes: u64) -> Self {
        self.config.max_memory = Some(bytes);
        self
    }

    /// Recycle a worker after it served `n` requests. Counting happens in the worker: add
    /// [`Worker::requests`] as a layer to the router.
    pub fn max_requests(mut self, n: u64) -> Self {
        self.config.max_requests = Some(n);
        self
    }

    /// Count a worker that runs this long as ready even if it never reported `READY`: for
    /// programs run by [`supervise`](Self::supervise) that do not speak the herd protocol.
    /// Default: wait for `READY`.
    pub fn assume_ready_after(mut self, delay: Duration) -> Self {
        self.config.ready_after = Some(delay);
        self
    }

    /// Threads of each worker's tokio runtime. Default: CPUs divided by workers, at least 1.
    pub fn worker_threads(mut self, n: usize) -> Self {
        self.config.worker_threads = Some(n.max(1));
        self
    }

    /// Serve every worker's metrics in the Prometheus text format on `GET http://ADDR/metrics`,
    /// aggregated by the master (each series labelled `worker="N"`). Workers built with the
    /// `metrics` feature send their series over the master channel once a second; see
    /// [`herd::observe`](crate::observe). Loopback addresses only, unless
    /// [`dashboard_allow_remote`](Self::dashboard_allow_remote). Default: off.
    ///
    /// ```no_run
    /// let launcher = herd::launcher::Launcher::new().metrics("127.0.0.1:9616");
    /// ```
    pub fn metrics(mut self, addr: impl Into<String>) -> Self {
        self.config.metrics = Some(addr.into());
        self
    }

    /// Serve a live dashboard of the workers on `http://ADDR/` (and `/metrics`, `/api/status`).
    /// Read-only unless [`dashboard_token`](Self::dashboard_token) is set. Loopback addresses
    /// only, unless a token is set or [`dashboard_allow_remote`](Self::dashboard_allow_remote).
    /// Default: off.
    ///
    /// ```no_run
    /// let launcher = herd::launcher::Launcher::new().dashboard("127.0.0.1:9615");
    /// ```
    pub fn dashboard(mut self, addr: impl Into<String>) -> Self {
        self.config.dashboard = Some(addr.into());
        self
    }

    /// Enable the dashboard's reload and scale buttons for requests carrying this token in the
    /// `x-herd-token` header (compared in constant time).
    ///
    /// ```no_run
    /// let launcher = herd::launcher::Launcher::new()
    ///     .dashboard("127.0.0.1:9615")
    ///     .dashboard_token(std::env::var("HERD_DASHBOARD_TOKEN").unwrap_or_default());
    /// ```
    pub fn dashboard_token(mut self, token: impl Into<String>) -> Self {
        let token = token.into();
        self.config.dashboard_token = (!token.is_empty()).then_some(token);
        self
    }

    /// Allow the dashboard and metrics on a non-loopback address without a token (read-only
    /// pages, visible to anyone who can reach the address). Default: refused.
    pub fn dashboard_allow_remote(mut self, allow: bool) -> Self {
        self.config.dashboard_allow_remote = allow;
        self
    }

    /// Write the workers' output (each line prefixed `[worker N]`) to this file instead of the
    /// master's stdout and stderr, appending, created with mode 0640. `SIGUSR1` to the master
    /// reopens it, for logrotate without `copytruncate`. The master's own lines go there too when
    /// its tracing subscriber writes through [`LogWriter`] (`herd run` does). Default: none.
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.log_file = Some(path.into());
        self
    }

    /// Start every forwarded worker line with a UTC timestamp ([`log_timestamp`]). Default: off
    /// (journald and most log collectors add their own).
    pub fn log_timestamps(mut self, on: bool) -> Self {
        self.config.log_timestamps = on;
        self
    }

    /// Set an environment variable for the workers (on top of the master's environment).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.env.insert(key.into(), value.into());
        self
    }

    /// Run the app: call this from a plain `fn main()`, before any async runtime exists.
    ///
    /// * In a worker (`LISTEN_FDS=1` for this process: started by a herd master, by `herd run` or by
    ///   systemd socket activation) it builds a tokio runtime, calls `app` with the [`Worker`] and
    ///   returns what the app returned.
    /// * Otherwise this process becomes the master: it binds the socket, spawns the workers by
    ///   re-executing the current program with the same arguments, supervises them and returns when
    ///   it has been stopped.
    ///
    /// # Errors
    ///
    /// In a worker: the app's error, or a failure to build the runtime. In the master: a bind or
    /// control socket failure, or [`Error::UncleanStop`] if a worker had to be killed at stop.
    pub fn run<F, Fut, E>(self, app: F) -> Result<()>
    where
        F: FnOnce(Worker) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if let Some(worker) = Worker::from_env()? {
            return worker::run_worker(worker, &self.config, app);
        }
        let program = std::env::current_exe()
            .map_err(|e| Error::io("cannot find the path of the current program", e))?;
        let args: Vec<OsString> = std::env::args_os().skip(1).collect();
        master::run(self.config, program, args)
    }

    /// Be the master of an arbitrary program that accepts a `LISTEN_FDS` socket (what `herd run`
    /// does). `program` is looked up in `PATH` at each spawn, so a rebuilt binary is picked up by a
    /// reload.
    ///
    /// A program that does not write `READY` on fd 4 (see the [module docs](self)) is never counted
    /// as ready, so reloads of it abort, unless [`assume_ready_after`](Self::assume_ready_after)
    /// is set; programs built with [`Launcher::run`] do it through [`Worker::ready`].
    ///
    /// # Errors
    ///
    /// As the master side of [`run`](Self::run).
    pub fn supervise(self, program: impl Into<PathBuf>, args: Vec<OsString>) -> Result<()> {
        master::run(self.config, program.into(), args)
    }
}
