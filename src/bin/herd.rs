//! `herd`: run any `LISTEN_FDS` program as a pre-fork cluster, and control it.
//!
//! A thin layer over [`herd::launcher`]: argument parsing here, everything else in the library.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use herd::launcher::{self, Launcher, Request, UnitOptions};

/// Pre-fork supervisor for web apps: N workers share one socket.
#[derive(Parser, Debug)]
#[command(name = "herd", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Supervise PROGRAM: bind the socket, start N workers that get it as fd 3 (LISTEN_FDS=1).
    Run(RunArgs),
    /// Show the workers of a running master (like `pm2 list`).
    Status {
        #[command(flatten)]
        target: Target,
        /// Print the raw JSON answer.
        #[arg(long)]
        json: bool,
        /// Redraw the table every interval until Ctrl-C (like `pm2 monit`).
        #[arg(short, long)]
        watch: bool,
        /// Seconds between two redraws of `--watch` (at least 0.1).
        #[arg(long, default_value = "1", value_parser = parse_secs)]
        interval: Duration,
    },
    /// Rolling reload: replace every worker, one by one, without dropping a request.
    Reload {
        #[command(flatten)]
        target: Target,
    },
    /// Set the number of workers.
    Scale {
        /// The new number of workers (1 to 1024).
        #[arg(value_parser = parse_workers)]
        workers: usize,
        #[command(flatten)]
        target: Target,
    },
    /// Graceful stop (after the lame-duck period, if any): workers finish their in-flight
    /// requests, then the master exits.
    Stop {
        #[command(flatten)]
        target: Target,
    },
    /// Print a systemd service unit that runs `herd run` with these arguments.
    SystemdUnit {
        /// `User=` of the unit.
        #[arg(long)]
        user: Option<String>,
        /// `WorkingDirectory=` of the unit.
        #[arg(long)]
        working_directory: Option<String>,
        #[command(flatten)]
        run: RunArgs,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Number of workers, 1 to 1024 (default: the CPU count).
    #[arg(short, long, env = "HERD_WORKERS", value_parser = parse_workers)]
    workers: Option<usize>,
    /// Address to listen on.
    #[arg(short, long, env = "HERD_BIND", default_value = "127.0.0.1:3000")]
    bind: String,
    /// Name of this app (keys the control socket; default: the program's file name).
    #[arg(short, long)]
    name: Option<String>,
    /// Control socket path (default: $XDG_RUNTIME_DIR/herd/NAME.sock or /tmp/herd-UID/NAME.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Seconds a stopping worker may take to finish in-flight requests before SIGKILL.
    #[arg(long, default_value = "30", value_parser = parse_secs)]
    drain_timeout: Duration,
    /// Seconds a stopping host keeps serving while its workers report draining (lame duck),
    /// so that a load balancer's health checks move traffic away first (default: none, or
    /// HERD_LAME_DUCK_MS).
    #[arg(long, value_parser = parse_secs)]
    lame_duck: Option<Duration>,
    /// Seconds a new worker may take to report READY during a reload.
    #[arg(long, default_value = "30", value_parser = parse_secs)]
    ready_timeout: Duration,
    /// Count workers as ready after this many seconds even if they never report READY
    /// (for programs that do not speak the herd protocol).
    #[arg(long, value_parser = parse_secs)]
    ready_after: Option<Duration>,
    /// Quick crashes in a row after which a slot is marked errored.
    #[arg(long, default_value_t = 5)]
    max_restarts: u32,
    /// First restart backoff in seconds (doubles at each quick crash, up to 30 s).
    #[arg(long, default_value = "0.5", value_parser = parse_secs)]
    restart_backoff: Duration,
    /// Seconds a worker must have run for its crash to reset the slot's backoff.
    #[arg(long, default_value = "5", value_parser = parse_secs)]
    min_uptime: Duration,
    /// Recycle a worker whose resident memory exceeds this many MiB.
    #[arg(long)]
    max_memory_mb: Option<u64>,
    /// Recycle a worker after this many requests (counted by apps built with herd::launcher).
    #[arg(long)]
    max_requests: Option<u64>,
    /// Serve every worker's metrics (Prometheus text) on http://ADDR/metrics.
    #[arg(long, value_name = "ADDR", env = "HERD_METRICS_BIND")]
    metrics: Option<String>,
    /// Serve a live dashboard of the workers on http://ADDR/ (default address 127.0.0.1:9615).
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:9615")]
    dashboard: Option<String>,
    /// Enable the dashboard's reload/scale buttons for requests carrying this token.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "HERD_DASHBOARD_TOKEN",
        hide_env_values = true
    )]
    dashboard_token: Option<String>,
    /// Allow the dashboard and metrics on a non-loopback address without a token.
    #[arg(long)]
    dashboard_allow_remote: bool,
    /// The program and its arguments.
    #[arg(last = true, required = true, num_args = 1..)]
    program: Vec<OsString>,
}

