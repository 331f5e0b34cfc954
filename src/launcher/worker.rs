//! The worker side: adopt fd 3 (and fd 4, the [master channel](super::master_channel)),
//! readiness, shutdown signal.

use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::stat::{fstat, SFlag};
use tokio::sync::watch;

use super::lame_duck::{is_draining, start_draining, DRAINING};
use super::master_channel::{heartbeat, master_eof, send_metrics, Channel, MASTER_FD};
use super::max_requests::MaxRequestsLayer;
use super::{
    systemd, Config, Error, Result, ENV_DRAIN_TIMEOUT_MS, ENV_GENERATION, ENV_HANG_TIMEOUT_MS,
    ENV_MASTER_FD, ENV_MAX_REQUESTS, ENV_WORKER_INDEX,
};

/// Between "stop accepting" and "close idle connections": a connection accepted just before the
/// stop gets this long to have its request read, so it is served instead of reset.
const ACCEPT_GRACE: Duration = Duration::from_millis(500);

/// fd of the listening socket (systemd's `SD_LISTEN_FDS_START`).
const LISTEN_FD: i32 = 3;
/// What a worker process gets: the listening socket, a shutdown signal, its identity.
///
/// Handed to the closure of [`Launcher::run`](super::Launcher::run), inside a tokio runtime.
#[derive(Debug)]
pub struct Worker {
    index: Option<usize>,
    generation: u64,
    listener: Option<std::net::TcpListener>,
    channel: Arc<Channel>,
    shutdown: watch::Receiver<bool>,
    shutdown_tx: Option<watch::Sender<bool>>,
    drain_timeout: Duration,
    /// The master's hang timeout (`HERD_HANG_TIMEOUT_MS`): heartbeats are sent when set.
    hang_timeout: Option<Duration>,
    requests: MaxRequestsLayer,
    /// The master collects metrics: `serve` counts requests.
    observed: bool,
}

fn env_parse<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Adopt an inherited fd after checking that it is open; mark it close-on-exec so the app's own
/// children do not inherit it.
pub(crate) fn adopt_fd(fd: i32, what: &str) -> Result<OwnedFd> {
    let flags = fcntl(borrow_inherited(fd), FcntlArg::F_GETFD)
        .map_err(|e| Error::io(format!("inherited {what} fd {fd} is not open"), e.into()))?;
    let mut flags = FdFlag::from_bits_truncate(flags);
    flags.insert(FdFlag::FD_CLOEXEC);
    fcntl(borrow_inherited(fd), FcntlArg::F_SETFD(flags))
        .map_err(|e| Error::io(format!("fcntl on inherited {what} fd {fd}"), e.into()))?;
    // SAFETY: the fd was handed to this process by its parent (socket activation convention /
    // herd protocol), is open (checked above) and nothing else in the process owns it: the
    // environment variables that announce it are removed right after adoption, so it is
    // adopted at most once.
    #[allow(unsafe_code)]
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(owned)
}

/// A borrowed view of an inherited fd number, for the `fcntl` checks that precede adoption.
fn borrow_inherited(fd: i32) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: only used on fds 3 and 4 before adoption, for fcntl calls that fail cleanly with
    // EBADF when the fd is not open; the process never closes these fds meanwhile.
    #[allow(unsafe_code)]
    unsafe {
        std::os::fd::BorrowedFd::borrow_raw(fd)
    }
}

