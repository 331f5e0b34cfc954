//! systemd integration: `sd_notify` and the unit file that `herd systemd-unit` prints.

use std::fmt::Write as _;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

pub(crate) use sd_notify::NotifyState;

/// Tell systemd about a state change (`READY=1`, `RELOADING=1`, `STOPPING=1`, `STATUS=...`)
/// when `NOTIFY_SOCKET` is set; silently nothing otherwise. `RELOADING=1` goes with
/// `MONOTONIC_USEC`, which `Type=notify-reload` (systemd 253 and later) requires.
pub(crate) fn notify(states: &[NotifyState<'_>]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let mut states: Vec<NotifyState<'_>> = states.to_vec();
    if states.iter().any(|s| matches!(s, NotifyState::Reloading)) {
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
    }
    let result = match path.as_encoded_bytes().strip_prefix(b"@") {
        // sd-notify sends to socket paths only; systemd may also give an abstract socket.
        Some(name) => {
            let message: String = states.iter().map(|s| format!("{s}\n")).collect();
            abstract_send(name, &message)
        }
        None => sd_notify::notify(&states),
    };
    if let Err(e) = result {
        tracing::debug!("sd_notify {states:?}: {e}");
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_send(name: &[u8], message: &str) -> std::io::Result<()> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let socket = UnixDatagram::unbound()?;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(message.as_bytes(), &addr).map(|_| ())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_send(_: &[u8], _: &str) -> std::io::Result<()> {
    Err(std::io::Error::other("abstract sockets are Linux only"))
}

/// What goes into the unit printed by [`systemd_unit`].
#[derive(Debug, Clone)]
pub struct UnitOptions {
    /// Service name, used in `Description=`.
    pub name: String,
    /// The full `ExecStart=` command line (already quoted), e.g. `/usr/local/bin/herd run --name
    /// app -- /srv/app/bin/app`.
    pub exec_start: String,
    /// Working directory, if any.
    pub working_directory: Option<String>,
    /// User to run as, if any.
    pub user: Option<String>,
    /// The drain timeout of the master; the unit's stop timeout is set above it.
    pub drain_timeout: Duration,
    /// The address of a socket unit (`ListenStream=`) that systemd binds and hands to the
    /// master ([`systemd_socket_unit`]); the service then requires it. `None`: the master binds.
    pub listen_socket: Option<String>,
}

/// The text of a systemd service unit for a herd master.
///
/// `Type=notify` (the master reports `READY=1` once the first generation serves),
/// `ExecReload` sends `SIGHUP` (rolling reload), `KillMode=mixed` (systemd sends `SIGTERM` to the
/// master only, which drains its workers, and `SIGKILL` to the whole cgroup at the end) and a
/// `TimeoutStopSec` ten seconds above the drain timeout.
///
/// ```
/// use herd::launcher::{systemd_unit, UnitOptions};
/// let unit = systemd_unit(&UnitOptions {
///     name: "app".into(),
///     exec_start: "/usr/local/bin/herd run --name app -- /srv/app/app".into(),
///     working_directory: None,
///     user: None,
///     drain_timeout: std::time::Duration::from_secs(30),
///     listen_socket: None,
/// });
/// assert!(unit.contains("Type=notify"));
/// assert!(unit.contains("TimeoutStopSec=40"));
/// ```
pub fn systemd_unit(options: &UnitOptions) -> String {
    let mut unit = String::new();
    let stop = options.drain_timeout.as_secs().saturating_add(10);
    let _ = writeln!(unit, "[Unit]");
    let _ = writeln!(unit, "Description={} (herd pre-fork master)", options.name);
    let _ = writeln!(unit, "After=network-online.target");
    let _ = writeln!(unit, "Wants=network-online.target");
    if options.listen_socket.is_some() {
        let _ = writeln!(unit, "Requires={}.socket", options.name);
        let _ = writeln!(unit, "After={}.socket", options.name);
    }
    let _ = writeln!(unit);
    let _ = writeln!(unit, "[Service]");
    let _ = writeln!(unit, "Type=notify");
    let _ = writeln!(unit, "NotifyAccess=main");
    let _ = writeln!(unit, "ExecStart={}", options.exec_start);
    let _ = writeln!(unit, "ExecReload=/bin/kill -HUP $MAINPID");
    let _ = writeln!(unit, "KillMode=mixed");
    let _ = writeln!(unit, "KillSignal=SIGTERM");
    let _ = writeln!(unit, "TimeoutStopSec={stop}");
    let _ = writeln!(unit, "Restart=on-failure");
    let _ = writeln!(unit, "RestartSec=1");
    if let Some(dir) = &options.working_directory {
        let _ = writeln!(unit, "WorkingDirectory={dir}");
    }
    if let Some(user) = &options.user {
        let _ = writeln!(unit, "User={user}");
    }
    let _ = writeln!(unit);
    let _ = writeln!(unit, "[Install]");
    let _ = writeln!(unit, "WantedBy=multi-user.target");
    unit
}

/// The socket unit (`NAME.socket`) that goes with [`systemd_unit`] when
/// [`UnitOptions::listen_socket`] is set: systemd binds the address and passes it to the master
/// (`LISTEN_FDS`), which uses it instead of binding. The socket then outlives the master: during
/// a restart of the service (an upgrade of herd itself), connections wait in its backlog instead
/// of being refused. Empty when `listen_socket` is `None`.
///
/// ```
/// use herd::launcher::{systemd_socket_unit, UnitOptions};
/// let socket = systemd_socket_unit(&UnitOptions {
///     name: "app".into(),
///     exec_start: "/usr/local/bin/herd run --name app -- /srv/app/app".into(),
///     working_directory: None,
///     user: None,
///     drain_timeout: std::time::Duration::from_secs(30),
///     listen_socket: Some("0.0.0.0:8080".into()),
/// });
/// assert!(socket.contains("ListenStream=0.0.0.0:8080"));
/// ```
pub fn systemd_socket_unit(options: &UnitOptions) -> String {
    let Some(listen) = &options.listen_socket else {
        return String::new();
    };
    let mut unit = String::new();
    let _ = writeln!(unit, "[Unit]");
    let _ = writeln!(unit, "Description={} listening socket (herd)", options.name);
    let _ = writeln!(unit);
    let _ = writeln!(unit, "[Socket]");
    let _ = writeln!(unit, "ListenStream={listen}");
    // The backlog herd gives its own socket: connections wait here while workers are replaced.
    let _ = writeln!(unit, "Backlog=1024");
    let _ = writeln!(unit, "ReusePort=false");
    let _ = writeln!(unit);
    let _ = writeln!(unit, "[Install]");
    let _ = writeln!(unit, "WantedBy=sockets.target");
    unit
}
