//! The control socket: `herd status`, `reload`, `scale`, `stop` through the event loop, and
//! `herd logs` answered here from the log book.

use super::*;

/// Bind the control socket, refusing to steal one that answers.
///
/// `private_dir`: the socket lives in herd's default directory (`/tmp/herd-UID` or
/// `$XDG_RUNTIME_DIR/herd`), which must be ours and closed to everyone else (see
/// [`crate::launcher::control::ensure_private_dir`]). An explicit path is the caller's choice.
pub(super) fn bind_control(
    path: &Path,
    name: &str,
    private_dir: bool,
) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        if private_dir {
            crate::launcher::control::ensure_private_dir(dir)?;
        } else {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::AlreadyRunning(name.to_owned()));
        }
        // Only a socket left by a master that died is ours to replace: any other file at that
        // path (a typo in `--socket`, a config file) stays.
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(Error::Config(format!(
                "the control socket path {} is taken by a file that is not a socket; remove it \
                 or choose another path",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(path);
    }
    tokio::net::UnixListener::bind(path)
        .map_err(|e| Error::io(format!("cannot bind control socket {}", path.display()), e))
}

pub(super) async fn serve_control(
    listener: tokio::net::UnixListener,
    tx: mpsc::UnboundedSender<ControlMsg>,
    logs: Arc<LogBook>,
) {
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
        let logs = logs.clone();
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
                    Ok(Request::Logs {
                        lines,
                        follow,
                        worker,
                    }) => {
                        send_logs(&mut write, &logs, lines, follow, worker).await;
                        return;
                    }
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

/// Answer `herd logs`: the latest lines, then (`follow`) each new one, until the client hangs up.
pub(super) async fn send_logs(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    logs: &LogBook,
    lines: usize,
    follow: bool,
    worker: Option<usize>,
) {
    // Subscribed before the backlog is read: no line falls in between.
    let mut feed = follow.then(|| logs.follow(worker));
    let mut response = Response::ok("");
    response.lines = logs.tail(lines, worker);
    loop {
        let Ok(mut out) = serde_json::to_string(&response) else {
            return;
        };
        out.push('\n');
        if write.write_all(out.as_bytes()).await.is_err() {
            return;
        }
        let Some(line) = (match feed.as_mut() {
            Some(feed) => feed.next().await,
            None => None,
        }) else {
            return;
        };
        response.lines = vec![line];
    }
}

impl Master {
    pub(super) fn on_control(&mut self, request: Request, reply: oneshot::Sender<Response>) {
        match request {
            Request::Status => {
                let status = self.status();
                let mut response = Response::ok("");
                response.status = Some(status);
                let _ = reply.send(response);
            }
            Request::Reload => self.reload(vec![reply]),
            Request::Scale { workers } => {
                if self.leaving() {
                    let _ = reply.send(Response::err("the master is stopping"));
                    return;
                }
                if !(1..=crate::launcher::MAX_WORKERS).contains(&workers) {
                    let _ = reply.send(Response::err(format!(
                        "cannot scale to {workers} workers: from 1 to {} are supported",
                        crate::launcher::MAX_WORKERS
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
            // Answered by the control server itself (`send_logs`).
            Request::Logs { .. } => {
                let _ = reply.send(Response::err("logs are answered by the control server"));
            }
        }
    }

    pub(super) fn status(&self) -> Status {
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
            hangs: s.map_or(0, |s| s.hangs),
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
                    hangs: s.hangs,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_a_socket_is_never_deleted_for_the_control_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        std::fs::write(&path, "keep me").unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = runtime
            .block_on(async { bind_control(&path, "x", false) })
            .unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
        // A socket left by a dead master is replaced.
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        runtime
            .block_on(async { bind_control(&stale, "x", false) })
            .expect("a stale socket is replaced");
    }
}
