//! The worker side: adopt fd 3 (and fd 4, the master channel), readiness, shutdown signal.

use std::future::Future;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::stat::{fstat, SFlag};
use tokio::sync::watch;

use super::{
    systemd, Config, Error, Result, ENV_DRAIN_TIMEOUT_MS, ENV_GENERATION, ENV_MASTER_FD,
    ENV_MAX_REQUESTS, ENV_WORKER_INDEX,
};

/// Between "stop accepting" and "close idle connections": a connection accepted just before the
/// stop gets this long to have its request read, so it is served instead of reset.
const ACCEPT_GRACE: Duration = Duration::from_millis(500);

/// The line the master writes on the channel when its lame-duck period begins.
pub(crate) const DRAINING_LINE: &str = "DRAINING\n";

/// Whether this process's host is draining (a lame duck, see the [module
/// docs](super#lame-duck-several-hosts-behind-a-load-balancer)): one per process, because a process
/// is at most one worker. Never set back to `false`: a lame duck only stops.
static DRAINING: LazyLock<watch::Sender<bool>> = LazyLock::new(|| watch::Sender::new(false));

/// Mark this process's host as draining (idempotent).
fn start_draining() {
    if !DRAINING.send_replace(true) {
        tracing::info!("herd worker: the host is a lame duck: /healthz reports draining");
    }
}

/// Whether the host this worker runs on is in its lame-duck period: it still serves, but it is
/// about to stop, and its health route should say so (`503`) so that a load balancer moves
/// traffic away. `false` outside a herd worker and during rolling reloads. See
/// [`Worker::is_draining`] and [`healthz`].
pub fn is_draining() -> bool {
    *DRAINING.borrow()
}

/// A ready health-check handler for a load balancer: `200 {"ok":true}`, or `503
/// {"ok":false,"draining":true}` with `Retry-After: 1` while the host [is
/// draining](is_draining).
///
/// ```no_run
/// use axum::{routing::get, Router};
/// let app: Router = Router::new().route("/healthz", get(herd::launcher::healthz));
/// ```
pub async fn healthz() -> axum::response::Response {
    use axum::http::{header, HeaderValue, StatusCode};
    let (status, body) = if is_draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"ok":false,"draining":true}"#,
        )
    } else {
        (StatusCode::OK, r#"{"ok":true}"#)
    };
    let mut res = axum::response::Response::new(axum::body::Body::from(body));
    *res.status_mut() = status;
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    res
}

/// fd of the listening socket (systemd's `SD_LISTEN_FDS_START`).
const LISTEN_FD: i32 = 3;
/// fd of the channel to the master.
pub(crate) const MASTER_FD: i32 = 4;

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
    requests: RequestCounter,
    /// The master collects metrics: `serve` counts requests.
    observed: bool,
}

/// The way back to whoever started us.
///
/// The socket stays in blocking mode for its whole life: its end-of-file is watched by a thread
/// with blocking reads ([`master_eof`]), because `O_NONBLOCK` belongs to the open file
/// description, shared by every dup of the fd, and a non-blocking writer could cut a line short
/// when the buffer is full (and a following `READY` would be lost in the garbage).
#[derive(Debug)]
struct Channel {
    master: Option<UnixStream>,
    ready_sent: AtomicBool,
    recycle_sent: AtomicBool,
    /// One line at a time: lines written from several threads never interleave.
    writing: std::sync::Mutex<()>,
}

impl Channel {
    fn new(master: Option<UnixStream>) -> Channel {
        Channel {
            master,
            ready_sent: AtomicBool::new(false),
            recycle_sent: AtomicBool::new(false),
            writing: std::sync::Mutex::new(()),
        }
    }

    /// Write one whole line (blocking until the master has room for it).
    fn send(&self, line: &str) {
        if let Some(mut stream) = self.master.as_ref() {
            let _whole_line = self.writing.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = stream.write_all(line.as_bytes()) {
                tracing::warn!("herd worker: cannot write to the master: {e}");
            }
        }
    }
}

