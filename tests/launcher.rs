//! The launcher, end to end: real master and worker processes (the `launcher_hello` example and
//! the `herd` binary), real sockets, real signals. No Redis.
#![cfg(all(unix, feature = "cli"))]

mod launcher_support;
mod support;

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use herd::launcher::{request, Request};
use launcher_support::*;

const START: Duration = Duration::from_secs(30);

fn worker_pids(m: &Master) -> Vec<u32> {
    m.status()
        .map(|s| s.workers.iter().filter_map(|w| w.pid).collect())
        .unwrap_or_default()
}

fn assert_all_gone(pids: &[u32]) {
    wait_until("every worker to be gone", Duration::from_secs(5), || {
        pids.iter().all(|p| !alive(*p)).then_some(())
    });
}

#[test]
fn workers_all_serve_from_their_own_process_groups() {
    let _serial = serial();
    let mut m = Master::hello(3);
    let status = m.wait_online(3, START);
    let pids: HashSet<u32> = status.workers.iter().filter_map(|w| w.pid).collect();
    assert_eq!(pids.len(), 3);
    // Workers are spawned from the master's only thread (what makes PR_SET_PDEATHSIG reliable).
    assert_eq!(threads_of(m.pid()), Some(1));
    for &pid in &pids {
        assert_eq!(pgid_of(pid), Some(pid), "worker {pid} leads its own group");
        assert!(children_of(m.pid()).contains(&pid));
    }
    let indexes: HashSet<u64> = (0..3).collect();
    let mut seen_pids = HashSet::new();
    let mut seen_indexes = HashSet::new();
    for _ in 0..300 {
        let body = get(m.port(), "/").expect("GET /");
        seen_pids.insert(field(&body, "pid").unwrap() as u32);
        seen_indexes.insert(field(&body, "index").unwrap());
        assert_eq!(field(&body, "generation"), Some(1));
        if seen_pids.len() == 3 {
            break;
        }
    }
    assert!(
        seen_pids.len() >= 2,
        "fresh connections should reach several workers, saw {seen_pids:?}"
    );
    assert!(seen_pids.is_subset(&pids));
    assert!(seen_indexes.is_subset(&indexes));
    eprintln!(
        "distinct worker pids over fresh connections: {}",
        seen_pids.len()
    );
    kill(m.pid(), "TERM");
    assert!(m.wait_exit(START).success());
    assert_all_gone(&pids.into_iter().collect::<Vec<_>>());
}

#[test]
fn killed_worker_is_replaced_quickly_under_load() {
    let _serial = serial();
    let mut m = Master::hello(2);
    let status = m.wait_online(2, START);
    let victim = status.workers[0].pid.unwrap();
    let load = Load::start(m.port(), 4);
    std::thread::sleep(Duration::from_millis(300));

    let killed = Instant::now();
    kill(victim, "KILL");
    let replacement = wait_until("a replacement online", Duration::from_secs(10), || {
        let s = m.status()?;
        let w = s.workers.iter().find(|w| w.index == 0)?;
        (w.pid.is_some() && w.pid != Some(victim) && w.state == "online").then_some(w.pid?)
    });
    let online_after = killed.elapsed();
    // And it really answers requests.
    let served_after = wait_until("the replacement serves", Duration::from_secs(10), || {
        load.pids
            .lock()
            .unwrap()
            .contains(&u64::from(replacement))
            .then(|| killed.elapsed())
    });
    m.assert_running();
    std::thread::sleep(Duration::from_millis(300));
    let errors = load.errors.lock().unwrap().clone();
    let (ok, failed) = load.finish();
    eprintln!(
        "MEASURE restart: worker SIGKILLed -> replacement ready {online_after:?}, seen serving \
         after {served_after:?}; requests ok={ok} failed={failed} {errors:?}"
    );
    assert!(
        online_after < Duration::from_secs(1),
        "replacement took {online_after:?}"
    );
    // The issue's promise: "a new one serves within 1 s".
    assert!(
        served_after < Duration::from_secs(1),
        "the replacement served its first request {served_after:?} after the kill"
    );
    // Only requests in flight on the killed worker can fail: at most one per load thread.
    assert!(failed <= 4, "{failed} failed requests: {errors:?}");
    let s = m.status().expect("status");
    assert_eq!(s.workers[0].restarts, 1);
    m.remember(&s);
    kill(m.pid(), "TERM");
    assert!(m.wait_exit(START).success());
}

#[test]
fn sighup_reload_under_load_drops_nothing_and_replaces_every_worker() {
    let _serial = serial();
    let mut m = Master::hello(4);
    let before: HashSet<u32> = m.online_pids(4, START).into_iter().collect();
    let load = Load::start(m.port(), 4);
    std::thread::sleep(Duration::from_millis(300));

    let hup = Instant::now();
    kill(m.pid(), "HUP");
    let after = wait_until("generation 2 everywhere", Duration::from_secs(60), || {
        let s = m.status()?;
        m.remember(&s);
        let done = !s.reloading
            && s.workers.len() == 4
            && s.workers
                .iter()
                .all(|w| w.generation == 2 && w.state == "online");
        done.then_some(s)
    });
    let took = hup.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let errors = load.errors.lock().unwrap().clone();
    let (ok, failed) = load.finish();
    eprintln!("MEASURE reload: 4 workers replaced in {took:?} (SIGHUP to status all new); ok={ok}");
    assert_eq!(failed, 0, "failed requests during reload: {errors:?}");
    let new: HashSet<u32> = after.workers.iter().filter_map(|w| w.pid).collect();
    assert_eq!(new.len(), 4);
    assert!(new.is_disjoint(&before), "old {before:?} new {new:?}");
    assert_all_gone(&before.into_iter().collect::<Vec<_>>());
    let body = get(m.port(), "/").unwrap();
    assert_eq!(field(&body, "generation"), Some(2));
    kill(m.pid(), "TERM");
    assert!(m.wait_exit(START).success());
}

