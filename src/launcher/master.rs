//! The master: supervision loop, rolling reload, scaling, graceful stop, control socket.
//!
//! Everything runs on one thread (a current-thread tokio runtime on the thread that called
//! `run`), so workers are always spawned from the same, long-lived thread, and the state needs no
//! locks: tasks only report events to the loop over a channel.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ffi::OsString;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

use super::control::{Request, Response, Status, WorkerStatus};
use super::dashboard::{self, ControlMsg, Observer, WorkerSnapshot};
use super::{spawn, systemd, Config, Error, Result};

/// Cap of the restart backoff.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Resolution of deadlines (backoff, ready timeout, drain timeout).
const TICK: Duration = Duration::from_millis(50);

pub(crate) fn run(config: Config, program: PathBuf, args: Vec<OsString>) -> Result<()> {
    // `herd run` itself socket-activated by systemd: keep that socket (it outlives master
    // restarts) instead of binding. Done before any thread exists: it edits the environment.
    let inherited = super::worker::inherited_listener(true)?;
    if inherited.is_some() {
        for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
            std::env::remove_var(var);
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("cannot build the master's tokio runtime", e))?;
    runtime.block_on(async move {
        let master = Master::new(config, program, args, inherited)?;
        master.run().await
    })
}

enum Event {
    Ready(u64),
    Recycle(u64),
    /// The worker's latest metrics, Prometheus text.
    Metrics(u64, String),
    Exited(u64, std::io::Result<ExitStatus>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Serves its slot.
    Current,
    /// New worker of a rolling replacement, not ready yet.
    Candidate,
    /// Old worker being stopped gracefully.
    Retiring,
}

struct Proc {
    slot: usize,
    pid: u32,
    generation: u64,
    started: Instant,
    ready: bool,
    role: Role,
    kill_at: Option<Instant>,
    killed: bool,
    /// The master's writing end of the worker's channel (`DRAINING`); shares the non-blocking
    /// mode that [`read_channel`] sets.
    channel: Option<std::os::unix::net::UnixStream>,
}

#[derive(Default)]
struct Slot {
    current: Option<u64>,
    generation: u64,
    restarts: u32,
    failures: u32,
    restart_at: Option<Instant>,
    errored: bool,
    last_exit: Option<String>,
}

struct Rollout {
    what: &'static str,
    queue: VecDeque<usize>,
    candidate: Option<(usize, u64, Instant)>,
    /// `None`: keep each slot's generation (recycling).
    generation: Option<u64>,
    started: Instant,
    waiters: Vec<oneshot::Sender<Response>>,
}

struct Master {
    config: Config,
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    listen: String,
    listener: OwnedFd,
    secret: String,
    socket_path: PathBuf,
    slots: BTreeMap<usize, Slot>,
    procs: HashMap<u64, Proc>,
    next_id: u64,
    generation: u64,
    rollout: Option<Rollout>,
    pending_reload: Option<Vec<oneshot::Sender<Response>>>,
    recycle_queue: BTreeSet<usize>,
    announced_ready: bool,
    started: Instant,
    stopping: bool,
    /// End of the lame-duck period: the host reports draining and serves until then, then stops.
    lame_duck_until: Option<Instant>,
    unclean: usize,
    events: mpsc::UnboundedSender<Event>,
    events_rx: Option<mpsc::UnboundedReceiver<Event>>,
    last_memory_check: Instant,
    /// Metrics / dashboard, when enabled.
    observer: Option<Arc<Observer>>,
    /// Latest metrics text of each worker process.
    worker_metrics: HashMap<u64, String>,
    last_sample: Instant,
}

fn describe(status: &std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (_, Some(sig)) => match Signal::try_from(sig) {
                Ok(sig) => format!("killed by {sig}"),
                Err(_) => format!("killed by signal {sig}"),
            },
            _ => s.to_string(),
        },
        Err(e) => format!("wait failed: {e}"),
    }
}

fn clean(status: &std::io::Result<ExitStatus>) -> bool {
    matches!(status, Ok(s) if s.success() || s.signal() == Some(Signal::SIGTERM as i32))
}

/// Resident memory of `pid`, from `/proc/PID/status` (`VmRSS`).
fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `now + d`, or a moment that never comes when `d` is absurdly large (no overflow panic).
fn later(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(now)
}

/// Resolves once `pid` (our child) has exited, without reaping it (`waitid` with `WNOWAIT`): the
/// zombie keeps its pid, so its process group id stays ours until the caller reaps it.
#[cfg(any(
    target_os = "android",
    all(target_os = "linux", not(target_env = "uclibc"))
))]
async fn exited_unreaped(pid: u32) {
    use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    // Registered before the first look, so an exit in between still wakes us.
    let Ok(mut sigchld) = signal(SignalKind::child()) else {
        return;
    };
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    loop {
        match waitid(Id::Pid(Pid::from_raw(raw)), flags) {
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR) => {}
            // Exited (a zombie now), or not our child anymore: either way, done waiting.
            Ok(_) | Err(_) => return,
        }
        if sigchld.recv().await.is_none() {
            return;
        }
    }
}

