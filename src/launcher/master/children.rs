//! The master's children: spawning workers with their channel and output, readiness, crashes
//! and restarts, hung workers, exits, and signals to their process groups.

use super::*;

pub(super) fn describe(status: &std::io::Result<ExitStatus>) -> String {
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

pub(super) fn clean(status: &std::io::Result<ExitStatus>) -> bool {
    matches!(status, Ok(s) if s.success() || s.signal() == Some(Signal::SIGTERM as i32))
}

/// Resolves once `pid` (our child) has exited, without reaping it (`waitid` with `WNOWAIT`): the
/// zombie keeps its pid, so its process group id stays ours until the caller reaps it.
#[cfg(any(
    target_os = "android",
    all(target_os = "linux", not(target_env = "uclibc"))
))]
pub(super) async fn exited_unreaped(pid: u32) {
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
pub(super) async fn exited_unreaped(_pid: u32) {}

/// The process group led by worker `pid`: never 0 (`killpg(0, …)` would signal the master's
/// own group) nor 1, nor a number that does not fit a pid.
pub(super) fn group_of(pid: u32) -> Option<Pid> {
    i32::try_from(pid)
        .ok()
        .filter(|&pid| pid > 1)
        .map(Pid::from_raw)
}

pub(super) fn signal_group(pid: u32, sig: Signal) {
    if let Some(group) = group_of(pid) {
        let _ = killpg(group, sig);
    }
}

/// Read `READY` / `RECYCLE` lines from a worker's channel.
pub(super) async fn read_channel(
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
            "ALIVE" => Event::Alive(id),
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
    pub(super) fn spawn(
        &mut self,
        slot: usize,
        generation: u64,
        role: Role,
    ) -> std::io::Result<u64> {
        // The configured environment first: herd's own variables below take precedence.
        let mut env: Vec<(&str, String)> = self
            .config
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        env.extend([
            (crate::launcher::ENV_WORKER_INDEX, slot.to_string()),
            (crate::launcher::ENV_GENERATION, generation.to_string()),
            (crate::launcher::ENV_SECRET, self.secret.clone()),
            (
                crate::launcher::ENV_DRAIN_TIMEOUT_MS,
                u64::try_from(self.config.drain_timeout.as_millis())
                    .unwrap_or(u64::MAX)
                    .to_string(),
            ),
        ]);
        if let Some(n) = self.config.max_requests {
            env.push((crate::launcher::ENV_MAX_REQUESTS, n.to_string()));
        }
        if !self.config.hang_timeout.is_zero() {
            let ms = u64::try_from(self.config.hang_timeout.as_millis()).unwrap_or(u64::MAX);
            env.push((crate::launcher::ENV_HANG_TIMEOUT_MS, ms.to_string()));
        }
        if self.observer.is_some() {
            env.push((crate::launcher::ENV_METRICS, "1".to_owned()));
        }
        // Colour only on a terminal: tracing-subscriber and most colouring crates honour
        // NO_COLOR (no-color.org). An explicit NO_COLOR of ours is passed through unchanged.
        if std::env::var_os("NO_COLOR").is_none() && !self.output_is_terminal() {
            env.push(("NO_COLOR", "1".to_owned()));
        }
        let spawn::Spawned { mut child, channel } =
            spawn::spawn_worker(&self.program, &self.args, &self.listener, &env)?;
        // `None` only once the child was reaped, which nothing did yet; no pid, no worker.
        let Some(pid) = child.id() else {
            return Err(std::io::Error::other("the new worker has no pid"));
        };
        let id = self.next_id;
        self.next_id += 1;
        if let Some(out) = child.stdout.take() {
            tokio::spawn(self.logs.clone().forward(out, slot, false));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(self.logs.clone().forward(err, slot, true));
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
                last_beat: None,
                channel: writer,
            },
        );
        if self.lame_duck_until.is_some() {
            self.tell_draining(id);
        }
        Ok(id)
    }

    /// Whether the workers' output reaches a terminal (no log file, stdout and stderr are one).
    pub(super) fn output_is_terminal(&self) -> bool {
        use std::io::IsTerminal;
        !logs::to_file() && std::io::stdout().is_terminal() && std::io::stderr().is_terminal()
    }

    /// Start the serving worker of `slot`; a failure to spawn counts as a crash.
    pub(super) fn start_current(&mut self, slot: usize) {
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
    pub(super) fn crashed(&mut self, slot: usize, uptime: Duration, why: &str) {
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
            systemd::notify(&[NotifyState::Status(&format!(
                "worker {slot} errored: {why}"
            ))]);
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

    pub(super) fn retire(&mut self, id: u64) {
        if let Some(p) = self.procs.get_mut(&id) {
            p.role = Role::Retiring;
            if p.kill_at.is_none() {
                p.kill_at = Some(later(self.config.drain_timeout));
                signal_group(p.pid, Signal::SIGTERM);
            }
        }
    }

    pub(super) fn on_ready(&mut self, id: u64) {
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

    pub(super) fn check_all_ready(&mut self) {
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
            let status = format!("{} workers on {}", self.slots.len(), self.listen);
            systemd::notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
        }
    }

    pub(super) fn on_exit(&mut self, id: u64, status: &std::io::Result<ExitStatus>) {
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

    /// Kill and replace the serving workers whose heartbeats stopped for the hang timeout.
    pub(super) fn check_hung(&mut self, now: Instant) {
        let timeout = self.config.hang_timeout;
        if timeout.is_zero() {
            return;
        }
        let hung: Vec<u64> = self
            .procs
            .iter()
            .filter(|(_, p)| p.role == Role::Current && p.kill_at.is_none())
            .filter(|(_, p)| {
                p.last_beat
                    .is_some_and(|at| now.duration_since(at) >= timeout)
            })
            .map(|(&id, _)| id)
            .collect();
        for id in hung {
            let Some(p) = self.procs.get_mut(&id) else {
                continue;
            };
            let (slot, pid, uptime) = (p.slot, p.pid, p.started.elapsed());
            tracing::error!(
                "herd: worker {slot} (pid {pid}) hung: no heartbeat for {:?}; killing it \
                 (SIGTERM, SIGKILL after {HANG_KILL_GRACE:?}) and starting a replacement",
                timeout
            );
            // Retiring: its exit is the end of a replaced worker, not one more crash.
            p.role = Role::Retiring;
            p.kill_at = Some(later(HANG_KILL_GRACE.min(self.config.drain_timeout)));
            signal_group(pid, Signal::SIGTERM);
            let Some(s) = self.slots.get_mut(&slot) else {
                continue;
            };
            s.hangs += 1;
            if s.current == Some(id) {
                let why = format!("hung: no heartbeat for {:.1}s", timeout.as_secs_f64());
                self.crashed(slot, uptime, &why);
            }
        }
    }

    /// Write `DRAINING` on a worker's channel. A worker that does not read it (a program that
    /// does not speak the protocol) keeps reporting healthy: the period still delays its stop.
    pub(super) fn tell_draining(&mut self, id: u64) {
        let Some(p) = self.procs.get_mut(&id) else {
            return;
        };
        if let Some(mut channel) = p.channel.as_ref() {
            // A few bytes on a channel the worker drains as they come: a full buffer (or a
            // worker already gone) is the only way this fails, and it is logged.
            if let Err(e) =
                channel.write_all(crate::launcher::master_channel::DRAINING_LINE.as_bytes())
            {
                tracing::warn!(
                    "herd: cannot tell worker {} (pid {}) that the host drains: {e}",
                    p.slot,
                    p.pid
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_group_to_signal_without_a_real_pid() {
        // 0 would make killpg signal the caller's own group; 1 is init.
        assert_eq!(group_of(0), None);
        assert_eq!(group_of(1), None);
        assert_eq!(group_of(u32::MAX), None);
        assert_eq!(group_of(1234), Some(Pid::from_raw(1234)));
    }
}
