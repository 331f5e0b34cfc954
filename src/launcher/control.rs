//! The control socket: one JSON line in, one JSON line out, over a unix stream socket.

use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Error, Result};

/// A request to the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// The state of every worker.
    Status,
    /// A rolling reload; answered when it finished or was aborted.
    Reload,
    /// Set the number of workers.
    Scale {
        /// The new number of workers (at least 1).
        workers: usize,
    },
    /// A graceful stop; answered when it started.
    Stop,
    /// The last `lines` lines of every worker (of `worker` only, when given), then with `follow`
    /// every new one, each in one more answer, until the client hangs up.
    Logs {
        /// Lines per worker.
        lines: usize,
        /// Keep sending new lines.
        #[serde(default)]
        follow: bool,
        /// Only this worker slot.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        worker: Option<usize>,
    },
}

/// The master's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// A human-readable outcome (or the error).
    #[serde(default)]
    pub message: String,
    /// For [`Request::Status`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// For [`Request::Logs`]: log lines, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<String>,
}

impl Response {
    pub(crate) fn ok(message: impl Into<String>) -> Self {
        Response {
            ok: true,
            message: message.into(),
            status: None,
            lines: Vec::new(),
        }
    }

    pub(crate) fn err(message: impl Into<String>) -> Self {
        Response {
            ok: false,
            message: message.into(),
            status: None,
            lines: Vec::new(),
        }
    }
}

/// State of a master and its workers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The master's name.
    pub name: String,
    /// The master's pid.
    pub pid: u32,
    /// The address it listens on.
    pub listen: String,
    /// The newest generation.
    pub generation: u64,
    /// Whether a rolling reload or recycle is in progress.
    pub reloading: bool,
    /// Whether the master is stopping.
    pub stopping: bool,
    /// One row per slot (and per old worker still draining).
    pub workers: Vec<WorkerStatus>,
}

/// One row of [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Slot index.
    pub index: usize,
    /// Pid of the worker, if one runs.
    pub pid: Option<u32>,
    /// Generation of the worker.
    pub generation: u64,
    /// Seconds since the worker started.
    pub uptime_secs: u64,
    /// Restarts of this slot after crashes (hung workers included).
    pub restarts: u32,
    /// Workers of this slot killed and replaced because they hung (see
    /// [`Launcher::hang_timeout`](super::Launcher::hang_timeout)).
    #[serde(default)]
    pub hangs: u32,
    /// Resident memory in bytes (from `/proc`).
    pub memory_bytes: Option<u64>,
    /// `online`, `starting`, `waiting` (backoff before a restart), `errored` (crash loop),
    /// `replacing` (new worker of a reload), `draining` (old worker stopping).
    pub state: String,
    /// How the last worker of this slot ended, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// CPU use over the last second, in percent of one core (when the master runs with
    /// `--metrics` or `--dashboard`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f64>,
    /// Requests per second over the last second (same condition, and the worker reports metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_sec: Option<f64>,
    /// The worker's Redis circuit breaker (same condition, feature `metrics`): `closed` or
    /// `open` (half-open counts as open), see [`client`](crate::client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<String>,
    /// Unix time (seconds) of the breaker's last opening or closing, if it ever changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_since: Option<f64>,
}

impl WorkerStatus {
    /// `closed`, `open 12s` (open for that long), or `-` (not reported).
    fn redis_column(&self) -> String {
        match (self.redis.as_deref(), self.redis_since) {
            (None, _) => "-".into(),
            (Some("open"), Some(since)) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(since, |d| d.as_secs_f64());
                format!("open {}", human_duration((now - since).max(0.0) as u64))
            }
            (Some(state), _) => state.to_owned(),
        }
    }
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn human_bytes(bytes: Option<u64>) -> String {
    match bytes {
        None => "-".into(),
        Some(b) if b < 1 << 20 => format!("{:.1}kb", b as f64 / 1024.0),
        Some(b) => format!("{:.1}mb", b as f64 / (1 << 20) as f64),
    }
}

/// A table like `pm2 list`.
impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} (master pid {}, {}, generation {}{}{})",
            self.name,
            self.pid,
            self.listen,
            self.generation,
            if self.reloading { ", reloading" } else { "" },
            if self.stopping { ", stopping" } else { "" },
        )?;
        writeln!(
            f,
            "{:<6} {:<8} {:<4} {:<7} {:<8} {:<5} {:<9} {:<6} {:<8} {:<9} state",
            "index", "pid", "gen", "uptime", "restarts", "hangs", "memory", "cpu", "req/s", "redis"
        )?;
        for w in &self.workers {
            writeln!(
                f,
                "{:<6} {:<8} {:<4} {:<7} {:<8} {:<5} {:<9} {:<6} {:<8} {:<9} {}",
                w.index,
                w.pid.map_or("-".into(), |p| p.to_string()),
                w.generation,
                if w.pid.is_some() {
                    human_duration(w.uptime_secs)
                } else {
                    "-".into()
                },
                w.restarts,
                w.hangs,
                human_bytes(w.memory_bytes),
                w.cpu_percent.map_or("-".into(), |c| format!("{c:.0}%")),
                w.requests_per_sec.map_or("-".into(), |r| format!("{r:.1}")),
                w.redis_column(),
                match &w.last_exit {
                    Some(exit) if w.state == "errored" || w.state == "waiting" =>
                        format!("{} ({exit})", w.state),
                    _ => w.state.clone(),
                }
            )?;
        }
        Ok(())
    }
}