#[derive(Args, Debug)]
struct Target {
    /// Name of the master (as given to `herd run --name`).
    #[arg(short, long)]
    name: Option<String>,
    /// Control socket path.
    #[arg(long)]
    socket: Option<PathBuf>,
}

/// A number of seconds (fractions allowed): finite, not negative.
fn parse_secs(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("`{text}` seconds is not a duration: give a finite number, 0 or more"))
}

/// Seconds as `herd run` reads them back (`30`, `0.5`).
fn fmt_secs(d: Duration) -> String {
    d.as_secs_f64().to_string()
}

/// A number of workers from 1 to [`launcher::MAX_WORKERS`].
fn parse_workers(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=launcher::MAX_WORKERS).contains(&n) => Ok(n),
        _ => Err(format!(
            "`{text}` is not a number of workers from 1 to {}",
            launcher::MAX_WORKERS
        )),
    }
}

impl RunArgs {
    fn launcher(&self) -> Launcher {
        let mut l = Launcher::new()
            .bind(self.bind.clone())
            .drain_timeout(self.drain_timeout)
            .ready_timeout(self.ready_timeout)
            .max_restarts(self.max_restarts)
            .restart_backoff(self.restart_backoff)
            .min_uptime(self.min_uptime);
        if let Some(n) = self.workers {
            l = l.workers(n);
        }
        if let Some(name) = &self.name {
            l = l.name(name.clone());
        }
        if let Some(socket) = &self.socket {
            l = l.control_socket(socket.clone());
        }
        if let Some(s) = self.ready_after {
            l = l.assume_ready_after(s);
        }
        if let Some(s) = self.lame_duck {
            l = l.lame_duck(s);
        }
        if let Some(mb) = self.max_memory_mb {
            l = l.max_memory(mb.saturating_mul(1024 * 1024));
        }
        if let Some(n) = self.max_requests {
            l = l.max_requests(n);
        }
        if let Some(addr) = &self.metrics {
            l = l.metrics(addr.clone());
        }
        if let Some(addr) = &self.dashboard {
            l = l.dashboard(addr.clone());
        }
        if let Some(token) = &self.dashboard_token {
            l = l.dashboard_token(token.clone());
        }
        l.dashboard_allow_remote(self.dashboard_allow_remote)
    }

    /// The `herd run` arguments that give these same options, for a unit's `ExecStart=`: every
    /// option (the destructuring below does not compile when one is added and forgotten) except
    /// the dashboard token, which does not belong in a unit file (`HERD_DASHBOARD_TOKEN` from an
    /// `EnvironmentFile=` does).
    fn to_args(&self, name: &str) -> Vec<String> {
        let RunArgs {
            workers,
            bind,
            name: _,
            socket,
            drain_timeout,
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
            dashboard_token: _,
            dashboard_allow_remote,
            program,
        } = self;
        let mut words: Vec<String> = vec!["run".into(), "--name".into(), name.to_owned()];
        let mut push = |flag: &str, value: String| words.extend([flag.to_owned(), value]);
        if let Some(n) = workers {
            push("--workers", n.to_string());
        }
        push("--bind", bind.clone());
        if let Some(socket) = socket {
            push("--socket", socket.to_string_lossy().into_owned());
        }
        push("--drain-timeout", fmt_secs(*drain_timeout));
        if let Some(s) = lame_duck {
            push("--lame-duck", fmt_secs(*s));
        }
        push("--ready-timeout", fmt_secs(*ready_timeout));
        if let Some(s) = ready_after {
            push("--ready-after", fmt_secs(*s));
        }
        push("--max-restarts", max_restarts.to_string());
        push("--restart-backoff", fmt_secs(*restart_backoff));
        push("--min-uptime", fmt_secs(*min_uptime));
        if let Some(mb) = max_memory_mb {
            push("--max-memory-mb", mb.to_string());
        }
        if let Some(n) = max_requests {
            push("--max-requests", n.to_string());
        }
        if let Some(addr) = metrics {
            push("--metrics", addr.clone());
        }
        if let Some(addr) = dashboard {
            push("--dashboard", addr.clone());
        }
        if *dashboard_allow_remote {
            words.push("--dashboard-allow-remote".into());
        }
        words.push("--".into());
        words.extend(program.iter().map(|w| w.to_string_lossy().into_owned()));
        words
    }
}

