//! `herd systemd-unit`: the service (and socket) unit of a `herd run` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::ArgMatches;
use herd::launcher::{self, RunFile, UnitOptions};

use super::{fmt_secs, sub_matches, RunArgs};

/// Print the unit(s) for `run`, or write them into `dir`.
pub(super) fn print_or_write(
    matches: &ArgMatches,
    user: Option<String>,
    working_directory: Option<String>,
    socket_unit: bool,
    dir: Option<&Path>,
    run: &RunArgs,
) -> ExitCode {
    let allowed = ["user", "working_directory", "socket_unit", "dir"];
    let file = match run.file(sub_matches(matches), &allowed) {
        Ok(file) => file,
        Err(e) => {
            eprintln!("herd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let herd = std::env::current_exe()
        .map_or_else(|_| "herd".to_owned(), |p| p.to_string_lossy().into_owned());
    let program = run.program(file.as_ref());
    let name = file
        .as_ref()
        .and_then(|f| f.name().map(str::to_owned))
        .or_else(|| run.name.clone())
        .unwrap_or_else(|| {
            PathBuf::from(&program[0])
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
    match &file {
        // Everything is in the file: `--name` would be refused next to `--config`.
        Some(f) => words.extend([
            "run".to_owned(),
            "--config".to_owned(),
            f.path().to_string_lossy().into_owned(),
        ]),
        None => words.extend(run.to_args(&name)),
    }
    let exec_start = words
        .iter()
        .map(|w| systemd_quote(w))
        .collect::<Vec<_>>()
        .join(" ");
    let bind = file
        .as_ref()
        .and_then(|f| f.bind().map(str::to_owned))
        .unwrap_or_else(|| run.bind.clone());
    let options = UnitOptions {
        name,
        exec_start,
        working_directory,
        user,
        // The unit's stop timeout covers the lame-duck period too.
        drain_timeout: file.as_ref().map_or_else(
            || run.drain_timeout + run.lame_duck.unwrap_or_default(),
            RunFile::stop_time,
        ),
        listen_socket: socket_unit.then_some(bind),
    };
    write_units(&options, dir)
}

impl RunArgs {
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
            dashboard_token: _,
            dashboard_allow_remote,
            log_file,
            timestamps,
            config,
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
        push("--hang-timeout", fmt_secs(*hang_timeout));
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
        if let Some(path) = log_file {
            push("--log-file", path.to_string_lossy().into_owned());
        }
        if let Some(path) = config {
            // Absolute: systemd starts the unit elsewhere.
            let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            push("--config", path.to_string_lossy().into_owned());
        }
        if *dashboard_allow_remote {
            words.push("--dashboard-allow-remote".into());
        }
        if *timestamps {
            words.push("--timestamps".into());
        }
        if !program.is_empty() {
            words.push("--".into());
            words.extend(program.iter().map(|w| w.to_string_lossy().into_owned()));
        }
        words
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

/// `herd systemd-unit`: print the unit(s), or write NAME.service (and NAME.socket) into `dir`.
fn write_units(options: &UnitOptions, dir: Option<&std::path::Path>) -> ExitCode {
    let mut units = vec![("service", launcher::systemd_unit(options))];
    if options.listen_socket.is_some() {
        units.push(("socket", launcher::systemd_socket_unit(options)));
    }
    let Some(dir) = dir else {
        for (i, (kind, text)) in units.iter().enumerate() {
            if units.len() > 1 {
                println!("{}# {}.{kind}", if i > 0 { "\n" } else { "" }, options.name);
            }
            print!("{text}");
        }
        return ExitCode::SUCCESS;
    };
    for (kind, text) in &units {
        let path = dir.join(format!("{}.{kind}", options.name));
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("herd: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