/// The default control socket path of the master called `name`:
/// `$XDG_RUNTIME_DIR/herd/NAME.sock`, or `/tmp/herd-UID/NAME.sock`. The master creates that
/// directory with mode 0700 and refuses to start when it exists but is not a directory owned by
/// this user and closed to group and others.
pub fn socket_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("herd"),
        _ => PathBuf::from(format!("/tmp/herd-{}", nix::unistd::getuid())),
    };
    dir.join(format!("{name}.sock"))
}

/// Create `dir` (mode 0700) if it is missing, then make sure that it is private: a real directory
/// (not a symlink), owned by this user, with no access for group or others. The default socket
/// directory `/tmp/herd-UID` has a predictable name in a world-writable place: another local user
/// could create it first and then replace our socket to answer (or watch) `herd` commands.
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    let refuse = |reason: String| Error::UnsafeDir {
        dir: dir.to_owned(),
        reason,
    };
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| Error::io(format!("cannot inspect {}", dir.display()), e))?;
    if !meta.file_type().is_dir() {
        return Err(refuse(
            "it is not a directory (a symlink?); remove it, or pick a socket with --socket".into(),
        ));
    }
    let uid = nix::unistd::getuid().as_raw();
    if meta.uid() != uid {
        return Err(refuse(format!(
            "it belongs to uid {}, not to this user (uid {uid}); remove it, or pick a socket with \
             --socket",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(refuse(format!(
            "its mode is {mode:04o}: it must be accessible to its owner only (`chmod 700 {}`)",
            dir.display()
        )));
    }
    Ok(())
}

/// `herd logs`: ask the master at `socket` for the last `lines` lines of every worker (of
/// `worker` only, when given) and hand each to `out`; with `follow`, keep handing over new lines
/// until the master exits or `out` returns `false`.
///
/// # Errors
///
/// [`Error::Io`] when the socket cannot be reached, [`Error::Control`] on a malformed or
/// negative answer.
pub fn read_logs(
    socket: &Path,
    lines: usize,
    follow: bool,
    worker: Option<usize>,
    mut out: impl FnMut(&str) -> bool,
) -> Result<()> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        Error::io(
            format!("cannot reach the master at {}", socket.display()),
            e,
        )
    })?;
    let timeout = (!follow).then_some(Duration::from_secs(10));
    stream
        .set_read_timeout(timeout)
        .map_err(|e| Error::io("control socket", e))?;
    let request = Request::Logs {
        lines,
        follow,
        worker,
    };
    let mut line = serde_json::to_string(&request).map_err(|e| Error::Control(e.to_string()))?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| Error::io("write to the control socket", e))?;
    for answer in BufReader::new(stream).lines() {
        let answer = answer.map_err(|e| Error::io("read from the control socket", e))?;
        let response: Response = serde_json::from_str(&answer)
            .map_err(|e| Error::Control(format!("bad answer {answer:?}: {e}")))?;
        if !response.ok {
            return Err(Error::Control(response.message));
        }
        for line in &response.lines {
            if !out(line) {
                return Ok(());
            }
        }
        if !follow {
            return Ok(());
        }
    }
    Ok(())
}

/// Send one request to the master listening on `socket` and wait for its answer (a reload is
/// answered when it has finished, so `timeout` should exceed the reload's duration).
///
/// # Errors
///
/// [`Error::Io`] when the socket cannot be reached, [`Error::Control`] on a malformed answer.
pub fn request(socket: &Path, request: &Request, timeout: Duration) -> Result<Response> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        Error::io(
            format!("cannot reach the master at {}", socket.display()),
            e,
        )
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| Error::io("control socket", e))?;
    let mut line = serde_json::to_string(request).map_err(|e| Error::Control(e.to_string()))?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| Error::io("write to the control socket", e))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|e| Error::io("read from the control socket", e))?;
    if answer.is_empty() {
        return Err(Error::Control("the master closed the connection".into()));
    }
    serde_json::from_str(&answer).map_err(|e| Error::Control(format!("bad answer {answer:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_one_small_json_object() {
        let cases = [
            (Request::Status, r#"{"cmd":"status"}"#),
            (Request::Reload, r#"{"cmd":"reload"}"#),
            (
                Request::Scale { workers: 8 },
                r#"{"cmd":"scale","workers":8}"#,
            ),
            (Request::Stop, r#"{"cmd":"stop"}"#),
            (
                Request::Logs {
                    lines: 15,
                    follow: true,
                    worker: None,
                },
                r#"{"cmd":"logs","lines":15,"follow":true}"#,
            ),
        ];
        for (request, json) in cases {
            assert_eq!(serde_json::to_string(&request).unwrap(), json);
            assert_eq!(serde_json::from_str::<Request>(json).unwrap(), request);
        }
    }

    #[test]
    fn status_prints_a_table() {
        let status = Status {
            name: "shop".into(),
            pid: 10,
            listen: "127.0.0.1:3000".into(),
            generation: 2,
            reloading: false,
            stopping: false,
            workers: vec![WorkerStatus {
                index: 0,
                pid: None,
                generation: 2,
                uptime_secs: 0,
                restarts: 6,
                hangs: 0,
                memory_bytes: None,
                state: "errored".into(),
                last_exit: Some("exit code 1".into()),
                cpu_percent: None,
                requests_per_sec: None,
                redis: None,
                redis_since: None,
            }],
        };
        let table = status.to_string();
        assert!(table.starts_with("shop (master pid 10, 127.0.0.1:3000, generation 2)"));
        assert!(table.contains("errored (exit code 1)"), "{table}");
        let mut open = status.workers[0].clone();
        open.redis = Some("open".into());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        open.redis_since = Some(now - 75.0);
        assert_eq!(open.redis_column(), "open 1m");
        open.redis = Some("closed".into());
        assert_eq!(open.redis_column(), "closed");
    }
}
