//! The launcher's configuration file: [`RunFile`].

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{Error, Launcher, Result, MAX_WORKERS};

/// Seconds, fractions allowed, finite and not negative.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Secs(Duration);

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map(Secs).map_err(|_| {
            serde::de::Error::custom(format!(
                "{secs} is not a duration in seconds: give a finite number, 0 or more"
            ))
        })
    }
}

/// A number of workers from 1 to [`MAX_WORKERS`].
#[derive(Debug, Clone, Copy, PartialEq)]
struct Workers(usize);

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        usize::try_from(n)
            .ok()
            .filter(|n| (1..=MAX_WORKERS).contains(n))
            .map(Workers)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "{n} is not a number of workers from 1 to {MAX_WORKERS}"
                ))
            })
    }
}

/// The options of a configuration file, as `herd run` names them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    program: Option<Vec<String>>,
    workers: Option<Workers>,
    bind: Option<String>,
    name: Option<String>,
    socket: Option<PathBuf>,
    drain_timeout: Option<Secs>,
    hang_timeout: Option<Secs>,
    lame_duck: Option<Secs>,
    ready_timeout: Option<Secs>,
    ready_after: Option<Secs>,
    max_restarts: Option<u32>,
    restart_backoff: Option<Secs>,
    min_uptime: Option<Secs>,
    max_memory_mb: Option<u64>,
    max_requests: Option<u64>,
    metrics: Option<String>,
    dashboard: Option<String>,
    dashboard_token: Option<String>,
    dashboard_allow_remote: Option<bool>,
    log_file: Option<PathBuf>,
    timestamps: Option<bool>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

/// A parsed configuration file (`herd run --config herd.toml`, [`Launcher::from_file`]).
///
/// Every option of `herd run`, the program, and the environment of the workers, in TOML. Unknown
/// keys and bad values are errors that name the key and the line. Durations are seconds
/// (fractions allowed). Every key is optional except `program` (which `herd run` may also take
/// after `--`):
///
/// ```toml
/// program = ["/srv/shop/bin/shop", "--serve"]
/// name = "shop"
/// workers = 4
/// bind = "0.0.0.0:8080"
/// drain_timeout = 30
/// hang_timeout = 30
/// lame_duck = 3
/// log_file = "/var/log/shop/herd.log"
/// timestamps = true
///
/// [env]
/// DATABASE_URL = "postgres://shop@db/shop"
/// RUST_LOG = "info"
/// ```
///
/// On a reload (`herd reload`, `SIGHUP`) the master reads the file again: the new workers get its
/// current `[env]` (PM2's `--update-env`), and a file that no longer parses aborts the reload
/// (the old workers keep serving). Every other key is read once, at the master's start: a change
/// of one is logged as needing a restart of the master (`herd scale` changes the number of
/// workers of a running master).
#[derive(Debug, Clone)]
pub struct RunFile {
    path: PathBuf,
    options: Options,
}