#[test]
fn reload_to_a_program_that_fails_readiness_is_aborted() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("broken");
    // A wrapper whose next version is broken once the flag file says so.
    let script = format!(
        r#"case "$(cat {flag} 2>/dev/null)" in
             hang) exec sleep 600 ;;
             exit) exit 3 ;;
             *) exec {hello} ;;
           esac"#,
        flag = flag.display(),
        hello = hello_bin().display()
    );
    let mut m = Master::herd_run(
        &[
            "--workers",
            "2",
            "--ready-timeout",
            "2",
            "--drain-timeout",
            "5",
        ],
        &["sh", "-c", &script],
    );
    let before: HashSet<u32> = m.online_pids(2, START).into_iter().collect();
    let load = Load::start(m.port(), 2);

    for mode in ["hang", "exit"] {
        std::fs::write(&flag, mode).unwrap();
        let started = Instant::now();
        let out = Command::new(herd_bin())
            .arg("reload")
            .arg("--socket")
            .arg(&m.socket)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!(
            "reload ({mode}) answered after {:?}: {stderr}",
            started.elapsed()
        );
        assert!(
            !out.status.success(),
            "reload to a broken program must fail"
        );
        assert!(stderr.contains("aborted"), "{stderr}");
        let s = m.status().unwrap();
        let now: HashSet<u32> = s
            .workers
            .iter()
            .filter(|w| w.state == "online")
            .filter_map(|w| w.pid)
            .collect();
        assert_eq!(now, before, "the old workers keep serving: {s:?}");
        assert!(s
            .workers
            .iter()
            .filter(|w| w.state == "online")
            .all(|w| w.generation == 1));
    }
    // The broken candidates are gone, the old generation still answers.
    std::thread::sleep(Duration::from_millis(300));
    let errors = load.errors.lock().unwrap().clone();
    let (ok, failed) = load.finish();
    assert!(ok > 0);
    assert_eq!(failed, 0, "{errors:?}");
    let s = m.wait_online(2, Duration::from_secs(10));
    assert_eq!(
        s.workers
            .iter()
            .filter_map(|w| w.pid)
            .collect::<HashSet<_>>(),
        before
    );
    // Fixed again: the next reload goes through.
    std::fs::remove_file(&flag).unwrap();
    let r = request(&m.socket, &Request::Reload, Duration::from_secs(60)).unwrap();
    assert!(r.ok, "{}", r.message);
    kill(m.pid(), "TERM");
    assert!(m.wait_exit(START).success());
}

#[test]
fn sigterm_lets_slow_requests_finish_then_exits_zero_leaving_nothing() {
    let _serial = serial();
    let mut m = Master::hello(2);
    let pids: Vec<u32> = m.online_pids(2, START);
    let port = m.port();
    let slow: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || get(port, "/slow?ms=2000")))
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let term = Instant::now();
    kill(m.pid(), "TERM");
    for t in slow {
        let body = t.join().unwrap().expect("in-flight request completes");
        assert!(body.starts_with("pid="));
    }
    let status = m.wait_exit(START);
    eprintln!("stopped {:?} after SIGTERM", term.elapsed());
    assert!(status.success(), "exit status {status}");
    assert_all_gone(&pids);
    assert!(children_of(m.pid()).is_empty());
}

#[test]
fn crash_loop_marks_the_slot_errored_with_backoff() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("starts");
    let script = format!("date +%s.%N >> {}; exit 1", log.display());
    let mut m = Master::herd_run(
        &[
            "--workers",
            "1",
            "--max-restarts",
            "3",
            "--restart-backoff",
            "0.2",
        ],
        &["sh", "-c", &script],
    );
    let s = wait_until("slot errored", Duration::from_secs(30), || {
        m.assert_running();
        let s = m.status()?;
        (s.workers[0].state == "errored").then_some(s)
    });
    assert_eq!(s.workers[0].restarts, 4);
    assert!(
        s.workers[0].last_exit.as_deref() == Some("exit code 1"),
        "{s:?}"
    );
    // No more starts once errored.
    std::thread::sleep(Duration::from_millis(1000));
    let starts: Vec<f64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(starts.len(), 4, "1 start + 3 restarts: {starts:?}");
    let gaps: Vec<f64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("gaps between crash-loop starts: {gaps:?}");
    // First restart immediate, then 0.2 s, then 0.4 s (lower bounds hold on a loaded machine).
    assert!(gaps[1] >= 0.18, "{gaps:?}");
    assert!(gaps[2] >= 0.38, "{gaps:?}");
    let table = Command::new(herd_bin())
        .args(["status", "--socket"])
        .arg(&m.socket)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("errored"), "{table}");
    assert!(m.output().contains("slot marked errored"), "{}", m.output());
    assert!(zombies_of(m.pid()).is_empty(), "every child is reaped");
    m.assert_running();
    kill(m.pid(), "TERM");
    assert!(m.wait_exit(START).success());
}

#[test]
fn herd_cli_status_scale_reload_stop_over_the_control_socket() {
    let _serial = serial();
    let hello = hello_bin();
    let mut m = Master::herd_run(
        &["--workers", "2", "--name", "clitest"],
        &[hello.to_str().unwrap()],
    );
    m.wait_online(2, START);
    let socket = m.socket.clone();
    let herd = |args: &[&str]| {
        let out = Command::new(herd_bin())
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "herd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let table = herd(&["status"]);
    eprintln!("{table}");
    assert!(table.contains("clitest"));
    assert!(table.lines().next().unwrap().contains("generation 1"));
    assert_eq!(table.matches("online").count(), 2, "{table}");
    for header in [
        "index", "pid", "gen", "uptime", "restarts", "memory", "state",
    ] {
        assert!(table.contains(header));
    }

    herd(&["scale", "3"]);
    m.wait_online(3, START);
    let reload = herd(&["reload"]);
    assert!(reload.contains("reload of 3 workers done"), "{reload}");
    let s = m.wait_online(3, START);
    assert!(s.workers.iter().all(|w| w.generation == 2));
    herd(&["scale", "1"]);
    m.wait_online(1, START);

    kill(m.pid(), "TTIN");
    let s = m.wait_online(2, START);
    assert_eq!(
        s.workers.iter().map(|w| w.index).collect::<Vec<_>>(),
        vec![0, 1],
        "the lowest free slot is reused"
    );
    kill(m.pid(), "TTOU");
    m.wait_online(1, START);

    let json = herd(&["status", "--json"]);
    assert!(json.contains("\"workers\""));
    let pids = worker_pids(&m);
    assert!(herd(&["stop"]).contains("stopping"));
    assert!(m.wait_exit(START).success());
    assert_all_gone(&pids);
}

#[test]
fn worker_env_contract_and_output_prefix() {
    let _serial = serial();
    let script = r#"echo "env index=$HERD_WORKER_INDEX gen=$HERD_GENERATION fds=$LISTEN_FDS pidok=$([ "$LISTEN_PID" = "$$" ] && echo yes) secret=$HERD_SECRET"; echo "to stderr from $HERD_WORKER_INDEX" >&2; exec sleep 600"#;
    use base64::Engine as _;
    let given = base64::engine::general_purpose::STANDARD.encode([42u8; 64]);
    // Unset, blank (what `HERD_SECRET=` or compose's `${HERD_SECRET:-}` give: must count as
    // unset, not be passed on blank), and a real key (passed through unchanged).
    for secret in [None, Some(""), Some(given.as_str())] {
        let args = [
            "--workers",
            "2",
            "--ready-after",
            "0.1",
            "--drain-timeout",
            "2",
        ];
        let env: Vec<(&str, &str)> = secret.map(|s| ("HERD_SECRET", s)).into_iter().collect();
        let mut m = Master::herd_run_env(&args, &["sh", "-c", script], &env);
        m.wait_online(2, START);
        let lines: Vec<String> = wait_until("two env lines", Duration::from_secs(10), || {
            let out = m.output();
            let lines: Vec<String> = out
                .lines()
                .filter(|l| l.contains("env index="))
                .map(String::from)
                .collect();
            (lines.len() >= 2).then_some(lines)
        });
        let mut secrets = HashSet::new();
        for slot in 0..2 {
            let line = lines
                .iter()
                .find(|l| l.starts_with(&format!("[worker {slot}] env index={slot} ")))
                .unwrap_or_else(|| panic!("no prefixed line for worker {slot}: {lines:?}"));
            assert!(line.contains("gen=1 fds=1 pidok=yes"), "{line}");
            secrets.insert(line.split("secret=").nth(1).unwrap().to_owned());
            // stderr lines are prefixed too, and stay on the master's stderr.
            let err_line = format!("[worker {slot}] to stderr from {slot}");
            wait_until("the prefixed stderr line", Duration::from_secs(10), || {
                m.stderr.lock().unwrap().contains(&err_line).then_some(())
            });
        }
        assert!(
            !m.stderr
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("env index=")),
            "stdout lines went to stderr"
        );
        assert_eq!(secrets.len(), 1, "one shared key: {secrets:?}");
        let key = secrets.into_iter().next().unwrap();
        match secret {
            Some(s) if !s.is_empty() => assert_eq!(key, s),
            _ => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(&key)
                    .unwrap();
                assert_eq!(bytes.len(), 64);
                assert_eq!(m.output().matches("HERD_SECRET is not set").count(), 1);
            }
        }
        kill(m.pid(), "TERM");
        assert!(m.wait_exit(START).success());
    }
}