/// The listening socket passed as fd 3 by `LISTEN_FDS` (systemd socket activation, a herd
/// master), if it is meant for this process: `LISTEN_PID` equal to our pid, or missing unless
/// `strict_pid`.
pub(crate) fn inherited_listener(strict_pid: bool) -> Result<Option<std::net::TcpListener>> {
    let fds: usize = match env_parse("LISTEN_FDS") {
        Some(n) if n >= 1 => n,
        _ => return Ok(None),
    };
    match env_parse::<u32>("LISTEN_PID") {
        Some(pid) if pid == std::process::id() => {}
        None if !strict_pid => {}
        // Meant for another process (systemd semantics).
        _ => return Ok(None),
    }
    if fds > 1 {
        tracing::warn!("herd: LISTEN_FDS={fds}, only fd 3 is used");
        // The others must not leak into every worker (or the app's children): close-on-exec.
        for fd in (LISTEN_FD + 1)..LISTEN_FD.saturating_add(i32::try_from(fds).unwrap_or(i32::MAX))
        {
            if let Ok(flags) = fcntl(borrow_inherited(fd), FcntlArg::F_GETFD) {
                let mut flags = FdFlag::from_bits_truncate(flags);
                flags.insert(FdFlag::FD_CLOEXEC);
                let _ = fcntl(borrow_inherited(fd), FcntlArg::F_SETFD(flags));
            }
        }
    }
    let fd = adopt_fd(LISTEN_FD, "listening socket")?;
    let stat = fstat(&fd).map_err(|e| Error::io("fstat on fd 3", e.into()))?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(Error::io(
            "fd 3 announced by LISTEN_FDS",
            std::io::Error::other("is not a socket"),
        ));
    }
    Ok(Some(std::net::TcpListener::from(fd)))
}

impl Worker {
    /// Is this process a worker? `LISTEN_FDS` set for this pid (a missing `LISTEN_PID` is
    /// accepted too). Consumes the socket-activation variables.
    pub(crate) fn from_env() -> Result<Option<Worker>> {
        let Some(listener) = inherited_listener(false)? else {
            return Ok(None);
        };
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("set fd 3 non-blocking", e))?;