/// Elsewhere the group is killed right after the reap. Safe in practice: pids are handed out
/// cyclically, so a reaped pid comes back only after the counter wrapped around, and a new
/// process with that pid would also have to lead a process group of its own by then.
#[cfg(not(any(
    target_os = "android",
    all(target_os = "linux", not(target_env = "uclibc"))
)))]
async fn exited_unreaped(_pid: u32) {}

fn signal_group(pid: u32, sig: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = killpg(Pid::from_raw(pid), sig);
    }
}

/// The shared cookie key: `HERD_SECRET` from our environment, or 64 fresh random bytes.
///
/// A blank `HERD_SECRET` counts as unset (what `HERD_SECRET=` or compose's `${HERD_SECRET:-}`
/// give), exactly as the workers' own configuration reads it: passing a blank one through would
/// make each worker invent its own key, and a cookie would verify in one worker only. A given key
/// is checked here, once, so that a malformed one is a clear startup error of the master instead
/// of every worker failing and being restarted in a loop.
fn shared_secret() -> Result<String> {
    if let Some(secret) = std::env::var(super::ENV_SECRET)
        .ok()
        .filter(|s| !s.trim().is_empty())
    {
        crate::config::key_from_base64(super::ENV_SECRET, &secret)
            .map_err(|e| Error::Config(e.to_string()))?;
        return Ok(secret);
    }
    use base64::Engine as _;
    use rand::TryRngCore as _;
    let mut bytes = [0u8; 64];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| Error::io("OS random generator", std::io::Error::other(e.to_string())))?;
    tracing::warn!(
        "herd: HERD_SECRET is not set; generated a random cookie key for this master's life: \
         sessions will not survive a master restart"
    );
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Bind the control socket, refusing to steal one that answers.
///
/// `private_dir`: the socket lives in herd's default directory (`/tmp/herd-UID` or
/// `$XDG_RUNTIME_DIR/herd`), which must be ours and closed to everyone else (see
/// [`super::control::ensure_private_dir`]). An explicit path is the caller's choice.
fn bind_control(path: &Path, name: &str, private_dir: bool) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        if private_dir {
            super::control::ensure_private_dir(dir)?;
        } else {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::AlreadyRunning(name.to_owned()));
        }
        let _ = std::fs::remove_file(path);
    }
    tokio::net::UnixListener::bind(path)
        .map_err(|e| Error::io(format!("cannot bind control socket {}", path.display()), e))
}

async fn serve_control(listener: tokio::net::UnixListener, tx: mpsc::UnboundedSender<ControlMsg>) {
    let mut failing = false;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                failing = false;
                stream
            }
            Err(e) => {
                // EMFILE and friends do not go away by retrying at once: log once, back off.
                if !failing {
                    tracing::warn!("herd: control socket accept failed: {e}; retrying");
                    failing = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let read = tokio::time::timeout(
                Duration::from_secs(10),
                BufReader::new(read).read_line(&mut line),
            )
            .await;
            let response = match read {
                Ok(Ok(n)) if n > 0 => match serde_json::from_str::<Request>(&line) {
                    Ok(request) => {
                        let (reply, answer) = oneshot::channel();
                        if tx.send((request, reply)).is_err() {
                            return;
                        }
                        answer
                            .await
                            .unwrap_or_else(|_| Response::err("the master is exiting"))
                    }
                    Err(e) => Response::err(format!("bad request: {e}")),
                },
                _ => return,
            };
            if let Ok(mut out) = serde_json::to_string(&response) {
                out.push('\n');
                let _ = write.write_all(out.as_bytes()).await;
            }
        });
    }
}

/// Copy a worker's output to ours, one prefixed line at a time.
async fn forward_output(stream: impl tokio::io::AsyncRead + Unpin, slot: usize, stderr: bool) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if line.last() != Some(&b'\n') {
                    line.push(b'\n');
                }
                let mut out = format!("[worker {slot}] ").into_bytes();
                out.extend_from_slice(&line);
                // Whole lines in one write: lines of different workers never interleave.
                let _ = if stderr {
                    std::io::stderr().lock().write_all(&out)
                } else {
                    std::io::stdout().lock().write_all(&out)
                };
            }
        }
    }
}

