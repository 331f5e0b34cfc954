//! Rolling replacement of workers, one slot at a time: reloads (new generation), recycling (same
//! generation, after a limit) and scaling.

use super::*;

impl Master {
    /// Add slots at the lowest free index, or remove the highest ones (at least one stays).
    pub(super) fn scale_to(&mut self, n: usize) {
        if self.leaving() {
            return;
        }
        let n = n.clamp(1, crate::launcher::MAX_WORKERS);
        while self.slots.len() < n {
            let index = (0..).find(|i| !self.slots.contains_key(i)).expect("free");
            self.slots.insert(
                index,
                Slot {
                    generation: self.generation,
                    ..Slot::default()
                },
            );
            self.start_current(index);
        }
        while self.slots.len() > n {
            let (index, slot) = self.slots.pop_last().expect("non-empty");
            tracing::info!("herd: removing worker {index}");
            if let Some(id) = slot.current {
                self.retire(id);
            }
            self.recycle_queue.remove(&index);
            let candidate = self
                .rollout
                .as_ref()
                .and_then(|r| r.candidate)
                .filter(|(s, _, _)| *s == index);
            if let Some((_, id, _)) = candidate {
                self.retire(id);
                if let Some(r) = self.rollout.as_mut() {
                    r.candidate = None;
                }
                self.advance_rollout();
            }
        }
        self.config.workers = self.slots.len();
    }

    /// Start a rolling reload answered to `waiters` when it ends, or queue one after the
    /// running rollout.
    pub(super) fn reload(&mut self, waiters: Vec<oneshot::Sender<Response>>) {
        if self.leaving() {
            for w in waiters {
                let _ = w.send(Response::err("the master is stopping"));
            }
            return;
        }
        if self.rollout.is_some() {
            // One more reload after the current rollout (the program may have changed again).
            let pending = self.pending_reload.get_or_insert_with(Vec::new);
            pending.extend(waiters);
            return;
        }
        if let Err(message) = self.reread_file() {
            tracing::error!("herd: {message}");
            for w in waiters {
                let _ = w.send(Response::err(message.clone()));
            }
            return;
        }
        let generation = self
            .procs
            .values()
            .map(|p| p.generation)
            .max()
            .unwrap_or(0)
            .max(self.generation)
            + 1;
        self.generation = generation;
        tracing::info!("herd: rolling reload to generation {generation}");
        systemd::notify(&[NotifyState::Reloading]);
        self.rollout = Some(Rollout {
            what: "reload",
            queue: self.slots.keys().copied().collect(),
            candidate: None,
            generation: Some(generation),
            started: Instant::now(),
            waiters,
        });
        self.advance_rollout();
    }

    /// Read the configuration file again for the new workers' environment. A file that no
    /// longer parses aborts the reload (the message says why); changes of keys other than
    /// `[env]` are logged as needing a restart of the master.
    pub(super) fn reread_file(&mut self) -> std::result::Result<(), String> {
        let Some(started_with) = &self.config.file else {
            return Ok(());
        };
        let file = crate::launcher::RunFile::load(started_with.path()).map_err(|e| {
            format!("reload aborted: {e}; the workers keep serving with their environment")
        })?;
        let fixed = file.fixed_changes(started_with);
        if !fixed.is_empty() {
            tracing::warn!(
                "herd: {} changed {} since the master started: only [env] is read on a \
                 reload; the rest takes effect when the master restarts",
                file.path().display(),
                fixed.join(", ")
            );
        }
        if file.env() != &self.config.env {
            tracing::info!(
                "herd: new workers get the environment of {}",
                file.path().display()
            );
        }
        self.config.env = file.env().clone();
        Ok(())
    }

    pub(super) fn start_recycle(&mut self) {
        if self.rollout.is_some() || self.leaving() || self.recycle_queue.is_empty() {
            return;
        }
        let queue = std::mem::take(&mut self.recycle_queue);
        self.rollout = Some(Rollout {
            what: "recycle",
            queue: queue.into_iter().collect(),
            candidate: None,
            generation: None,
            started: Instant::now(),
            waiters: Vec::new(),
        });
        self.advance_rollout();
    }

    /// Start the next candidate, or finish the rollout.
    pub(super) fn advance_rollout(&mut self) {
        loop {
            let Some(rollout) = self.rollout.as_mut() else {
                return;
            };
            if rollout.candidate.is_some() {
                return;
            }
            let Some(slot) = rollout.queue.pop_front() else {
                break;
            };
            let Some(s) = self.slots.get(&slot) else {
                continue;
            };
            let generation = rollout.generation.unwrap_or(s.generation);
            match self.spawn(slot, generation, Role::Candidate) {
                Ok(id) => {
                    let deadline = later(self.config.ready_timeout);
                    if let Some(r) = self.rollout.as_mut() {
                        r.candidate = Some((slot, id, deadline));
                    }
                    return;
                }
                Err(e) => {
                    self.abort_rollout(&format!("cannot spawn new worker {slot}: {e}"));
                    return;
                }
            }
        }
        let rollout = self.rollout.take().expect("checked");
        let took = rollout.started.elapsed();
        let message = format!(
            "{} of {} workers done in {:.3}s",
            rollout.what,
            self.slots.len(),
            took.as_secs_f64()
        );
        tracing::info!("herd: {message}");
        systemd::notify(&[NotifyState::Ready]);
        for w in rollout.waiters {
            let _ = w.send(Response::ok(message.clone()));
        }
        self.after_rollout();
    }

    pub(super) fn abort_rollout(&mut self, why: &str) {
        let Some(rollout) = self.rollout.take() else {
            return;
        };
        if let Some((_, id, _)) = rollout.candidate {
            self.retire(id);
        }
        let message = format!(
            "{} aborted: {why}; the remaining old workers keep serving",
            rollout.what
        );
        tracing::error!("herd: {message}");
        systemd::notify(&[NotifyState::Ready, NotifyState::Status(&message)]);
        for w in rollout.waiters {
            let _ = w.send(Response::err(message.clone()));
        }
        self.after_rollout();
    }

    pub(super) fn after_rollout(&mut self) {
        if let Some(waiters) = self.pending_reload.take() {
            // The waiters go into the new rollout before it starts: one that aborts at once
            // (its first worker cannot be spawned) answers them with its own outcome.
            self.reload(waiters);
        } else {
            self.start_recycle();
        }
    }

    /// End the running rollout (its new worker, not serving its slot yet, is retired) and answer
    /// its waiters and those of a pending reload: the master stops.
    pub(super) fn cancel_rollouts(&mut self) {
        if let Some(rollout) = self.rollout.take() {
            if let Some((_, id, _)) = rollout.candidate {
                self.retire(id);
            }
            for w in rollout.waiters {
                let _ = w.send(Response::err("the master is stopping"));
            }
        }
        for w in self.pending_reload.take().into_iter().flatten() {
            let _ = w.send(Response::err("the master is stopping"));
        }
        self.recycle_queue.clear();
    }
}
