//! Metrics and dashboard: binding their addresses and handing them samples of the workers.

use super::*;

/// Resident memory of `pid`, from `/proc/PID/status` (`VmRSS`).
pub(super) fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl Master {
    /// Bind the metrics and dashboard addresses (so that a bad one fails the start) and serve them.
    pub(super) fn start_observer(
        &mut self,
        control: &mpsc::UnboundedSender<ControlMsg>,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let c = &self.config;
        if c.metrics.is_none() && c.dashboard.is_none() {
            return Ok(Vec::new());
        }
        let remote = c.dashboard_allow_remote || c.dashboard_token.is_some();
        let observer = Observer::new(c.dashboard_token.clone(), control.clone());
        let mut tasks = Vec::new();
        if let Some(addr) = &c.metrics {
            let listener = dashboard::bind(addr, "metrics", c.dashboard_allow_remote)?;
            tracing::info!("herd: metrics on http://{addr}/metrics");
            tasks.push(tokio::spawn(dashboard::serve_metrics(
                listener,
                observer.clone(),
            )));
        }
        if let Some(addr) = &c.dashboard {
            let listener = dashboard::bind(addr, "dashboard", remote)?;
            tracing::info!(
                "herd: dashboard on http://{addr}/ ({})",
                if c.dashboard_token.is_some() {
                    "reload and scale enabled with the token"
                } else {
                    "read-only"
                }
            );
            tasks.push(tokio::spawn(dashboard::serve_dashboard(
                listener,
                observer.clone(),
            )));
        }
        self.observer = Some(observer);
        Ok(tasks)
    }

    /// Hand the current state to the dashboard / metrics server.
    pub(super) fn sample(&self) {
        let Some(observer) = &self.observer else {
            return;
        };
        let workers = self
            .procs
            .iter()
            .filter(|(_, p)| p.role == Role::Current)
            .map(|(id, p)| WorkerSnapshot {
                slot: p.slot,
                pid: p.pid,
                restarts: self.slots.get(&p.slot).map_or(0, |s| s.restarts),
                hangs: self.slots.get(&p.slot).map_or(0, |s| s.hangs),
                rss: rss(p.pid),
                cpu_secs: dashboard::cpu_seconds(p.pid),
                text: self.worker_metrics.get(id).cloned(),
            })
            .collect::<Vec<_>>();
        let mut workers = workers;
        workers.sort_by_key(|w| w.slot);
        observer.sample(self.status(), workers);
    }
}