/// Resolves when the master channel reaches end-of-file (the master died); on the way, a
/// `DRAINING` line from the master marks the host as [draining](is_draining). A plain thread
/// blocks in `read`, so the socket never has to be made non-blocking (see [`Channel`]). `None`
/// if the thread cannot be started.
fn master_eof(mut stream: UnixStream) -> Option<tokio::sync::oneshot::Receiver<()>> {
    use std::io::Read;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let started = std::thread::Builder::new()
        .name("herd-master-eof".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            // The master writes only whole `DRAINING` lines; a partial one waits in `line`.
            let mut line = Vec::with_capacity(DRAINING_LINE.len());
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        for &b in &buf[..n] {
                            line.push(b);
                            if b == b'\n' {
                                if line == DRAINING_LINE.as_bytes() {
                                    start_draining();
                                }
                                line.clear();
                            } else if line.len() > DRAINING_LINE.len() {
                                // Not a line this side knows: skip it up to its end.
                                line.clear();
                                line.push(b'?');
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    // End-of-file or an error: the master is gone.
                    Err(_) => break,
                }
            }
            let _ = tx.send(());
        });
    match started {
        Ok(_) => Some(rx),
        Err(e) => {
            tracing::warn!("herd worker: cannot watch the master channel: {e}");
            None
        }
    }
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
        let index = env_parse(ENV_WORKER_INDEX);
        let generation = env_parse(ENV_GENERATION).unwrap_or(0);
        // The process is still single-threaded here (no runtime yet): editing the environment is
        // sound. Children of the app must not believe the fds are theirs.
        for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", ENV_MASTER_FD] {
            std::env::remove_var(var);
        }
        let (tx, rx) = watch::channel(false);
        let channel = Arc::new(Channel::new(master));
        Ok(Some(Worker {
            index,
            generation,
            listener: Some(listener),
            requests: RequestCounter {
                inner: Arc::new(CounterInner {
                    count: AtomicU64::new(0),
                    limit: max_requests,
                    channel: channel.clone(),
                }),
            },
            channel,
            shutdown: rx,
            shutdown_tx: Some(tx),
            drain_timeout,
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
            self.channel.send("READY\n");
        } else {
            systemd::notify("READY=1");
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
    /// for the whole process, and [`healthz`], a ready handler that reports it).
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
    pub fn requests(&self) -> RequestCounter {
        self.requests.clone()
    }
}

impl Channel {
    fn recycle(&self) {
        if self.master.is_some() && !self.recycle_sent.swap(true, Ordering::SeqCst) {
            self.send("RECYCLE\n");
        }
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

#[derive(Debug)]
struct CounterInner {
    count: AtomicU64,
    limit: Option<u64>,
    channel: Arc<Channel>,
}

/// Counts requests of a worker; a tower [`Layer`](tower_layer::Layer). See
/// [`Worker::requests`].
#[derive(Debug, Clone)]
pub struct RequestCounter {
    inner: Arc<CounterInner>,
}

impl RequestCounter {
    /// Count one request; at the limit, ask the master for a replacement.
    pub fn record(&self) {
        let n = self.inner.count.fetch_add(1, Ordering::Relaxed) + 1;
        if self.inner.limit.is_some_and(|limit| n >= limit) {
            self.inner.channel.recycle();
        }
    }

    /// Requests counted so far.
    pub fn count(&self) -> u64 {
        self.inner.count.load(Ordering::Relaxed)
    }
}

impl<S> tower_layer::Layer<S> for RequestCounter {
    type Service = RequestCounterService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestCounterService {
            inner,
            counter: self.clone(),
        }
    }
}

/// The service made by the [`RequestCounter`] layer.
#[derive(Debug, Clone)]
pub struct RequestCounterService<S> {
    inner: S,
    counter: RequestCounter,
}

impl<S, R> tower_service::Service<R> for RequestCounterService<S>
where
    S: tower_service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        self.counter.record();
        self.inner.call(req)
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
    tokio::select! {
        () = recv_or_pending(term.as_mut()) => {}
        () = recv_or_pending(int.as_mut()) => {}
        () = master_gone => {
            tracing::warn!("herd worker: the master is gone, draining then exiting");
            let _ = tx.send(true);
            tokio::time::sleep(drain).await;
            std::process::exit(1);
        }
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
        worker.observed = send_metrics(&worker.channel);
        app(worker).await
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result.map_err(|e| Error::App(e.into()))
}

/// When the master asks for metrics (`HERD_METRICS=1`): install the Prometheus recorder and send
/// the rendered series every second as one `METRICS "<text as a JSON string>"` line. Masters that
/// do not know the line ignore it. Returns whether metrics are collected.
#[cfg(feature = "metrics")]
fn send_metrics(channel: &Arc<Channel>) -> bool {
    if channel.master.is_none() || std::env::var(super::ENV_METRICS).as_deref() != Ok("1") {
        return false;
    }
    let handle = match crate::observe::install_prometheus() {
        Ok(handle) => handle,
        Err(e) => {
            tracing::warn!("herd worker: metrics disabled: {e}");
            return false;
        }
    };
    let channel = channel.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            handle.run_upkeep();
            if let Ok(text) = serde_json::to_string(&handle.render()) {
                // A blocking write (see `Channel`), off the runtime's threads.
                let channel = channel.clone();
                let line = format!("METRICS {text}\n");
                let _ = tokio::task::spawn_blocking(move || channel.send(&line)).await;
            }
        }
    });
    true
}