/// Read `READY` / `RECYCLE` lines from a worker's channel.
async fn read_channel(
    stream: std::os::unix::net::UnixStream,
    id: u64,
    events: mpsc::UnboundedSender<Event>,
) {
    let Ok(()) = stream.set_nonblocking(true) else {
        return;
    };
    let Ok(stream) = tokio::net::UnixStream::from_std(stream) else {
        return;
    };
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let event = match line.trim() {
            "READY" | "READY=1" => Event::Ready(id),
            "RECYCLE" => Event::Recycle(id),
            // `METRICS "<Prometheus text as a JSON string>"`, once a second (feature `metrics`).
            other => match other.strip_prefix("METRICS ") {
                Some(json) => match serde_json::from_str::<String>(json) {
                    Ok(text) => Event::Metrics(id, text),
                    Err(_) => continue,
                },
                None => continue,
            },
        };
        if events.send(event).is_err() {
            return;
        }
    }
}

impl Master {
    fn new(
        config: Config,
        program: PathBuf,
        args: Vec<OsString>,
        inherited: Option<std::net::TcpListener>,
    ) -> Result<Self> {
        let name = config.name.clone().unwrap_or_else(|| {
            program
                .file_name()
                .map_or("herd".into(), |n| n.to_string_lossy().into_owned())
        });
        let socket_path = config
            .socket
            .clone()
            .unwrap_or_else(|| super::socket_path(&name));
        let listener = match inherited {
            Some(listener) => {
                tracing::info!("herd: using the listening socket passed as fd 3 (LISTEN_FDS)");
                listener
            }
            None => spawn::bind(&config.bind)?,
        };
        let listen = listener
            .local_addr()
            .map_or(config.bind.clone(), |a| a.to_string());
        let secret = shared_secret()?;
        if config.workers > super::MAX_WORKERS {
            return Err(Error::Config(format!(
                "{} workers asked for, at most {} are supported",
                config.workers,
                super::MAX_WORKERS
            )));
        }
        let (events, events_rx) = mpsc::unbounded_channel();
        Ok(Master {
            name,
            program,
            args,
            listen,
            listener: listener.into(),
            secret,
            socket_path,
            slots: BTreeMap::new(),
            procs: HashMap::new(),
            next_id: 0,
            generation: 1,
            rollout: None,
            pending_reload: None,
            recycle_queue: BTreeSet::new(),
            announced_ready: false,
            started: Instant::now(),
            stopping: false,
            lame_duck_until: None,
            unclean: 0,
            events,
            events_rx: Some(events_rx),
            last_memory_check: Instant::now(),
            observer: None,
            worker_metrics: HashMap::new(),
            last_sample: Instant::now(),
            config,
        })
    }

    async fn run(mut self) -> Result<()> {
        let control = bind_control(&self.socket_path, &self.name, self.config.socket.is_none())?;
        let (control_tx, mut control_rx) = mpsc::unbounded_channel();
        let observer_tasks = self.start_observer(&control_tx)?;
        let control_task = tokio::spawn(serve_control(control, control_tx));
        let sig = |kind| signal(kind).map_err(|e| Error::io("cannot install signal handler", e));
        let mut hup = sig(SignalKind::hangup())?;
        let mut term = sig(SignalKind::terminate())?;
        let mut int = sig(SignalKind::interrupt())?;
        let mut ttin = sig(SignalKind::from_raw(Signal::SIGTTIN as i32))?;
        let mut ttou = sig(SignalKind::from_raw(Signal::SIGTTOU as i32))?;
        let mut events = self.events_rx.take().expect("run once");
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        tracing::info!(
            "herd: master {} (pid {}) listening on {}, {} workers, control socket {}",
            self.name,
            std::process::id(),
            self.listen,
            self.config.workers,
            self.socket_path.display()
        );
        self.scale_to(self.config.workers);

        while !(self.stopping && self.procs.is_empty()) {
            tokio::select! {
                Some(event) = events.recv() => self.on_event(event),
                Some((request, reply)) = control_rx.recv() => self.on_control(request, reply),
                _ = hup.recv() => self.reload(None),
                _ = term.recv() => self.begin_stop(),
                _ = int.recv() => self.begin_stop(),
                _ = ttin.recv() => {
                    if self.slots.len() >= super::MAX_WORKERS {
                        tracing::warn!(
                            "herd: SIGTTIN ignored: already {} workers, the most supported",
                            self.slots.len()
                        );
                    } else {
                        self.scale_to(self.slots.len() + 1);
                    }
                }
                _ = ttou.recv() => self.scale_to(self.slots.len().saturating_sub(1)),
                _ = tick.tick() => self.on_tick(),
            }
        }
        control_task.abort();
        for task in observer_tasks {
            task.abort();
        }
        let _ = std::fs::remove_file(&self.socket_path);
        if self.unclean > 0 {
            tracing::error!(
                "herd: stopped; {} worker(s) did not stop cleanly",
                self.unclean
            );
            Err(Error::UncleanStop(self.unclean))
        } else {
            tracing::info!("herd: all workers stopped cleanly");
            Ok(())
        }
    }