#[test]
fn workers_exit_when_the_master_is_killed() {
    let _serial = serial();
    // An app built with the launcher (watches fd 4) and a program that knows nothing of herd
    // (relies on the parent-death signal).
    let library = Master::hello(2);
    let foreign = Master::herd_run(
        &["--workers", "2", "--ready-after", "0.1"],
        &["sh", "-c", "exec sleep 600"],
    );
    for mut m in [library, foreign] {
        let pids: Vec<u32> = m.online_pids(2, START);
        kill(m.pid(), "KILL");
        m.wait_exit(START);
        wait_until("orphans to exit", Duration::from_secs(10), || {
            pids.iter().all(|p| !alive(*p)).then_some(())
        });
    }
}

#[test]
fn master_reports_ready_reloading_stopping_to_systemd() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let hello = hello_bin();
    let mut m = Master::herd_run_env(
        &["--workers", "2"],
        &[hello.to_str().unwrap()],
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    let next = || recv_notification(&notify).expect("a notification");
    let ready = next();
    assert!(ready.starts_with("READY=1"), "{ready}");
    // READY comes once every worker of the first generation is up.
    let s = m.status().unwrap();
    assert!(s.workers.iter().all(|w| w.state == "online"), "{s:?}");
    m.wait_online(2, START);
    kill(m.pid(), "HUP");
    // With the time of the request, for Type=notify-reload (systemd >= 253).
    let reloading = next();
    let mut lines = reloading.lines();
    assert_eq!(lines.next(), Some("RELOADING=1"), "{reloading}");
    let usec: u64 = lines
        .next()
        .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    assert!(usec > 0);
    assert!(next().starts_with("READY=1"));
    kill(m.pid(), "TERM");
    assert_eq!(next().trim_end(), "STOPPING=1");
    assert!(m.wait_exit(START).success());
    // Workers did not get the master's NOTIFY_SOCKET: nothing else arrived.
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let extra = recv_notification(&notify);
    assert!(
        matches!(&extra, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "unexpected notification: {extra:?}"
    );
}

/// The next `sd_notify` datagram, waiting up to the socket's read timeout. A signal to this test
/// process (another test's child exiting) may interrupt the wait: it is resumed.
fn recv_notification(notify: &std::os::unix::net::UnixDatagram) -> std::io::Result<String> {
    let mut buf = [0u8; 512];
    loop {
        match notify.recv(&mut buf) {
            Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

#[test]
fn workers_are_recycled_by_memory_and_request_limits() {
    let _serial = serial();
    let hello = hello_bin();
    for limit in [["--max-memory-mb", "1"], ["--max-requests", "5"]] {
        let mut m = Master::herd_run(
            &["--workers", "1", limit[0], limit[1]],
            &[hello.to_str().unwrap()],
        );
        let first = m.wait_online(1, START).workers[0].pid.unwrap();
        let replaced = wait_until("a recycled worker", Duration::from_secs(20), || {
            if limit[0] == "--max-requests" {
                let _ = get(m.port(), "/");
            }
            let s = m.status()?;
            m.remember(&s);
            let w = &s.workers[0];
            (w.pid.is_some() && w.pid != Some(first) && w.state == "online").then_some(s)
        });
        // A replacement, not a crash: same generation, no restart counted.
        assert_eq!(replaced.workers[0].generation, 1);
        assert_eq!(replaced.workers[0].restarts, 0);
        // The master's log is read by another thread: give it a moment to arrive.
        wait_until(
            "the recycle line in the master's log",
            Duration::from_secs(5),
            || m.output().contains("recycle").then_some(()),
        );
        kill(m.pid(), "TERM");
        assert!(m.wait_exit(START).success());
    }
}

/// A systemd tool the tests need: a clear failure with the install hint when it is missing.
/// Whether `tool` (from the `systemd` package) is there; see `optional_tool`.
fn systemd_tool(tool: &str, what: &str) -> bool {
    optional_tool(
        tool,
        &["--version"],
        "Debian: `apt-get install systemd`",
        what,
    )
}

#[test]
fn systemd_unit_is_what_systemd_expects() {
    let out = Command::new(herd_bin())
        .args([
            "systemd-unit",
            "--name",
            "shop",
            "--workers",
            "4",
            "--drain-timeout",
            "20",
            "--ready-timeout",
            "12.5",
            "--ready-after",
            "0.25",
            "--max-restarts",
            "7",
            "--restart-backoff",
            "0.75",
            "--min-uptime",
            "9",
            "--max-memory-mb",
            "300",
            "--max-requests",
            "10000",
            "--socket",
            "/run/shop/control.sock",
            "--metrics",
            "127.0.0.1:9616",
            "--dashboard",
            "0.0.0.0:9615",
            "--dashboard-allow-remote",
            "--dashboard-token",
            "do-not-print-me",
        ])
        .args(["--", "/bin/sleep", "1"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let unit = String::from_utf8(out.stdout).unwrap();
    let exec_start = unit
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .expect("ExecStart=");
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillMode=mixed",
        "TimeoutStopSec=30",
    ] {
        assert!(unit.contains(line), "missing {line:?} in\n{unit}");
    }
    // Every option of `herd run` reaches the unit's command line.
    for words in [
        "run --name shop",
        "--workers 4",
        "--drain-timeout 20",
        "--ready-timeout 12.5",
        "--ready-after 0.25",
        "--max-restarts 7",
        "--restart-backoff 0.75",
        "--min-uptime 9",
        "--max-memory-mb 300",
        "--max-requests 10000",
        "--socket /run/shop/control.sock",
        "--metrics 127.0.0.1:9616",
        "--dashboard 0.0.0.0:9615",
        "--dashboard-allow-remote",
        "-- /bin/sleep 1",
    ] {
        assert!(
            exec_start.contains(words),
            "missing {words:?} in {exec_start}"
        );
    }
    // ... except the token, which never goes into a unit file; the user is told so.
    assert!(!unit.contains("do-not-print-me"), "{unit}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("HERD_DASHBOARD_TOKEN"), "{stderr}");
    if !systemd_tool(
        "systemd-analyze",
        "checking the unit with `systemd-analyze verify`",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shop.service");
    std::fs::write(&path, &unit).unwrap();
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&verify.stderr);
    eprintln!("systemd-analyze verify: {} {stderr}", verify.status);
    // Complaints about the host (no running systemd in a container) are not about the unit.
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("shop.service"))
        .collect();
    assert!(about_unit.is_empty(), "{stderr}");
}

#[test]
fn the_same_program_runs_under_systemd_socket_activation() {
    let _serial = serial();
    if !systemd_tool(
        "systemd-socket-activate",
        "running the example under systemd socket activation",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let port = free_port();
    let child = Command::new("systemd-socket-activate")
        .args(["-l", &format!("127.0.0.1:{port}")])
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
        .arg(hello_bin())
        .env_remove("HERD_SECRET")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    // The program starts at the first connection and serves it from the inherited socket.
    let body = wait_until("the socket-activated app", Duration::from_secs(20), || {
        get(port, "/").ok()
    });
    assert_eq!(
        field(&body, "pid"),
        Some(u64::from(child.0.id())),
        "one process, no master"
    );
    assert!(body.contains("index=- generation=0"), "{body}");
    let ready = recv_notification(&notify).expect("sd_notify datagram");
    assert_eq!(ready.trim_end(), "READY=1");
    kill(child.0.id(), "TERM");
    let status = wait_until("exit", Duration::from_secs(20), || {
        child.0.try_wait().ok().flatten()
    });
    assert!(status.success(), "{status}");

    // `herd run` socket-activated: the master keeps systemd's socket instead of binding. Two
    // more sockets (fds 4 and 5) are not used, and must not leak into the workers.
    let port = free_port();
    let extra: Vec<std::net::TcpListener> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let extra_addrs: Vec<String> = extra
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    drop(extra);
    let control = dir.path().join("c.sock");
    let child = Command::new("systemd-socket-activate")
        .args(["-l", &format!("127.0.0.1:{port}")])
        .args(["-l", &extra_addrs[0], "-l", &extra_addrs[1]])
        .arg(herd_bin())
        .args(["run", "--workers", "2", "--bind", "127.0.0.1:1", "--socket"])
        .arg(&control)
        .arg("--")
        .arg(hello_bin())
        .env_remove("HERD_SECRET")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let body = wait_until("the socket-activated herd", Duration::from_secs(20), || {
        get(port, "/").ok()
    });
    assert!(body.contains("generation=1"), "{body}");
    let s = request(&control, &Request::Status, Duration::from_secs(5))
        .unwrap()
        .status
        .unwrap();
    assert_eq!(s.listen, format!("127.0.0.1:{port}"));
    assert_eq!(s.pid, child.0.id());
    let link = |pid: u32, fd: u32| std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok();
    let unused = link(s.pid, 5).expect("the master holds fd 5 (LISTEN_FDS=3)");
    for pid in s.workers.iter().filter_map(|w| w.pid) {
        let fds: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .collect();
        assert!(
            !fds.contains(&unused),
            "worker {pid} inherited the unused socket {unused:?}: {fds:?}"
        );
    }
    kill(child.0.id(), "TERM");
    let status = wait_until("herd exit", Duration::from_secs(20), || {
        child.0.try_wait().ok().flatten()
    });
    assert!(status.success(), "{status}");
}

#[test]
fn sigint_is_a_graceful_stop_too() {
    let _serial = serial();
    let mut m = Master::hello(2);
    let pids: Vec<u32> = m.online_pids(2, START);
    let port = m.port();
    let slow: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || get(port, "/slow?ms=1500")))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    kill(m.pid(), "INT");
    for t in slow {
        let body = t.join().unwrap().expect("in-flight request completes");
        assert!(body.starts_with("pid="), "{body}");
    }
    let status = m.wait_exit(START);
    assert!(status.success(), "exit status {status}");
    assert_all_gone(&pids);
}

#[test]
fn a_worker_that_ignores_sigterm_is_killed_after_the_drain_timeout() {
    let _serial = serial();
    // `trap "" TERM` survives the exec: sleep ignores SIGTERM.
    let mut m = Master::herd_run(
        &[
            "--workers",
            "1",
            "--ready-after",
            "0.1",
            "--drain-timeout",
            "1",
        ],
        &["sh", "-c", r#"trap "" TERM; exec sleep 600"#],
    );
    let pid = m.wait_online(1, START).workers[0].pid.unwrap();
    let term = Instant::now();
    kill(m.pid(), "TERM");
    let status = m.wait_exit(START);
    let took = term.elapsed();
    eprintln!("master exited {took:?} after SIGTERM: {status}");
    assert!(
        !status.success(),
        "a worker had to be killed: the master must exit non-zero"
    );
    assert!(
        took >= Duration::from_millis(950),
        "killed before the drain timeout: {took:?}"
    );
    assert!(!alive(pid), "the stubborn worker is gone");
    // The master's last lines may still be on their way through the reader thread.
    let out = wait_until("the final log line", Duration::from_secs(5), || {
        let out = m.output();
        out.contains("did not stop cleanly").then_some(out)
    });
    assert!(
        out.contains("still running after the drain timeout; SIGKILL"),
        "{out}"
    );
    assert!(out.contains("did not stop cleanly"), "{out}");
}

#[test]
fn the_backoff_starts_over_after_a_worker_ran_min_uptime() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("starts");
    // Starts 1, 2: crash at once. Start 3: runs 1.5 s (over --min-uptime 1), then crashes.
    // Start 4: crashes at once. Start 5: stays up. With --max-restarts 2 this slot survives only
    // if the long run reset its count of quick crashes (else start 3's crash is the third in a
    // row and marks it errored).
    let script = format!(
        r#"n=$(wc -l < {log} 2>/dev/null || echo 0); date +%s.%N >> {log}
           case $n in
             0|1|3) exit 1 ;;
             2) sleep 1.5; exit 1 ;;
             *) exec sleep 600 ;;
           esac"#,
        log = log.display()
    );
    let mut m = Master::herd_run(
        &[
            "--workers",
            "1",
            "--ready-after",
            "0.1",
            "--max-restarts",
            "2",
            "--restart-backoff",
            "0.3",
            "--min-uptime",
            "1",
        ],
        &["sh", "-c", &script],
    );
    let s = wait_until("the fifth start online", Duration::from_secs(30), || {
        m.assert_running();
        let s = m.status()?;
        assert_ne!(s.workers[0].state, "errored", "{s:?}\n{}", m.output());
        let starts = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count();
        (starts == 5 && s.workers[0].state == "online").then_some(s)
    });
    assert_eq!(s.workers[0].restarts, 4, "{s:?}");
    let starts: Vec<f64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    let gaps: Vec<f64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("gaps between starts: {gaps:?}");
    // Start 2 -> 3 waited the first backoff step (0.3 s); start 3 ran 1.5 s; after start 4's
    // quick crash the backoff is 0.3 s again (the first step), not 0.6 s.
    assert!(gaps[1] >= 0.28, "{gaps:?}");
    assert!(gaps[2] >= 1.5, "{gaps:?}");
    assert!(gaps[3] >= 0.28, "{gaps:?}");
    let pids = worker_pids(&m);
    kill(m.pid(), "TERM");
    assert!(m.wait_exit(START).success());
    assert_all_gone(&pids);
}

#[test]
fn status_watch_redraws_until_ctrl_c() {
    let _serial = serial();
    let hello = hello_bin();
    let mut m = Master::herd_run(&["--workers", "1"], &[hello.to_str().unwrap()]);
    m.wait_online(1, START);
    let mut watch = std::process::Command::new(herd_bin())
        .args(["status", "--watch", "--interval", "0.2", "--socket"])
        .arg(&m.socket)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = watch.stdout.take().unwrap();
    let screen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let screen = screen.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                screen
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    wait_until("two redraws of the table", Duration::from_secs(20), || {
        let text = screen.lock().unwrap().clone();
        (text.matches("restarts").count() >= 2 && text.matches("online").count() >= 2).then_some(())
    });
    kill(watch.id(), "INT");
    let status = wait_until(
        "herd status --watch to exit",
        Duration::from_secs(5),
        || watch.try_wait().ok().flatten(),
    );
    reader.join().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert!(
        status.success() || status.signal() == Some(2),
        "status --watch ended with {status}"
    );
    let text = screen.lock().unwrap().clone();
    assert!(text.contains("\x1b[2J"), "the screen is redrawn");
    assert!(text.contains("every 0.2s, Ctrl-C to quit"), "{text}");
    kill(m.pid(), "TERM");
    assert!(m.wait_exit(START).success());
}

#[test]
fn a_malformed_herd_secret_stops_the_master_at_once() {
    let _serial = serial();
    for (secret, says) in [
        ("not base64!", "is not base64"),
        ("c2hvcnQ=", "needs at least 64"),
    ] {
        let mut m = Master::herd_run_env(
            &["--workers", "2", "--ready-after", "0.1"],
            &["sh", "-c", "echo started; exec sleep 600"],
            &[("HERD_SECRET", secret)],
        );
        let status = m.wait_exit(Duration::from_secs(20));
        assert!(!status.success(), "{secret:?}: {status}");
        // The master's last line may still be on its way through the reader thread.
        let out = wait_until("the error line", Duration::from_secs(5), || {
            let out = m.output();
            out.contains("HERD_SECRET").then_some(out)
        });
        assert!(out.contains(says), "{out}");
        assert!(!out.contains("started"), "no worker may start: {out}");
        // The secret itself is never printed.
        assert!(!out.contains(secret), "{out}");
    }
}

#[test]
fn the_default_control_directory_must_be_private() {
    let _serial = serial();
    use std::os::unix::fs::PermissionsExt;
    let run = |xdg: &std::path::Path| {
        Command::new(herd_bin())
            .args(["run", "--name", "private", "--bind", "127.0.0.1:0"])
            .args(["--workers", "1", "--", "sh", "-c", "exec sleep 600"])
            .env("XDG_RUNTIME_DIR", xdg)
            .env_remove("HERD_SECRET")
            .output()
            .unwrap()
    };
    // Open to everyone (another user could have made it, or replace our socket in it).
    let open = tempfile::tempdir().unwrap();
    let dir = open.path().join("herd");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = run(open.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("refusing to put the control socket in")
            && stderr.contains("0777")
            && stderr.contains("chmod 700"),
        "{stderr}"
    );
    assert!(!stderr.contains("worker 0 started"), "{stderr}");
    // A symlink to somewhere else.
    let linked = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), linked.path().join("herd")).unwrap();
    let out = run(linked.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("not a directory"), "{stderr}");
    // Owned by another user (only root can set that up; CI runs as root).
    if nix::unistd::getuid().is_root() {
        let theirs = tempfile::tempdir().unwrap();
        let dir = theirs.path().join("herd");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let out = run(theirs.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains("belongs to uid 65534"), "{stderr}");
    }
    // Missing: herd makes it private, and the master runs.
    let fresh = tempfile::tempdir().unwrap();
    let mut child = Command::new(herd_bin())
        .args(["run", "--name", "private", "--bind", "127.0.0.1:0"])
        .args(["--workers", "1", "--ready-after", "0.1", "--"])
        .args(["sh", "-c", "exec sleep 600"])
        .env("XDG_RUNTIME_DIR", fresh.path())
        .env_remove("HERD_SECRET")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let socket = fresh.path().join("herd").join("private.sock");
    let answered = wait_until("the master's control socket", START, || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the master exited: {status}");
        }
        request(&socket, &Request::Stop, Duration::from_secs(5)).ok()
    });
    assert!(answered.ok, "{answered:?}");
    let status = wait_until("the master to stop", START, || {
        child.try_wait().ok().flatten()
    });
    assert!(status.success(), "{status}");
    let mode = std::fs::metadata(fresh.path().join("herd"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[test]
fn numbers_out_of_range_are_clear_errors_not_panics() {
    for (args, says) in [
        (&["run", "--drain-timeout", "nan"][..], "is not a duration"),
        (&["run", "--drain-timeout", "inf"][..], "is not a duration"),
        (&["run", "--restart-backoff=-1"][..], "is not a duration"),
        (&["run", "--ready-timeout", "1e30"][..], "is not a duration"),
        (
            &["run", "--ready-after", "soon"][..],
            "is not a number of seconds",
        ),
        (
            &["run", "--workers", "0"][..],
            "number of workers from 1 to 1024",
        ),
        (
            &["run", "--workers", "100000"][..],
            "number of workers from 1 to 1024",
        ),
        (&["scale", "5000"][..], "number of workers from 1 to 1024"),
        (
            &["status", "--watch", "--interval", "NaN"][..],
            "is not a duration",
        ),
    ] {
        let mut cmd = Command::new(herd_bin());
        cmd.args(args);
        if args[0] == "run" {
            cmd.args(["--", "true"]);
        }
        let out = cmd.env_remove("HERD_WORKERS").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn scaling_past_the_limit_is_refused_over_the_control_socket() {
    let _serial = serial();
    let mut m = Master::herd_run(
        &["--workers", "1", "--ready-after", "0.1"],
        &["sh", "-c", "exec sleep 600"],
    );
    m.wait_online(1, START);
    let r = request(
        &m.socket,
        &Request::Scale { workers: 1_000_000 },
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(!r.ok, "{r:?}");
    assert!(r.message.contains("1024"), "{}", r.message);
    let r = request(
        &m.socket,
        &Request::Scale { workers: 0 },
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(!r.ok, "{r:?}");
    assert_eq!(m.status().unwrap().workers.len(), 1);
    let pids = worker_pids(&m);
    kill(m.pid(), "TERM");
    assert!(m.wait_exit(START).success());
    assert_all_gone(&pids);
}

/// Figures for the report: `cargo test --all-features --test launcher -- --ignored --nocapture`.
#[test]
#[ignore = "measurement, not a check"]
fn measure_restart_and_reload_times() {
    let _serial = serial();
    let mut m = Master::hello(4);
    m.wait_online(4, START);
    let load = Load::start(m.port(), 4);
    let mut restarts = Vec::new();
    let mut serving = Vec::new();
    // Each slot is killed at most every 5.2 s: more often would (rightly) meet the crash backoff,
    // which only resets after the 5 s minimum uptime.
    for round in 0..8 {
        let s = m.wait_online(4, START);
        let victim = s.workers[round % 4].pid.unwrap();
        let index = s.workers[round % 4].index;
        let killed = Instant::now();
        kill(victim, "KILL");
        // Probe on fresh connections until the new pid of that slot answers.
        let new_pid = wait_until("replacement", Duration::from_secs(10), || {
            let s = m.status()?;
            let w = s.workers.iter().find(|w| w.index == index)?;
            (w.pid != Some(victim) && w.state == "online").then_some(w.pid?)
        });
        restarts.push(killed.elapsed());
        wait_until("replacement serving", Duration::from_secs(10), || {
            let body = get(m.port(), "/").ok()?;
            (field(&body, "pid") == Some(u64::from(new_pid))).then_some(())
        });
        serving.push(killed.elapsed());
        std::thread::sleep(Duration::from_millis(1300));
    }
    let mut reloads = Vec::new();
    for _ in 0..5 {
        m.wait_online(4, START);
        let started = Instant::now();
        let r = request(&m.socket, &Request::Reload, Duration::from_secs(60)).unwrap();
        assert!(r.ok);
        reloads.push((started.elapsed(), r.message));
    }
    let (ok, failed) = load.finish();
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    eprintln!("MEASURE kill -> replacement READY: {restarts:?}");
    eprintln!("MEASURE kill -> replacement seen serving: {serving:?}");
    eprintln!(
        "MEASURE medians: ready {:?}, serving {:?}",
        median(&mut restarts),
        median(&mut serving)
    );
    eprintln!("MEASURE reload of 4 workers (request to answer): {reloads:?}");
    eprintln!("MEASURE background load: ok={ok} failed={failed}");
    kill(m.pid(), "TERM");
    assert!(m.wait_exit(START).success());
}

#[test]
fn a_hung_worker_is_killed_and_replaced_like_a_crash() {
    let _serial = serial();
    let mut m = Master::herd_run(
        &["--workers", "2", "--hang-timeout", "1"],
        &[hello_bin().to_str().unwrap()],
    );
    let status = m.wait_online(2, START);
    let victim = status.workers[0].pid.unwrap();
    let other = status.workers[1].pid.unwrap();
    // A stopped process runs nothing, its runtime included: the heartbeats stop as they do when
    // every thread of the runtime is blocked (the flagship's /stall does that; see
    // tests/flagship_stall.rs).
    let stopped = Instant::now();
    kill(victim, "STOP");
    let s = wait_until("the hung worker replaced", Duration::from_secs(15), || {
        let s = m.status()?;
        let w = s.workers.iter().find(|w| w.index == 0)?;
        (w.state == "online" && w.pid.is_some_and(|p| p != victim)).then_some(s)
    });
    let replaced = stopped.elapsed();
    wait_until("the hung worker gone", Duration::from_secs(5), || {
        (!alive(victim)).then_some(())
    });
    let gone = stopped.elapsed();
    eprintln!("MEASURE hang: worker stopped -> replacement online {replaced:?}, killed {gone:?}");
    let w0 = s.workers.iter().find(|w| w.index == 0).unwrap();
    assert_eq!((w0.hangs, w0.restarts), (1, 1), "{s:?}");
    assert!(
        w0.last_exit
            .as_deref()
            .is_some_and(|e| e.starts_with("hung")),
        "{s:?}"
    );
    let w1 = s.workers.iter().find(|w| w.index == 1).unwrap();
    assert_eq!(
        (w1.pid, w1.hangs),
        (Some(other), 0),
        "the other worker was not touched"
    );
    // The silence counts from the last heartbeat, up to one period (250 ms) before the stop;
    // the upper bound is generous for a shared machine.
    assert!(
        replaced >= Duration::from_millis(750),
        "judged too early: {replaced:?}"
    );
    assert!(replaced < Duration::from_secs(5), "{replaced:?}");
    assert!(get(m.port(), "/").is_ok());
    let table = Command::new(herd_bin())
        .args(["status", "--socket"])
        .arg(&m.socket)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains("hangs"));
    let out = m.output();
    assert!(
        out.contains(&format!("worker 0 (pid {victim}) hung")),
        "{out}"
    );
    kill(m.pid(), "TERM");
    assert!(m.wait_exit(START).success());
}

#[test]
fn a_program_without_heartbeats_is_never_judged_hung() {
    let _serial = serial();
    // No herd protocol at all: counted ready after 0.1 s, never a heartbeat.
    let mut m = Master::herd_run(
        &[
            "--workers",
            "1",
            "--ready-after",
            "0.1",
            "--hang-timeout",
            "0.2",
        ],
        &["sh", "-c", "exec sleep 600"],
    );
    let pid = m.wait_online(1, START).workers[0].pid.unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let s = m.status().unwrap();
    assert_eq!(s.workers[0].pid, Some(pid), "{s:?}");
    assert_eq!((s.workers[0].hangs, s.workers[0].restarts), (0, 0), "{s:?}");
    kill(m.pid(), "TERM");
    assert!(m.wait_exit(START).success());
}

#[test]
fn an_orphaned_worker_still_keeps_its_drain_deadline() {
    let _serial = serial();
    let mut m = Master::herd_run(
        &["--workers", "1", "--drain-timeout", "2"],
        &[hello_bin().to_str().unwrap()],
    );
    let port = m.wait_online(1, START).workers[0]
        .pid
        .map(|_| m.port())
        .unwrap();
    let worker = m.status().unwrap().workers[0].pid.unwrap();
    let slow =
        std::thread::spawn(move || get_timeout(port, "/slow?ms=30000", Duration::from_secs(40)));
    std::thread::sleep(Duration::from_millis(300));
    // The worker's SIGTERM first, then the master dies: the SIGTERM branch of the worker's
    // watcher wins, and the master's end-of-file comes during the drain.
    let started = Instant::now();
    kill(worker, "TERM");
    std::thread::sleep(Duration::from_millis(200));
    kill(m.pid(), "KILL");
    m.wait_exit(START);
    wait_until("the orphan to exit", Duration::from_secs(15), || {
        (!alive(worker)).then_some(())
    });
    let took = started.elapsed();
    eprintln!("orphan with a 30 s request exited {took:?} after its SIGTERM (drain timeout 2 s)");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(
        slow.join().unwrap().is_err(),
        "the 30 s request cannot have finished"
    );
}

/// A line of `herd logs` or of the log file starts with `2026-12-05T22:10:00.123Z `.
fn timestamped(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() > 25 && b[4] == b'-' && b[10] == b'T' && b[19] == b'.' && b[23] == b'Z' && b[24] == b' '
}

#[test]
fn logs_follow_across_a_reload_and_the_log_file_reopens_on_sigusr1() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("herd.log");
    let mut m = Master::herd_run(
        &[
            "--workers",
            "2",
            "--timestamps",
            "--log-file",
            file.to_str().unwrap(),
        ],
        &[hello_bin().to_str().unwrap()],
    );
    let first: HashSet<u32> = m.online_pids(2, START).into_iter().collect();
    let socket = m.socket.clone();
    let herd = |args: &[&str]| {
        let out = Command::new(herd_bin())
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    // The hello example prints `serving` on stdout when its worker starts.
    let tail = wait_until("both workers' first lines", Duration::from_secs(10), || {
        let tail = herd(&["logs", "--lines", "5"]);
        (tail.contains("[worker 0] serving") && tail.contains("[worker 1] serving")).then_some(tail)
    });
    assert!(tail.lines().all(timestamped), "{tail}");
    let only = herd(&["logs", "--worker", "1"]);
    assert!(only.lines().all(|l| l.contains("[worker 1]")), "{only}");

    // Follow across a reload: the new workers' lines arrive on the open connection.
    let mut follow = std::process::Command::new(herd_bin())
        .args(["logs", "--lines", "0", "--follow", "--socket"])
        .arg(&m.socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let followed = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let followed = followed.clone();
        let out = follow.stdout.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                followed.lock().unwrap().push(line);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(herd(&["reload"]).contains("reload of 2 workers done"));
    wait_until(
        "the new workers' lines followed",
        Duration::from_secs(10),
        || {
            let lines = followed.lock().unwrap();
            let serving = lines.iter().filter(|l| l.contains("] serving")).count();
            (serving >= 2).then_some(())
        },
    );
    let _ = follow.kill();
    let _ = follow.wait();
    let _ = reader.join();
    let second: HashSet<u32> = m.online_pids(2, START).into_iter().collect();
    assert!(first.is_disjoint(&second));

    // Everything went to the file, with timestamps and without colour; nothing to the terminal.
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("[worker 0] serving") && text.contains("rolling reload"),
        "{text}"
    );
    assert!(text.lines().all(timestamped), "{text}");
    assert!(!text.contains('\x1b'), "colour escapes in the log file");
    assert!(!m.output().contains("[worker"), "{}", m.output());

    // logrotate: move the file away, SIGUSR1, the master writes to a new file at the path.
    let rotated = dir.path().join("herd.log.1");
    std::fs::rename(&file, &rotated).unwrap();
    kill(m.pid(), "USR1");
    wait_until("the reopened log file", Duration::from_secs(5), || {
        std::fs::read_to_string(&file)
            .ok()
            .filter(|t| t.contains("log file reopened"))
    });
    herd(&["reload"]);
    let new = wait_until("new lines in the new file", Duration::from_secs(10), || {
        std::fs::read_to_string(&file)
            .ok()
            .filter(|t| t.matches("] serving").count() >= 2)
    });
    assert!(
        !new.contains("generation 2"),
        "old lines stay in the old file: {new}"
    );
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(!old.contains("log file reopened"), "{old}");
    kill(m.pid(), "TERM");
    assert!(m.wait_exit(START).success());
}

/// The environment of a running process, from `/proc/PID/environ`.
fn environ_of(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_config_file_runs_the_master_and_a_reload_reads_its_environment_again() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("herd.toml");
    let socket = dir.path().join("c.sock");
    let file = |greeting: &str, workers: usize| {
        format!(
            "program = [{hello:?}]\nworkers = {workers}\nbind = \"127.0.0.1:0\"\n\
             socket = {socket:?}\nhang_timeout = 5\n\n[env]\nGREETING = {greeting:?}\n",
            hello = hello_bin(),
            socket = socket,
        )
    };
    // Unknown keys and options next to --config are refused before anything starts.
    std::fs::write(&config, "workers = 2\nwrokers = 3\n").unwrap();
    let out = Command::new(herd_bin())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("line 2") && stderr.contains("wrokers"),
        "{stderr}"
    );
    std::fs::write(&config, file("one", 2)).unwrap();
    let out = Command::new(herd_bin())
        .args(["run", "--workers", "3", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--workers cannot be combined with --config"),
        "{stderr}"
    );

    let mut cmd = Command::new(herd_bin());
    cmd.args(["run", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .env_remove("HERD_SECRET");
    let child = cmd.spawn().unwrap();
    let mut child = KillOnDrop(child);
    let online = |n: usize| {
        wait_until("workers online", START, || {
            let s = request(&socket, &Request::Status, Duration::from_secs(5))
                .ok()?
                .status?;
            let pids: Vec<u32> = s
                .workers
                .iter()
                .filter(|w| w.state == "online")
                .filter_map(|w| w.pid)
                .collect();
            (pids.len() == n && s.workers.len() == n).then_some(pids)
        })
    };
    let first = online(2);
    for &pid in &first {
        assert!(environ_of(pid).contains(&"GREETING=one".to_owned()));
        assert!(environ_of(pid).contains(&"HERD_HANG_TIMEOUT_MS=5000".to_owned()));
    }
    // A new environment (and a worker count, which needs a restart of the master).
    std::fs::write(&config, file("two", 3)).unwrap();
    let r = request(&socket, &Request::Reload, Duration::from_secs(60)).unwrap();
    assert!(r.ok, "{}", r.message);
    let second = online(2);
    for &pid in &second {
        assert!(!first.contains(&pid));
        let env = environ_of(pid);
        assert!(env.contains(&"GREETING=two".to_owned()), "{env:?}");
    }
    // A broken file aborts the reload, naming the line; the workers keep serving.
    std::fs::write(&config, format!("{}\nbind = 3\n", file("three", 2))).unwrap();
    let r = request(&socket, &Request::Reload, Duration::from_secs(60)).unwrap();
    assert!(!r.ok);
    assert!(
        r.message.contains("line") && r.message.contains("bind"),
        "{}",
        r.message
    );
    assert_eq!(online(2), second);
    kill(child.0.id(), "TERM");
    let status = wait_until("herd exit", START, || child.0.try_wait().ok().flatten());
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        stderr.contains("changed workers since the master started"),
        "{stderr}"
    );
}

#[test]
fn systemd_unit_points_at_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("herd.toml");
    std::fs::write(
        &config,
        "program = [\"/srv/shop/shop\"]\nname = \"shop\"\ndrain_timeout = 20\nlame_duck = 3\n",
    )
    .unwrap();
    let out = Command::new(herd_bin())
        .args(["systemd-unit", "--user", "shop", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let unit = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        unit.contains(&format!("run --config {}\n", config.display())),
        "{unit}"
    );
    assert!(unit.contains("Description=shop "), "{unit}");
    assert!(
        unit.contains("TimeoutStopSec=33"),
        "20 s + 3 s + 10 s: {unit}"
    );
    assert!(unit.contains("User=shop"), "{unit}");
}

#[test]
fn systemd_socket_unit_pair_is_verified_and_serves_under_socket_activation() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let control = dir.path().join("c.sock");
    let out = Command::new(herd_bin())
        .args(["systemd-unit", "--socket-unit", "--dir"])
        .arg(dir.path())
        .args(["--name", "shop", "--workers", "2", "--bind"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--socket")
        .arg(&control)
        .arg("--")
        .arg(hello_bin())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let service = std::fs::read_to_string(dir.path().join("shop.service")).unwrap();
    let socket = std::fs::read_to_string(dir.path().join("shop.socket")).unwrap();
    assert!(
        service.contains("Requires=shop.socket\nAfter=shop.socket\n"),
        "{service}"
    );
    let listen = socket
        .lines()
        .find_map(|l| l.strip_prefix("ListenStream="))
        .expect("ListenStream=");
    assert_eq!(listen, format!("127.0.0.1:{port}"));
    if systemd_tool(
        "systemd-analyze",
        "checking the units with `systemd-analyze verify`",
    ) {
        let verify = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(dir.path().join("shop.socket"))
            .arg(dir.path().join("shop.service"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&verify.stderr);
        let about_units: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("shop.service") || l.contains("shop.socket"))
            .collect();
        assert!(about_units.is_empty(), "{stderr}");
    }
    if !systemd_tool(
        "systemd-socket-activate",
        "running the socket unit's service under socket activation",
    ) {
        return;
    }
    // What systemd does with the pair: bind ListenStream=, start ExecStart= with the socket.
    let exec_start: Vec<&str> = service
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart=")
        .split_whitespace()
        .collect();
    let child = Command::new("systemd-socket-activate")
        .args(["-l", listen])
        .args(&exec_start)
        .env_remove("HERD_SECRET")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let body = wait_until(
        "the socket-activated service",
        Duration::from_secs(20),
        || get(port, "/").ok(),
    );
    assert!(body.contains("generation=1"), "{body}");
    let s = request(&control, &Request::Status, Duration::from_secs(5))
        .unwrap()
        .status
        .unwrap();
    assert_eq!(
        s.pid,
        child.0.id(),
        "the master got the socket from systemd"
    );
    assert_eq!(s.listen, listen);
    kill(child.0.id(), "TERM");
    let status = wait_until("herd exit", Duration::from_secs(20), || {
        child.0.try_wait().ok().flatten()
    });
    assert!(status.success(), "{status}");
}

#[test]
fn a_queued_reload_that_cannot_start_answers_its_own_waiters() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("herd.toml");
    let socket = dir.path().join("c.sock");
    // Each new worker takes a second to start: a reload lasts long enough to queue another.
    let good = format!(
        "program = [\"sh\", \"-c\", \"sleep 1; exec {hello}\"]\nworkers = 1\n\
         bind = \"127.0.0.1:0\"\nsocket = {socket:?}\n",
        hello = hello_bin().display(),
    );
    std::fs::write(&config, &good).unwrap();
    let mut child = Command::new(herd_bin())
        .args(["run", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .env_remove("HERD_SECRET")
        .spawn()
        .unwrap();
    wait_until("online", START, || {
        let s = request(&socket, &Request::Status, Duration::from_secs(5))
            .ok()?
            .status?;
        (s.workers.len() == 1 && s.workers[0].state == "online").then_some(())
    });
    let reload = |socket: std::path::PathBuf| {
        std::thread::spawn(move || request(&socket, &Request::Reload, Duration::from_secs(60)))
    };
    let first = reload(socket.clone());
    std::thread::sleep(Duration::from_millis(300));
    let queued = reload(socket.clone());
    std::thread::sleep(Duration::from_millis(200));
    // The queued reload starts when the first one ends, and then the file no longer parses: it
    // aborts before spawning anything, and its waiter hears why.
    std::fs::write(&config, format!("{good}workers = \"two\"\n")).unwrap();
    let first = first.join().unwrap().unwrap();
    assert!(first.ok, "{}", first.message);
    let queued = queued.join().unwrap().unwrap();
    assert!(!queued.ok, "{queued:?}");
    assert!(
        queued.message.contains("reload aborted") && queued.message.contains("line"),
        "{queued:?}"
    );
    kill(child.id(), "TERM");
    let status = wait_until("herd exit", START, || child.try_wait().ok().flatten());
    assert!(status.success(), "{status}");
}
