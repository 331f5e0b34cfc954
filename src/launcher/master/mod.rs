//! The master: its state, its event loop (`Master::run`) and its stop.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | state, event loop, ticks, lame duck and stop |
//! | `children.rs` | spawning workers, their channel, crashes, readiness, hangs, exits |
//! | `rollout.rs` | rolling reload, recycling, scaling |
//! | `control_server.rs` | the control socket (`herd status/reload/scale/stop/logs`) |
//! | `sampling.rs` | metrics and dashboard sampling |
//!
//! Everything runs on one thread (a current-thread tokio runtime on the thread that called
//! `run`), so workers are always spawned from the same, long-lived thread, and the state needs no
//! locks: tasks only report events to the loop over a channel.

mod children;
mod control_server;
mod rollout;
mod sampling;

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
use super::logs::{self, LogBook};
use super::systemd::{self, NotifyState};
use super::{spawn, Config, Error, Result};

use children::signal_group;
use control_server::{bind_control, serve_control};
use sampling::rss;

/// Cap of the restart backoff.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Resolution of deadlines (backoff, ready timeout, drain timeout).
const TICK: Duration = Duration::from_millis(50);

/// How long a hung worker gets between `SIGTERM` and `SIGKILL`: its runtime is stuck, so it
/// rarely acts on the first, but a worker stuck in a blocking call of its own may still exit.
const HANG_KILL_GRACE: Duration = Duration::from_secs(1);

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
    /// A heartbeat: the worker's runtime runs.
    Alive(u64),
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
    /// The last heartbeat; `None` until the first, and a worker that never sends one is never
    /// judged hung.
    last_beat: Option<Instant>,
    /// The master's writing end of the worker's channel (`DRAINING`); shares the non-blocking
    /// mode that [`read_channel`] sets.
    channel: Option<std::os::unix::net::UnixStream>,
}

#[derive(Default)]
struct Slot {
    current: Option<u64>,
    generation: u64,
    restarts: u32,
    /// Workers of this slot killed because they hung (also counted in `restarts`).
    hangs: u32,
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
    /// The workers' output: forwarded, kept for `herd logs`.
    logs: Arc<LogBook>,
}

/// `now + d`, or a moment that never comes when `d` is absurdly large (no overflow panic).
fn later(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(now)
}

/// The shared cookie key: `HERD_SECRET` from the configured environment (a configuration
/// file's `[env]`) or ours, or 64 fresh random bytes.
///
/// A blank `HERD_SECRET` counts as unset (what `HERD_SECRET=` or compose's `${HERD_SECRET:-}`
/// give), exactly as `SessionLayer::from_env` reads it in the workers: passing a blank one
/// through would make each worker invent its own key, and a cookie would verify in one worker
/// only. A given key
/// is checked here, once, so that a malformed one is a clear startup error of the master instead
/// of every worker failing and being restarted in a loop.
fn shared_secret(configured: Option<&String>) -> Result<String> {
    if let Some(secret) = configured
        .cloned()
        .or_else(|| std::env::var(super::ENV_SECRET).ok())
        .filter(|s| !s.trim().is_empty())
    {
        crate::session::signing::key_from_base64(super::ENV_SECRET, &secret)
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
        if let Some(path) = &config.log_file {
            logs::open(path)?;
        }
        let secret = shared_secret(config.env.get(super::ENV_SECRET))?;
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
            logs: LogBook::new(config.log_timestamps),
            config,
        })
    }

    async fn run(mut self) -> Result<()> {
        let control = bind_control(&self.socket_path, &self.name, self.config.socket.is_none())?;
        let (control_tx, mut control_rx) = mpsc::unbounded_channel();
        let observer_tasks = self.start_observer(&control_tx)?;
        let control_task = tokio::spawn(serve_control(control, control_tx, self.logs.clone()));
        let sig = |kind| signal(kind).map_err(|e| Error::io("cannot install signal handler", e));
        let mut hup = sig(SignalKind::hangup())?;
        let mut term = sig(SignalKind::terminate())?;
        let mut int = sig(SignalKind::interrupt())?;
        let mut ttin = sig(SignalKind::from_raw(Signal::SIGTTIN as i32))?;
        let mut ttou = sig(SignalKind::from_raw(Signal::SIGTTOU as i32))?;
        let mut usr1 = sig(SignalKind::user_defined1())?;
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
                _ = hup.recv() => self.reload(Vec::new()),
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
                _ = usr1.recv() => {
                    logs::reopen();
                    tracing::info!("herd: SIGUSR1: log file reopened");
                }
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
            Event::Alive(id) => {
                if let Some(p) = self.procs.get_mut(&id) {
                    p.last_beat = Some(Instant::now());
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
        self.check_hung(now);
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
        systemd::notify(&[NotifyState::Stopping]);
        self.cancel_rollouts();
        self.lame_duck_until = Some(later(self.config.lame_duck));
        let ids: Vec<u64> = self.procs.keys().copied().collect();
        for id in ids {
            self.tell_draining(id);
        }
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
            systemd::notify(&[NotifyState::Stopping]);
        }
        self.cancel_rollouts();
        self.stopping = true;
        let ids: Vec<u64> = self.procs.keys().copied().collect();
        for id in ids {
            self.retire(id);
        }
    }
}