    fn spawn(&mut self, slot: usize, generation: u64, role: Role) -> std::io::Result<u64> {
        let mut env = vec![
            (super::ENV_WORKER_INDEX, slot.to_string()),
            (super::ENV_GENERATION, generation.to_string()),
            (super::ENV_SECRET, self.secret.clone()),
            (
                super::ENV_DRAIN_TIMEOUT_MS,
                u64::try_from(self.config.drain_timeout.as_millis())
                    .unwrap_or(u64::MAX)
                    .to_string(),
            ),
        ];
        if let Some(n) = self.config.max_requests {
            env.push((super::ENV_MAX_REQUESTS, n.to_string()));
        }
        if self.observer.is_some() {
            env.push((super::ENV_METRICS, "1".to_owned()));
        }
        let spawn::Spawned { mut child, channel } =
            spawn::spawn_worker(&self.program, &self.args, &self.listener, &env)?;
        let pid = child.id().unwrap_or(0);
        let id = self.next_id;
        self.next_id += 1;
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_output(out, slot, false));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_output(err, slot, true));
        }
        let writer = channel
            .try_clone()
            .map_err(|e| tracing::warn!("herd: worker {slot}: no writing end for DRAINING: {e}"))
            .ok();
        tokio::spawn(read_channel(channel, id, self.events.clone()));
        let events = self.events.clone();
        tokio::spawn(async move {
            // Whatever the worker left in its process group goes with it. The group is killed
            // while the worker is an unreaped zombie: its pid, which is the group's id, cannot be
            // handed to another process before `wait` below reaps it.
            exited_unreaped(pid).await;
            signal_group(pid, Signal::SIGKILL);
            let status = child.wait().await;
            let _ = events.send(Event::Exited(id, status));
        });
        tracing::info!("herd: worker {slot} started (pid {pid}, generation {generation})");
        self.procs.insert(
            id,
            Proc {
                slot,
                pid,
                generation,
                started: Instant::now(),
                ready: false,
                role,
                kill_at: None,
                killed: false,
                channel: writer,
            },
        );
        if self.lame_duck_until.is_some() {
            self.tell_draining(id);
        }
        Ok(id)
    }

    /// Start the serving worker of `slot`; a failure to spawn counts as a crash.
    fn start_current(&mut self, slot: usize) {
        let Some(generation) = self.slots.get(&slot).map(|s| s.generation) else {
            return;
        };
        match self.spawn(slot, generation, Role::Current) {
            Ok(id) => {
                let s = self.slots.get_mut(&slot).expect("slot exists");
                s.current = Some(id);
                s.restart_at = None;
            }
            Err(e) => {
                tracing::error!("herd: cannot spawn worker {slot}: {e}");
                self.crashed(slot, Duration::ZERO, &format!("spawn failed: {e}"));
            }
        }
    }

    /// The serving worker of `slot` died (or could not start): restart with backoff, or mark the
    /// slot errored after too many quick crashes.
    fn crashed(&mut self, slot: usize, uptime: Duration, why: &str) {
        let Some(s) = self.slots.get_mut(&slot) else {
            return;
        };
        s.current = None;
        s.last_exit = Some(why.to_owned());
        if uptime >= self.config.min_uptime {
            s.failures = 0;
        }
        s.failures += 1;
        s.restarts += 1;
        if s.failures > self.config.max_restarts {
            s.errored = true;
            s.restart_at = None;
            tracing::error!(
                "herd: worker {slot} crashed {} times in a row ({why}); slot marked errored, \
                 not restarting until the next reload",
                s.failures
            );
            systemd::notify(&format!("STATUS=worker {slot} errored: {why}"));
            return;
        }
        // First restart immediate, then base, 2*base, 4*base ... capped.
        let delay = if s.failures <= 1 {
            Duration::ZERO
        } else {
            let factor = 1u32 << (s.failures - 2).min(16);
            self.config
                .restart_backoff
                .saturating_mul(factor)
                .min(MAX_BACKOFF)
        };
        tracing::warn!(
            "herd: worker {slot} died ({why}) after {:.1}s; restart #{} in {:?}",
            uptime.as_secs_f64(),
            s.restarts,
            delay
        );
        if delay.is_zero() {
            self.start_current(slot);
        } else {
            s.restart_at = Some(later(delay));
        }
    }

    fn retire(&mut self, id: u64) {
        if let Some(p) = self.procs.get_mut(&id) {
            p.role = Role::Retiring;
            if p.kill_at.is_none() {
                p.kill_at = Some(later(self.config.drain_timeout));
                signal_group(p.pid, Signal::SIGTERM);
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Ready(id) => self.on_ready(id),
            Event::Recycle(id) => {
                if let Some(p) = self.procs.get(&id) {
                    if p.role == Role::Current && !self.leaving() {
                        tracing::info!("herd: worker {} asked to be recycled", p.slot);
                        self.recycle_queue.insert(p.slot);
                        self.start_recycle();
                    }
                }
            }
            Event::Metrics(id, text) => {
                if self.procs.contains_key(&id) {
                    self.worker_metrics.insert(id, text);
                }
            }
            Event::Exited(id, status) => self.on_exit(id, &status),
        }
    }

    fn on_ready(&mut self, id: u64) {
        let Some(p) = self.procs.get_mut(&id) else {
            return;
        };
        if p.ready {
            return;
        }
        p.ready = true;
        let (slot, role, pid) = (p.slot, p.role, p.pid);
        tracing::info!("herd: worker {slot} (pid {pid}) ready");
        match role {
            Role::Candidate => {
                let is_candidate = self
                    .rollout
                    .as_ref()
                    .and_then(|r| r.candidate)
                    .is_some_and(|(_, c, _)| c == id);
                if !is_candidate {
                    return;
                }
                let Some(s) = self.slots.get_mut(&slot) else {
                    return;
                };
                let old = s.current.replace(id);
                s.restart_at = None;
                s.errored = false;
                s.failures = 0;
                s.generation = self.procs[&id].generation;
                if let Some(p) = self.procs.get_mut(&id) {
                    p.role = Role::Current;
                }
                if let Some(old) = old {
                    self.retire(old);
                }
                if let Some(r) = self.rollout.as_mut() {
                    r.candidate = None;
                }
                self.advance_rollout();
            }
            Role::Current => self.check_all_ready(),
            Role::Retiring => {}
        }
    }

    fn check_all_ready(&mut self) {
        if self.announced_ready || self.stopping {
            return;
        }
        let all = self.slots.values().all(|s| {
            s.current
                .and_then(|id| self.procs.get(&id))
                .is_some_and(|p| p.ready)
        });
        if all {
            self.announced_ready = true;
            tracing::info!(
                "herd: {} workers ready in {:?}",
                self.slots.len(),
                self.started.elapsed()
            );
            systemd::notify(&format!(
                "READY=1\nSTATUS={} workers on {}",
                self.slots.len(),
                self.listen
            ));
        }
    }

    fn on_exit(&mut self, id: u64, status: &std::io::Result<ExitStatus>) {
        let Some(p) = self.procs.remove(&id) else {
            return;
        };
        self.worker_metrics.remove(&id);
        let why = describe(status);
        let uptime = p.started.elapsed();
        if self.stopping {
            if p.killed || !clean(status) {
                self.unclean += 1;
                tracing::warn!("herd: worker {} (pid {}) stopped: {why}", p.slot, p.pid);
            } else {
                tracing::info!("herd: worker {} (pid {}) stopped", p.slot, p.pid);
            }
            return;
        }
        match p.role {
            Role::Retiring => {
                tracing::info!("herd: old worker {} (pid {}) stopped: {why}", p.slot, p.pid);
            }
            Role::Candidate => {
                if let Some(s) = self.slots.get_mut(&p.slot) {
                    s.last_exit = Some(why.clone());
                }
                let is_candidate = self
                    .rollout
                    .as_ref()
                    .and_then(|r| r.candidate)
                    .is_some_and(|(_, c, _)| c == id);
                if is_candidate {
                    self.abort_rollout(&format!(
                        "new worker {} (pid {}) exited before it was ready: {why}",
                        p.slot, p.pid
                    ));
                }
            }
            Role::Current => {
                if self.slots.get(&p.slot).and_then(|s| s.current) == Some(id) {
                    self.crashed(p.slot, uptime, &why);
                }
            }
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        if self.observer.is_some() && now.duration_since(self.last_sample) >= Duration::from_secs(1)
        {
            self.last_sample = now;
            self.sample();
        }
        // Drain deadlines.
        for p in self.procs.values_mut() {
            if !p.killed && p.kill_at.is_some_and(|at| at <= now) {
                tracing::warn!(
                    "herd: worker {} (pid {}) still running after the drain timeout; SIGKILL",
                    p.slot,
                    p.pid
                );
                p.killed = true;
                signal_group(p.pid, Signal::SIGKILL);
            }
        }
        if self.stopping {
            return;
        }
        if self.lame_duck_until.is_some_and(|at| at <= now) {
            tracing::info!("herd: lame-duck period over");
            self.stop();
            return;
        }
        // Ready deadline of a rolling replacement.
        if let Some((slot, _, deadline)) = self.rollout.as_ref().and_then(|r| r.candidate) {
            if deadline <= now {
                self.abort_rollout(&format!(
                    "new worker {slot} not ready after {:?}",
                    self.config.ready_timeout
                ));
            }
        }
        // Programs that never say READY.
        if let Some(after) = self.config.ready_after {
            let due: Vec<u64> = self
                .procs
                .iter()
                .filter(|(_, p)| !p.ready && p.role != Role::Retiring)
                .filter(|(_, p)| now.duration_since(p.started) >= after)
                .map(|(&id, _)| id)
                .collect();
            for id in due {
                self.on_ready(id);
            }
        }
        // Restarts after backoff.
        let due: Vec<usize> = self
            .slots
            .iter()
            .filter(|(_, s)| s.current.is_none() && s.restart_at.is_some_and(|at| at <= now))
            .map(|(&i, _)| i)
            .collect();
        for slot in due {
            self.start_current(slot);
        }
        // Memory limit.
        if let Some(limit) = self.config.max_memory {
            if now.duration_since(self.last_memory_check) >= Duration::from_secs(1) {
                self.last_memory_check = now;
                let over: Vec<(usize, u64)> = self
                    .procs
                    .values()
                    .filter(|p| p.role == Role::Current && p.ready)
                    .filter_map(|p| rss(p.pid).filter(|&m| m > limit).map(|m| (p.slot, m)))
                    .collect();
                for (slot, mem) in over {
                    if self.recycle_queue.insert(slot) {
                        tracing::info!(
                            "herd: worker {slot} uses {mem} bytes (limit {limit}); recycling"
                        );
                    }
                }
                self.start_recycle();
            }
        }
    }

    /// Bind the metrics and dashboard addresses (so that a bad one fails the start) and serve them.
    fn start_observer(
        &mut self,
        control: &mpsc::UnboundedSender<ControlMsg>,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let c = &self.config;
        if c.metrics.is_none() && c.dashboard.is_none() {
            return Ok(Vec::new());
        }
        let remote = c.dashboard_allow_remote || c.dashboard_token.is_some();
        let observer = Observer::new(c.dashboard_token.clone(), control.clone());
        let mut tasks = Vec::new();
        if let Some(addr) = &c.metrics {
            let listener = dashboard::bind(addr, "metrics", c.dashboard_allow_remote)?;
            tracing::info!("herd: metrics on http://{addr}/metrics");
            tasks.push(tokio::spawn(dashboard::serve_metrics(
                listener,
                observer.clone(),
            )));
        }
        if let Some(addr) = &c.dashboard {
            let listener = dashboard::bind(addr, "dashboard", remote)?;
            tracing::info!(
                "herd: dashboard on http://{addr}/ ({})",
                if c.dashboard_token.is_some() {
                    "reload and scale enabled with the token"
                } else {
                    "read-only"
                }
            );
            tasks.push(tokio::spawn(dashboard::serve_dashboard(
                listener,
                observer.clone(),
            )));
        }
        self.observer = Some(observer);
        Ok(tasks)
    }

    /// Hand the current state to the dashboard / metrics server.
    fn sample(&self) {
        let Some(observer) = &self.observer else {
            return;
        };
        let workers = self
            .procs
            .iter()
            .filter(|(_, p)| p.role == Role::Current)
            .map(|(id, p)| WorkerSnapshot {
                slot: p.slot,
                pid: p.pid,
                restarts: self.slots.get(&p.slot).map_or(0, |s| s.restarts),
                rss: rss(p.pid),
                cpu_secs: dashboard::cpu_seconds(p.pid),
                text: self.worker_metrics.get(id).cloned(),
            })
            .collect::<Vec<_>>();
        let mut workers = workers;
        workers.sort_by_key(|w| w.slot);
        observer.sample(self.status(), workers);
    }

    fn on_control(&mut self, request: Request, reply: oneshot::Sender<Response>) {
        match request {
            Request::Status => {
                let status = self.status();
                let _ = reply.send(Response {
                    ok: true,
                    message: String::new(),
                    status: Some(status),
                });
            }
            Request::Reload => self.reload(Some(reply)),
            Request::Scale { workers } => {
                if self.leaving() {
                    let _ = reply.send(Response::err("the master is stopping"));
                    return;
                }
                if !(1..=super::MAX_WORKERS).contains(&workers) {
                    let _ = reply.send(Response::err(format!(
                        "cannot scale to {workers} workers: from 1 to {} are supported",
                        super::MAX_WORKERS
                    )));
                    return;
                }
                self.scale_to(workers);
                let _ = reply.send(Response::ok(format!(
                    "scaled to {} workers",
                    self.slots.len()
                )));
            }
            Request::Stop => {
                let _ = reply.send(Response::ok("stopping"));
                self.begin_stop();
            }
        }
    }

    fn status(&self) -> Status {
        let mut workers = Vec::new();
        let live = self
            .observer
            .as_ref()
            .map(|o| o.latest())
            .unwrap_or_default();
        let redis = (self.observer.as_ref()).map_or_else(Default::default, |o| o.redis_breakers());
        let row = |p: &Proc, state: &str, s: Option<&Slot>| WorkerStatus {
            index: p.slot,
            pid: Some(p.pid),
            generation: p.generation,
            uptime_secs: p.started.elapsed().as_secs(),
            restarts: s.map_or(0, |s| s.restarts),
            memory_bytes: rss(p.pid),
            state: state.into(),
            last_exit: s.and_then(|s| s.last_exit.clone()),
            cpu_percent: live.get(&p.pid).and_then(|l| l.0),
            requests_per_sec: live.get(&p.pid).and_then(|l| l.1),
            redis: redis.get(&p.pid).map(|r| r.0.clone()),
            redis_since: redis.get(&p.pid).and_then(|r| r.1),
        };
        for (&index, s) in &self.slots {
            match s.current.and_then(|id| self.procs.get(&id)) {
                Some(p) if p.role == Role::Current => {
                    let state = match (self.leaving(), p.ready) {
                        (true, _) => "stopping",
                        (false, true) => "online",
                        (false, false) => "starting",
                    };
                    workers.push(row(p, state, Some(s)));
                }
                _ => workers.push(WorkerStatus {
                    index,
                    pid: None,
                    generation: s.generation,
                    uptime_secs: 0,
                    restarts: s.restarts,
                    memory_bytes: None,
                    state: if s.errored { "errored" } else { "waiting" }.into(),
                    last_exit: s.last_exit.clone(),
                    cpu_percent: None,
                    requests_per_sec: None,
                    redis: None,
                    redis_since: None,
                }),
            }
        }
        let mut others: Vec<&Proc> = self
            .procs
            .values()
            .filter(|p| p.role != Role::Current)
            .collect();
        others.sort_by_key(|p| (p.slot, p.started));
        for p in others {
            let state = if p.role == Role::Candidate {
                "replacing"
            } else {
                "draining"
            };
            workers.push(row(p, state, None));
        }
        Status {
            name: self.name.clone(),
            pid: std::process::id(),
            listen: self.listen.clone(),
            generation: self.generation,
            reloading: self.rollout.is_some(),
            stopping: self.leaving(),
            workers,
        }
    }

    /// Add slots at the lowest free index, or remove the highest ones (at least one stays).
    fn scale_to(&mut self, n: usize) {
        if self.leaving() {
            return;
        }
        let n = n.clamp(1, super::MAX_WORKERS);
        while self.slots.len() < n {
            let index = (0..).find(|i| !self.slots.contains_key(i)).expect("free");
            self.slots.insert(
                index,
                Slot {
                    generation: self.generation,
                    ..Slot::default()
                },
            );
            self.start_current(index);
        }
        while self.slots.len() > n {
            let (index, slot) = self.slots.pop_last().expect("non-empty");
            tracing::info!("herd: removing worker {index}");
            if let Some(id) = slot.current {
                self.retire(id);
            }
            self.recycle_queue.remove(&index);
            let candidate = self
                .rollout
                .as_ref()
                .and_then(|r| r.candidate)
                .filter(|(s, _, _)| *s == index);
            if let Some((_, id, _)) = candidate {
                self.retire(id);
                if let Some(r) = self.rollout.as_mut() {
                    r.candidate = None;
                }
                self.advance_rollout();
            }
        }
        self.config.workers = self.slots.len();
    }

    fn reload(&mut self, waiter: Option<oneshot::Sender<Response>>) {
        if self.leaving() {
            if let Some(w) = waiter {
                let _ = w.send(Response::err("the master is stopping"));
            }
            return;
        }
        if self.rollout.is_some() {
            // One more reload after the current rollout (the program may have changed again).
            let pending = self.pending_reload.get_or_insert_with(Vec::new);
            pending.extend(waiter);
            return;
        }
        let generation = self
            .procs
            .values()
            .map(|p| p.generation)
            .max()
            .unwrap_or(0)
            .max(self.generation)
            + 1;
        self.generation = generation;
        tracing::info!("herd: rolling reload to generation {generation}");
        systemd::notify("RELOADING=1");
        self.rollout = Some(Rollout {
            what: "reload",
            queue: self.slots.keys().copied().collect(),
            candidate: None,
            generation: Some(generation),
            started: Instant::now(),
            waiters: waiter.into_iter().collect(),
        });
        self.advance_rollout();
    }

    fn start_recycle(&mut self) {
        if self.rollout.is_some() || self.leaving() || self.recycle_queue.is_empty() {
            return;
        }
        let queue = std::mem::take(&mut self.recycle_queue);
        self.rollout = Some(Rollout {
            what: "recycle",
            queue: queue.into_iter().collect(),
            candidate: None,
            generation: None,
            started: Instant::now(),
            waiters: Vec::new(),
        });
        self.advance_rollout();
    }

    /// Start the next candidate, or finish the rollout.
    fn advance_rollout(&mut self) {
        loop {
            let Some(rollout) = self.rollout.as_mut() else {
                return;
            };
            if rollout.candidate.is_some() {
                return;
            }
            let Some(slot) = rollout.queue.pop_front() else {
                break;
            };
            let Some(s) = self.slots.get(&slot) else {
                continue;
            };
            let generation = rollout.generation.unwrap_or(s.generation);
            match self.spawn(slot, generation, Role::Candidate) {
                Ok(id) => {
                    let deadline = later(self.config.ready_timeout);
                    if let Some(r) = self.rollout.as_mut() {
                        r.candidate = Some((slot, id, deadline));
                    }
                    return;
                }
                Err(e) => {
                    self.abort_rollout(&format!("cannot spawn new worker {slot}: {e}"));
                    return;
                }
            }
        }
        let rollout = self.rollout.take().expect("checked");
        let took = rollout.started.elapsed();
        let message = format!(
            "{} of {} workers done in {:.3}s",
            rollout.what,
            self.slots.len(),
            took.as_secs_f64()
        );
        tracing::info!("herd: {message}");
        systemd::notify("READY=1");
        for w in rollout.waiters {
            let _ = w.send(Response::ok(message.clone()));
        }
        self.after_rollout();
    }

    fn abort_rollout(&mut self, why: &str) {
        let Some(rollout) = self.rollout.take() else {
            return;
        };
        if let Some((_, id, _)) = rollout.candidate {
            self.retire(id);
        }
        let message = format!(
            "{} aborted: {why}; the remaining old workers keep serving",
            rollout.what
        );
        tracing::error!("herd: {message}");
        systemd::notify(&format!("READY=1\nSTATUS={message}"));
        for w in rollout.waiters {
            let _ = w.send(Response::err(message.clone()));
        }
        self.after_rollout();
    }

    fn after_rollout(&mut self) {
        if let Some(waiters) = self.pending_reload.take() {
            self.reload(None);
            if let Some(r) = self.rollout.as_mut() {
                r.waiters.extend(waiters);
            }
        } else {
            self.start_recycle();
        }
    }

    /// Stopping, or about to (the lame-duck period): no reload, recycle or scaling starts.
    fn leaving(&self) -> bool {
        self.stopping || self.lame_duck_until.is_some()
    }

    /// A stop request (signal or control socket): the lame-duck period first when one is
    /// configured, else (and for a request during that period) the graceful stop.
    fn begin_stop(&mut self) {
        if self.leaving() || self.config.lame_duck.is_zero() {
            self.stop();
            return;
        }
        tracing::info!(
            "herd: lame duck for {:?}: reporting draining while serving, then stopping",
            self.config.lame_duck
        );
        systemd::notify("STOPPING=1");
        self.cancel_rollouts();
        self.lame_duck_until = Some(later(self.config.lame_duck));
        let ids: Vec<u64> = self.procs.keys().copied().collect();
        for id in ids {
            self.tell_draining(id);
        }
    }

    /// Write `DRAINING` on a worker's channel. A worker that does not read it (a program that
    /// does not speak the protocol) keeps reporting healthy: the period still delays its stop.
    fn tell_draining(&mut self, id: u64) {
        let Some(p) = self.procs.get_mut(&id) else {
            return;
        };
        if let Some(mut channel) = p.channel.as_ref() {
            // A few bytes on a channel the worker drains as they come: a full buffer (or a
            // worker already gone) is the only way this fails, and it is logged.
            if let Err(e) = channel.write_all(super::worker::DRAINING_LINE.as_bytes()) {
                tracing::warn!(
                    "herd: cannot tell worker {} (pid {}) that the host drains: {e}",
                    p.slot,
                    p.pid
                );
            }
        }
    }

    /// End the running rollout (its new worker, not serving its slot yet, is retired) and answer
    /// its waiters and those of a pending reload: the master stops.
    fn cancel_rollouts(&mut self) {
        if let Some(rollout) = self.rollout.take() {
            if let Some((_, id, _)) = rollout.candidate {
                self.retire(id);
            }
            for w in rollout.waiters {
                let _ = w.send(Response::err("the master is stopping"));
            }
        }
        for w in self.pending_reload.take().into_iter().flatten() {
            let _ = w.send(Response::err("the master is stopping"));
        }
        self.recycle_queue.clear();
    }

    /// Graceful stop; a second call kills at once.
    fn stop(&mut self) {
        if self.stopping {
            tracing::warn!("herd: second stop request; killing the workers now");
            for p in self.procs.values_mut() {
                p.killed = true;
                signal_group(p.pid, Signal::SIGKILL);
            }
            return;
        }
        tracing::info!(
            "herd: stopping {} workers (drain timeout {:?})",
            self.procs.len(),
            self.config.drain_timeout
        );
        if self.lame_duck_until.take().is_none() {
            systemd::notify("STOPPING=1");
        }
        self.cancel_rollouts();
        self.stopping = true;
        let ids: Vec<u64> = self.procs.keys().copied().collect();
        for id in ids {
            self.retire(id);
        }
    }
}