impl Target {
    fn socket(&self) -> Result<PathBuf, String> {
        if let Some(socket) = &self.socket {
            return Ok(socket.clone());
        }
        if let Some(name) = &self.name {
            return Ok(launcher::socket_path(name));
        }
        // No name: the only live master of this user, if there is exactly one (a socket left by
        // a killed master does not answer).
        let dir = launcher::socket_path("x")
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default();
        let sockets: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "sock"))
                    .filter(|p| std::os::unix::net::UnixStream::connect(p).is_ok())
                    .collect()
            })
            .unwrap_or_default();
        match sockets.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(format!("no running master found in {}", dir.display())),
            many => Err(format!(
                "several masters are running, pick one with --name: {}",
                many.iter()
                    .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

/// Quote one `ExecStart=` word the way systemd parses it.
fn systemd_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:=,+@[]".contains(c))
    {
        return word.to_owned();
    }
    let escaped = word
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('$', "$$")
        .replace('%', "%%");
    format!("\"{escaped}\"")
}

fn print_error(error: &dyn std::error::Error) {
    eprint!("herd: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        eprint!(": {cause}");
        source = cause.source();
    }
    eprintln!();
}

fn control(target: &Target, request: &Request, timeout: Duration) -> ExitCode {
    let socket = match target.socket() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("herd: {e}");
            return ExitCode::FAILURE;
        }
    };
    match launcher::request(&socket, request, timeout) {
        Ok(response) if response.ok => {
            if let Some(status) = response.status {
                print!("{status}");
            } else {
                println!("{}", response.message);
            }
            ExitCode::SUCCESS
        }
        Ok(response) => {
            eprintln!("herd: {}", response.message);
            ExitCode::FAILURE
        }
        Err(e) => {
            print_error(&e);
            ExitCode::FAILURE
        }
    }
}

/// `herd status --watch`: clear the terminal and redraw the table every `interval`, until Ctrl-C
/// (which ends the process: nothing to clean up).
fn watch_status(target: &Target, interval: Duration) -> ExitCode {
    // Ctrl-C must end the watch even when SIGINT was ignored by whoever started us (a
    // non-interactive shell ignores it for background jobs, and exec keeps that): back to the
    // default action.
    // SAFETY: installs the default disposition, no handler code runs; nothing else in this
    // process touches SIGINT.
    #[allow(unsafe_code)]
    unsafe {
        use nix::sys::signal::{signal, SigHandler, Signal};
        if let Err(e) = signal(Signal::SIGINT, SigHandler::SigDfl) {
            eprintln!("herd: cannot restore Ctrl-C: {e}");
        }
    }
    let socket = match target.socket() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("herd: {e}");
            return ExitCode::FAILURE;
        }
    };
    loop {
        let screen = match launcher::request(&socket, &Request::Status, Duration::from_secs(10)) {
            Ok(r) => match r.status {
                Some(status) => status.to_string(),
                None => format!("herd: {}\n", r.message),
            },
            Err(e) => format!("herd: {e} (retrying)\n"),
        };
        // Home, clear screen, then the table: one write, so it does not flicker.
        print!(
            "\x1b[H\x1b[2J{screen}\nevery {:.1}s, Ctrl-C to quit\n",
            interval.as_secs_f64()
        );
        let _ = std::io::Write::flush(&mut std::io::stdout());
        std::thread::sleep(interval);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("HERD_LOG")
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_target(false)
                .with_writer(std::io::stderr)
                .init();
            let mut program = args.program.clone();
            let path = PathBuf::from(program.remove(0));
            match args.launcher().supervise(path, program) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    print_error(&e);
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status {
            target,
            json,
            watch,
            interval,
        } => {
            if watch {
                return watch_status(&target, interval.max(Duration::from_millis(100)));
            }
            if json {
                let socket = match target.socket() {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("herd: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                match launcher::request(&socket, &Request::Status, Duration::from_secs(10)) {
                    Ok(r) => {
                        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        print_error(&e);
                        ExitCode::FAILURE
                    }
                }
            } else {
                control(&target, &Request::Status, Duration::from_secs(10))
            }
        }
        // A reload is answered when it finished: allow for slow readiness of every worker.
        Command::Reload { target } => control(&target, &Request::Reload, Duration::from_secs(3600)),
        Command::Scale { workers, target } => control(
            &target,
            &Request::Scale { workers },
            Duration::from_secs(10),
        ),
        Command::Stop { target } => control(&target, &Request::Stop, Duration::from_secs(10)),
        Command::SystemdUnit {
            user,
            working_directory,
            run,
        } => {
            let herd = std::env::current_exe()
                .map_or_else(|_| "herd".to_owned(), |p| p.to_string_lossy().into_owned());
            let name = run.name.clone().unwrap_or_else(|| {
                PathBuf::from(&run.program[0])
                    .file_name()
                    .map_or("app".into(), |n| n.to_string_lossy().into_owned())
            });
            if run.dashboard_token.is_some() {
                eprintln!(
                    "herd: the dashboard token is not written into the unit: give it to the \
                     service as HERD_DASHBOARD_TOKEN (e.g. from an EnvironmentFile=)"
                );
            }
            let mut words = vec![herd];
            words.extend(run.to_args(&name));
            let exec_start = words
                .iter()
                .map(|w| systemd_quote(w))
                .collect::<Vec<_>>()
                .join(" ");
            print!(
                "{}",
                launcher::systemd_unit(&UnitOptions {
                    name,
                    exec_start,
                    working_directory,
                    user,
                    // The unit's stop timeout covers the lame-duck period too.
                    drain_timeout: run.drain_timeout + run.lame_duck.unwrap_or_default(),
                })
            );
            ExitCode::SUCCESS
        }
    }
}