        let master = match env_parse::<i32>(ENV_MASTER_FD) {
            Some(fd) if fd == MASTER_FD => Some(UnixStream::from(adopt_fd(fd, "master channel")?)),
            _ => None,
        };
        let drain_timeout = env_parse::<u64>(ENV_DRAIN_TIMEOUT_MS)
            .map_or(Duration::from_secs(30), Duration::from_millis);
        let max_requests = env_parse::<u64>(ENV_MAX_REQUESTS);
        let hang_timeout = env_parse::<u64>(ENV_HANG_TIMEOUT_MS)
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis);
        let index = env_parse(ENV_WORKER_INDEX);
        let generation = env_parse(ENV_GENERATION).unwrap_or(0);
        // The process is still single-threaded here (no runtime yet): editing the environment is
        // sound. Children of the app must not believe the fds are theirs.
        for var in [
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            ENV_MASTER_FD,
            ENV_HANG_TIMEOUT_MS,
        ] {
            std::env::remove_var(var);
        }
        let (tx, rx) = watch::channel(false);
        let channel = Arc::new(Channel::new(master));
        Ok(Some(Worker {
            index,
            generation,
            listener: Some(listener),
            requests: MaxRequestsLayer::new(max_requests, channel.clone()),
            channel,
            shutdown: rx,
            shutdown_tx: Some(tx),
            drain_timeout,
            hang_timeout,
            observed: false,
        }))
    }

    /// The listening socket as a tokio listener (non-blocking, inherited as fd 3).
    ///
    /// # Errors
    ///
    /// When called a second time, or outside the runtime the launcher built.
    pub fn listener(&mut self) -> std::io::Result<tokio::net::TcpListener> {
        let listener = self.listener.take().ok_or_else(|| {
            std::io::Error::other("Worker::listener was already taken by an earlier call")
        })?;
        tokio::net::TcpListener::from_std(listener)
    }

    /// Serve an axum app until shutdown, the recommended way: reports [`ready`](Self::ready),
    /// then on `SIGTERM` (or master death) **first stops accepting**, waits 500 ms so that a
    /// connection accepted at that very moment gets its request read, and only then starts
    /// axum's graceful shutdown (idle connections close, in-flight requests finish). Plain
    /// `axum::serve(listener, app).with_graceful_shutdown(worker.shutdown())` does both at once
    /// and can reset a connection accepted right before the signal, which fails a request
    /// during reloads.
    ///
    /// ```no_run
    /// use axum::{routing::get, Router};
    /// fn main() -> Result<(), herd::launcher::Error> {
    ///     herd::launcher::Launcher::new().run(|worker| async move {
    ///         let app = Router::new().route("/", get(|| async { "hi" }));
    ///         worker.serve(app).await
    ///     })
    /// }
    /// ```
    ///
    /// # Errors
    ///
    /// If the listener was already taken with [`listener`](Self::listener), or serving fails.
    pub async fn serve(mut self, app: axum::Router) -> std::io::Result<()> {
        let listener = StopAccepting {
            inner: self.listener()?,
            stop: self.shutdown.clone(),
        };
        self.ready();
        let stop = self.shutdown();
        let grace = ACCEPT_GRACE.min(self.drain_timeout);
        let drained = async move {
            stop.await;
            tokio::time::sleep(grace).await;
        };
        if self.observed {
            // Around the whole router, not `Router::layer` (which wraps every route in one more
            // boxed service: an allocation per request, measured at ~1 400 instructions).
            use tower_layer::Layer as _;
            let app = crate::observe::RequestsTotalLayer.layer(app);
            axum::serve(
                listener,
                axum::ServiceExt::<axum::extract::Request>::into_make_service_with_connect_info::<
                    crate::rate_limit::PeerAddr,
                >(app),
            )
            .with_graceful_shutdown(drained)
            .await
        } else {
            // With the peer address (`ConnectInfo`), for per-client rate limits.
            let app = app.into_make_service_with_connect_info::<crate::rate_limit::PeerAddr>();
            axum::serve(listener, app)
                .with_graceful_shutdown(drained)
                .await
        }
    }

    /// Report that this worker serves. Call it once the app is ready to accept (right before
    /// `axum::serve` is fine: connections wait in the shared backlog). Idempotent.
    ///
    /// Under a herd master this writes `READY` on the master channel; under systemd it sends
    /// `READY=1` to `NOTIFY_SOCKET`; otherwise it does nothing. Until a new worker is ready, a
    /// rolling reload keeps the old one serving.
    pub fn ready(&self) {
        if self.channel.ready_sent.swap(true, Ordering::SeqCst) {
            return;
        }
        if self.channel.master.is_some() {
            let _ = self.channel.send("READY\n");
        } else {
            systemd::notify(&[systemd::NotifyState::Ready]);
        }
    }

    /// Ask the master for a rolling replacement of this worker (a new one starts, then this one
    /// gets a graceful stop). Idempotent; does nothing without a herd master.
    pub fn recycle(&self) {
        self.channel.recycle();
    }

    /// A future that resolves when the worker must stop: `SIGTERM`/`SIGINT`, or the master died
    /// (its channel closed). With a hand-made accept loop, stop accepting when it resolves and
    /// give just-accepted connections a moment before closing idle ones, as
    /// [`serve`](Self::serve) does.
    ///
    /// When the master died the process also exits on its own after the drain timeout, so no
    /// worker outlives its master for long.
    pub fn shutdown(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.shutdown.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    /// Whether this worker's host is in its lame-duck period (see [`is_draining`], the same
    /// for the whole process, and [`healthz`](super::healthz), a ready handler that reports it).
    pub fn is_draining(&self) -> bool {
        is_draining()
    }

    /// A future that resolves when the host enters its lame-duck period (at once if it already
    /// did): for apps that want to act on it, e.g. ask long-lived connections to reconnect
    /// elsewhere.
    pub fn draining(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = DRAINING.subscribe();
        async move {
            let _ = rx.wait_for(|draining| *draining).await;
        }
    }

    /// The 0-based slot of this worker (`HERD_WORKER_INDEX`); `None` when not started by herd.
    pub fn index(&self) -> Option<usize> {
        self.index
    }

    /// The generation of this worker (`HERD_GENERATION`, 1 for the first one, bumped by each
    /// reload); 0 when not started by herd.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A request counter for [`Launcher::max_requests`](super::Launcher::max_requests): it is a
    /// tower layer, so `router.layer(worker.requests())` counts every request, and the worker asks
    /// to be recycled when the limit is reached.
    pub fn requests(&self) -> MaxRequestsLayer {
        self.requests.clone()
    }
}

/// A listener that stops accepting as soon as shutdown begins (see [`Worker::serve`]).
struct StopAccepting {
    inner: tokio::net::TcpListener,
    stop: watch::Receiver<bool>,
}