#[cfg(not(feature = "metrics"))]
fn send_metrics(_channel: &Arc<Channel>) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::OFlag;
    use std::io::Read;

    #[test]
    fn watching_the_master_keeps_the_writer_blocking_and_lines_whole() {
        let (ours, mut master) = UnixStream::pair().unwrap();
        let eof = master_eof(ours.try_clone().unwrap()).expect("watcher thread");
        let channel = Arc::new(Channel::new(Some(ours)));
        let flags = fcntl(channel.master.as_ref().unwrap(), FcntlArg::F_GETFL).unwrap();
        assert!(
            !OFlag::from_bits_truncate(flags).contains(OFlag::O_NONBLOCK),
            "the channel must stay blocking while its end-of-file is watched"
        );
        // A line far larger than the socket buffer, then READY: both arrive whole.
        let big = format!("METRICS \"{}\"\n", "x".repeat(4 << 20));
        let writer = {
            let (channel, big) = (channel.clone(), big.clone());
            std::thread::spawn(move || {
                channel.send(&big);
                channel.send("READY\n");
            })
        };
        let expected = format!("{big}READY\n");
        let mut got = Vec::with_capacity(expected.len());
        let mut buf = vec![0u8; 1 << 16];
        while got.len() < expected.len() {
            let n = master.read(&mut buf).unwrap();
            assert!(n > 0, "the worker side closed early");
            got.extend_from_slice(&buf[..n]);
        }
        writer.join().unwrap();
        assert!(got == expected.as_bytes(), "a line was cut or lost");
        // The master goes away: the watcher sees it.
        drop(master);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(runtime.block_on(eof).is_ok());
    }

    #[test]
    fn a_draining_line_from_the_master_makes_the_host_a_lame_duck() {
        let (ours, mut master) = UnixStream::pair().unwrap();
        let eof = master_eof(ours).expect("watcher thread");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let draining = DRAINING.subscribe();
        assert!(!*draining.borrow(), "a worker starts healthy");
        // An unknown long line first, then the draining line cut in two writes.
        master
            .write_all(b"SOMETHING ELSE ENTIRELY DRAINING\nDRAI")
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!is_draining(), "only a whole DRAINING line counts");
        master.write_all(b"NING\n").unwrap();
        let res = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), async {
                let mut rx = draining;
                let _ = rx.wait_for(|d| *d).await;
            })
            .await
        });
        assert!(res.is_ok(), "the DRAINING line was not seen");
        let response = runtime.block_on(healthz());
        assert_eq!(
            response.status(),
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        );
        drop(master);
        assert!(runtime.block_on(eof).is_ok());
    }
}
