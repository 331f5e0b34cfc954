//! Binding the listening socket and spawning a worker process with fds 3 and 4 in place.

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Stdio;

use socket2::{Domain, Protocol, Socket, Type};

use super::master_channel::MASTER_FD;
use super::{Error, Result};

/// Backlog of the shared listening socket: connections wait here while workers are replaced.
const BACKLOG: i32 = 1024;

/// The first socket address `addr` resolves to; a failure is an [`Error::Bind`] naming `addr`.
pub(crate) fn resolve(addr: &str) -> Result<SocketAddr> {
    let bind_err = |source| Error::Bind {
        addr: addr.to_owned(),
        source,
    };
    addr.to_socket_addrs()
        .map_err(bind_err)?
        .next()
        .ok_or_else(|| bind_err(std::io::Error::other("the address resolves to nothing")))
}

/// Bind `addr` once, with `SO_REUSEADDR` and a large backlog.
pub(crate) fn bind(addr: &str) -> Result<TcpListener> {
    let bind_err = |source| Error::Bind {
        addr: addr.to_owned(),
        source,
    };
    let sockaddr = resolve(addr)?;
    let socket = Socket::new(
        Domain::for_address(sockaddr),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(bind_err)?;
    socket.set_reuse_address(true).map_err(bind_err)?;
    socket.bind(&sockaddr.into()).map_err(bind_err)?;
    socket.listen(BACKLOG).map_err(bind_err)?;
    Ok(socket.into())
}

/// A started worker: the child and the master's end of its channel.
pub(crate) struct Spawned {
    pub(crate) child: tokio::process::Child,
    pub(crate) channel: UnixStream,
}

/// Spawn `program args` as a worker: the listener becomes fd 3, the child end of a fresh
/// socket pair fd 4; own process group; `LISTEN_PID` set to the worker's pid through `/bin/sh`.
pub(crate) fn spawn_worker(
    program: &Path,
    args: &[OsString],
    listener: &OwnedFd,
    env: &[(&str, String)],
) -> std::io::Result<Spawned> {
    let (master_end, child_end) = UnixStream::pair()?; // both close-on-exec
                                                       // `LISTEN_PID` must equal the worker's pid, known only after fork; setting the environment
                                                       // between fork and exec is not async-signal-safe, so a shell sets it and execs the program
                                                       // (same pid). fds 3 and 4 survive the exec.
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@""#)
        .arg(program)
        .args(args)
        .env("LISTEN_FDS", "1")
        .env(super::ENV_MASTER_FD, MASTER_FD.to_string())
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for (key, value) in env {
        cmd.env(key, value);
    }
    let listener_fd = listener.as_raw_fd();
    let child_fd = child_end.as_raw_fd();
    let master_pid = nix::unistd::getpid().as_raw();
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (fcntl, dup2, prctl, getppid) on plain integers; it does not
    // allocate (the error is built from a raw errno).
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            use nix::libc;
            // Move both sources above 4 first so that placing one cannot clobber the other.
            let l = libc::fcntl(listener_fd, libc::F_DUPFD_CLOEXEC, 10);
            let c = libc::fcntl(child_fd, libc::F_DUPFD_CLOEXEC, 10);
            if l < 0 || c < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // dup2 clears close-on-exec on the target.
            if libc::dup2(l, 3) < 0 || libc::dup2(c, MASTER_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            #[cfg(any(target_os = "linux", target_os = "android"))]
            {
                // Told when the master dies. The master spawns from its only thread (a
                // current-thread runtime on the main thread), so the "parent thread exited" trap
                // of PDEATHSIG does not apply; workers also watch fd 4 for end-of-file.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            }
            if libc::getppid() != master_pid {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(child_end);
    Ok(Spawned {
        child,
        channel: master_end,
    })
}