impl axum::serve::Listener for StopAccepting {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let stop = &mut self.stop;
        let stopped = async move {
            let _ = stop.wait_for(|stop| *stop).await;
        };
        tokio::select! {
            biased;
            () = stopped => std::future::pending().await,
            conn = axum::serve::Listener::accept(&mut self.inner) => conn,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The peer address of each connection, as `ConnectInfo<PeerAddr>` (axum implements
/// `Connected` for `SocketAddr` on its own listeners only).
impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, StopAccepting>>
    for crate::rate_limit::PeerAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, StopAccepting>) -> Self {
        crate::rate_limit::PeerAddr(*stream.remote_addr())
    }
}

async fn recv_or_pending(signal: Option<&mut tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Watch SIGTERM/SIGINT and the master channel; flip the shutdown signal.
///
/// `lame_duck`: without a master (none drives the lame-duck period then), the first
/// SIGTERM/SIGINT marks the host draining and waits this long, serving, before the shutdown (a
/// second signal cuts the wait short). Under a master, the master drives it.
async fn watch_shutdown(
    tx: watch::Sender<bool>,
    master: Option<UnixStream>,
    drain: Duration,
    lame_duck: Duration,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    let own_lame_duck = master.is_none() && !lame_duck.is_zero();
    let eof = master.and_then(master_eof);
    let master_gone = async move {
        match eof {
            Some(eof) => {
                let _ = eof.await;
            }
            None => std::future::pending().await,
        }
    };
    let mut master_gone = std::pin::pin!(master_gone);
    tokio::select! {
        () = recv_or_pending(term.as_mut()) => {}
        () = recv_or_pending(int.as_mut()) => {}
        () = &mut master_gone => orphaned(&tx, drain).await,
    }
    if own_lame_duck {
        start_draining();
        tokio::select! {
            () = tokio::time::sleep(lame_duck) => {}
            () = recv_or_pending(term.as_mut()) => {}
            () = recv_or_pending(int.as_mut()) => {}
        }
    }
    let _ = tx.send(true);
    // The master enforces the drain timeout while it lives. One that dies meanwhile (its
    // PR_SET_PDEATHSIG SIGTERM can win the select above over the channel's end-of-file) leaves
    // nobody to do it: the worker does it itself, so no orphan lives on with a long request.
    master_gone.await;
    orphaned(&tx, drain).await;
}

/// The master is gone: drain, and exit after the drain timeout at the latest.
///
/// Nothing is logged: a worker's stdout and stderr are pipes to its master, so a line written now
/// fails with `EPIPE`, and a tracing subscriber that reports that with `eprintln!` panics, which
/// would end this task before its deadline.
async fn orphaned(tx: &watch::Sender<bool>, drain: Duration) -> ! {
    let _ = tx.send(true);
    tokio::time::sleep(drain).await;
    std::process::exit(1);
}

pub(crate) fn run_worker<F, Fut, E>(mut worker: Worker, config: &Config, app: F) -> Result<()>
where
    F: FnOnce(Worker) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let threads = config.worker_threads.unwrap_or_else(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cpus / config.workers.max(1)).max(1)
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(|e| Error::io("cannot build the worker's tokio runtime", e))?;
    let tx = worker.shutdown_tx.take().expect("fresh worker");
    // A second handle on the master channel, read by the watcher for end-of-file.
    let watch_stream = match worker.channel.master.as_ref() {
        Some(s) => Some(
            s.try_clone()
                .map_err(|e| Error::io("dup master channel", e))?,
        ),
        None => None,
    };
    let drain = worker.drain_timeout;
    let lame_duck = config.lame_duck;
    debug_assert!(watch_stream
        .as_ref()
        .is_none_or(|s| s.as_raw_fd() != MASTER_FD));
    let result = runtime.block_on(async move {
        tokio::spawn(watch_shutdown(tx, watch_stream, drain, lame_duck));
        if let Some(timeout) = worker.hang_timeout {
            tokio::spawn(heartbeat(worker.channel.clone(), timeout));
        }
        worker.observed = send_metrics(&worker.channel, worker.index);
        app(worker).await
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result.map_err(|e| Error::App(e.into()))
}