impl RunFile {
    /// Read and check `path`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the file cannot be read; [`Error::Config`] naming the file, the line
    /// and the key for a syntax error, an unknown key or a bad value.
    pub fn load(path: impl AsRef<Path>) -> Result<RunFile> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        let options: Options = toml::from_str(&text).map_err(|e| {
            Error::Config(format!("{}: {}", path.display(), e.to_string().trim_end()))
        })?;
        for key in options.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(Error::Config(format!(
                    "{}: [env] key {key:?} is not an environment variable name",
                    path.display()
                )));
            }
        }
        // Absolute, so that a reload finds it whatever the working directory.
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        Ok(RunFile { path, options })
    }

    /// The file's absolute path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The program and its arguments (`program = [...]`), if the file names one.
    pub fn program(&self) -> Option<Vec<OsString>> {
        self.options
            .program
            .as_ref()
            .map(|p| p.iter().map(OsString::from).collect())
    }

    /// The environment for the workers (`[env]`).
    pub fn env(&self) -> &BTreeMap<String, String> {
        &self.options.env
    }

    /// A launcher with the file's options over the defaults of [`Launcher::new`]; it reads the
    /// file's `[env]` again at each reload.
    pub fn launcher(&self) -> Launcher {
        let o = &self.options;
        let mut l = Launcher::new();
        if let Some(Workers(n)) = o.workers {
            l = l.workers(n);
        }
        if let Some(bind) = &o.bind {
            l = l.bind(bind.clone());
        }
        if let Some(name) = &o.name {
            l = l.name(name.clone());
        }
        if let Some(socket) = &o.socket {
            l = l.control_socket(socket.clone());
        }
        let secs = |s: Option<Secs>| s.map(|Secs(d)| d);
        if let Some(d) = secs(o.drain_timeout) {
            l = l.drain_timeout(d);
        }
        if let Some(d) = secs(o.hang_timeout) {
            l = l.hang_timeout(d);
        }
        if let Some(d) = secs(o.lame_duck) {
            l = l.lame_duck(d);
        }
        if let Some(d) = secs(o.ready_timeout) {
            l = l.ready_timeout(d);
        }
        if let Some(d) = secs(o.ready_after) {
            l = l.assume_ready_after(d);
        }
        if let Some(n) = o.max_restarts {
            l = l.max_restarts(n);
        }
        if let Some(d) = secs(o.restart_backoff) {
            l = l.restart_backoff(d);
        }
        if let Some(d) = secs(o.min_uptime) {
            l = l.min_uptime(d);
        }
        if let Some(mb) = o.max_memory_mb {
            l = l.max_memory(mb.saturating_mul(1024 * 1024));
        }
        if let Some(n) = o.max_requests {
            l = l.max_requests(n);
        }
        if let Some(addr) = &o.metrics {
            l = l.metrics(addr.clone());
        }
        if let Some(addr) = &o.dashboard {
            l = l.dashboard(addr.clone());
        }
        if let Some(token) = &o.dashboard_token {
            l = l.dashboard_token(token.clone());
        }
        if let Some(allow) = o.dashboard_allow_remote {
            l = l.dashboard_allow_remote(allow);
        }
        if let Some(path) = &o.log_file {
            l = l.log_file(path.clone());
        }
        if let Some(on) = o.timestamps {
            l = l.log_timestamps(on);
        }
        l.config.env = o.env.clone();
        l.config.file = Some(self.clone());
        l
    }

    /// The drain timeout plus the lame-duck period (for a systemd unit's stop timeout).
    pub fn stop_time(&self) -> Duration {
        let o = &self.options;
        o.drain_timeout.map_or(Duration::from_secs(30), |s| s.0)
            + o.lame_duck.map_or(Duration::ZERO, |s| s.0)
    }

    /// Whether the file names a log file (`log_file`).
    pub fn logs_to_file(&self) -> bool {
        self.options.log_file.is_some()
    }

    /// Whether log lines carry timestamps (`timestamps`).
    pub fn timestamps(&self) -> bool {
        self.options.timestamps.unwrap_or(false)
    }

    /// The address to listen on (`bind`), if the file gives one.
    pub fn bind(&self) -> Option<&str> {
        self.options.bind.as_deref()
    }

    /// The name of the master (`name`), if the file gives one.
    pub fn name(&self) -> Option<&str> {
        self.options.name.as_deref()
    }

    /// The keys other than `[env]` that differ from `other`'s: they take effect only when the
    /// master restarts.
    pub(crate) fn fixed_changes(&self, other: &RunFile) -> Vec<&'static str> {
        let (a, b) = (&self.options, &other.options);
        let mut changed = Vec::new();
        macro_rules! compare {
            ($($key:ident),*) => {$(
                if a.$key != b.$key {
                    changed.push(stringify!($key));
                }
            )*};
        }
        compare!(
            program,
            workers,
            bind,
            name,
            socket,
            drain_timeout,
            hang_timeout,
            lame_duck,
            ready_timeout,
            ready_after,
            max_restarts,
            restart_backoff,
            min_uptime,
            max_memory_mb,
            max_requests,
            metrics,
            dashboard,
            dashboard_token,
            dashboard_allow_remote,
            log_file,
            timestamps
        );
        changed
    }
}

impl Launcher {
    /// A launcher configured by a TOML file (see [`RunFile`] for the keys): what `herd run
    /// --config` does. On each reload the master reads the file again and gives the new workers
    /// its current `[env]`.
    ///
    /// ```no_run
    /// fn main() -> Result<(), herd::launcher::Error> {
    ///     herd::launcher::Launcher::from_file("herd.toml")?.run(|worker| async move {
    ///         worker.serve(axum::Router::new()).await
    ///     })
    /// }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`RunFile::load`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Launcher> {
        Ok(RunFile::load(path)?.launcher())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RunFile> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("herd.toml");
        std::fs::write(&path, text).unwrap();
        RunFile::load(&path)
    }

    #[test]
    fn every_option_and_the_environment() {
        let f = parse(
            r#"
program = ["/bin/app", "--serve"]
workers = 3
bind = "0.0.0.0:8080"
drain_timeout = 2.5
hang_timeout = 0
timestamps = true

[env]
A = "1"
"#,
        )
        .unwrap();
        let l = f.launcher();
        assert_eq!(l.config.workers, 3);
        assert_eq!(l.config.bind, "0.0.0.0:8080");
        assert_eq!(l.config.drain_timeout, Duration::from_millis(2500));
        assert_eq!(l.config.hang_timeout, Duration::ZERO);
        assert!(l.config.log_timestamps);
        assert_eq!(l.config.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(f.program().unwrap(), ["/bin/app", "--serve"]);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_the_line() {
        let e = parse("workers = 2\nwrokers = 3\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("wrokers"), "{e}");
        let e = parse("bind = \"x\"\n\nworkers = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("workers"), "{e}");
        let e = parse("drain_timeout = -1\n").unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("seconds"), "{e}");
        let e = parse("[env]\nA = 1\n").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        let e = parse("[env]\n\"A=B\" = \"1\"\n").unwrap_err().to_string();
        assert!(e.contains("A=B"), "{e}");
    }

    #[test]
    fn changes_outside_env_are_reported() {
        let a = parse("workers = 2\n[env]\nA = \"1\"\n").unwrap();
        let b = parse("workers = 3\n[env]\nA = \"2\"\n").unwrap();
        assert_eq!(a.fixed_changes(&b), ["workers"]);
        assert!(a.fixed_changes(&a).is_empty());
    }
}
