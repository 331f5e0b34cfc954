//! What the master shows about its workers over HTTP (opt-in): `GET /metrics` (Prometheus text,
//! every worker's series labelled `worker="N"` plus the master's own), and a live dashboard
//! (`GET /`, `GET /api/status`, and with a token `POST /api/reload`, `POST /api/scale?workers=N`).
//!
//! The master loop calls [`Observer::sample`] once a second with its status and each worker's
//! latest series; the HTTP handlers only read that snapshot (a short lock), and send control
//! requests to the loop over the same channel as the control socket.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::control::{Request, Response as ControlResponse, Status};
use super::{Error, Result};

/// Samples kept for the charts: 5 minutes at one per second.
const HISTORY: usize = 300;
/// The page: one static file, inline JS, no external resource.
const PAGE: &str = include_str!("dashboard.html");
/// Header carrying the dashboard token.
const TOKEN_HEADER: &str = "x-herd-token";

pub(crate) type ControlMsg = (Request, oneshot::Sender<ControlResponse>);

/// One worker as the master sees it at a sample.
pub(crate) struct WorkerSnapshot {
    pub(crate) slot: usize,
    pub(crate) pid: u32,
    pub(crate) restarts: u32,
    pub(crate) hangs: u32,
    pub(crate) rss: Option<u64>,
    pub(crate) cpu_secs: Option<f64>,
    /// The worker's latest Prometheus text, if it sends one.
    pub(crate) text: Option<String>,
}

#[derive(Serialize, Clone)]
struct WorkerPoint {
    index: usize,
    pid: u32,
    rss: Option<u64>,
    /// Percent of one CPU over the last interval.
    cpu: Option<f64>,
    /// Requests per second over the last interval.
    rps: Option<f64>,
    /// The worker's Redis circuit breaker is open (`None`: not reported).
    redis_open: Option<bool>,
    /// Unix time of its last opening or closing.
    redis_since: Option<f64>,
}

#[derive(Serialize, Clone)]
struct Sample {
    /// Unix time, seconds.
    t: f64,
    workers: Vec<WorkerPoint>,
    /// Mean Redis round trip over the last interval, all workers.
    redis_ms: Option<f64>,
    redis_rps: f64,
    redis_errors: f64,
}

#[derive(Clone, Copy, Default)]
struct Prev {
    at: Option<Instant>,
    cpu: Option<f64>,
    requests: Option<f64>,
    redis_sum: f64,
    redis_count: f64,
    redis_errors: f64,
}

#[derive(Default)]
struct Snapshot {
    status: Option<Status>,
    workers: Vec<WorkerSnapshot>,
    history: VecDeque<Sample>,
    prev: HashMap<u32, Prev>,
}

/// Shared between the master loop (writer) and the HTTP handlers (readers).
pub(crate) struct Observer {
    snapshot: Mutex<Snapshot>,
    token: Option<String>,
    control: mpsc::UnboundedSender<ControlMsg>,
}

/// The value of the sample `name` in one worker's Prometheus text: unlabelled, or with the
/// worker's own global label only (`name{worker="N"} 3`).
fn value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let rest = match rest.strip_prefix('{') {
            Some(labels) => {
                let (labels, rest) = labels.split_once("} ")?;
                // One label, `worker`: not a series split by other labels.
                (labels.starts_with("worker=\"") && !labels.contains(',')).then_some(rest)?
            }
            None => rest.strip_prefix(' ')?,
        };
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Constant-time comparison of the offered token with ours (`subtle`; the length is not secret).
fn token_matches(offered: &[u8], ours: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    offered.ct_eq(ours).into()
}

impl Observer {
    pub(crate) fn new(
        token: Option<String>,
        control: mpsc::UnboundedSender<ControlMsg>,
    ) -> Arc<Self> {
        Arc::new(Observer {
            snapshot: Mutex::new(Snapshot::default()),
            token,
            control,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.snapshot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record the state of the herd now (called once a second by the master loop).
    pub(crate) fn sample(&self, status: Status, workers: Vec<WorkerSnapshot>) {
        let now = Instant::now();
        let mut snap = self.lock();
        let mut points = Vec::with_capacity(workers.len());
        let (mut redis_sum, mut redis_count, mut redis_errors, mut dt_total) = (0.0, 0.0, 0.0, 0.0);
        let mut prev_map = HashMap::with_capacity(workers.len());
        for w in &workers {
            let text = w.text.as_deref().unwrap_or("");
            let requests = value(text, crate::observe::names::REQUESTS);
            let sum = value(text, "herd_redis_command_seconds_sum").unwrap_or(0.0);
            let count = value(text, "herd_redis_command_seconds_count").unwrap_or(0.0);
            let errors = value(text, crate::observe::names::REDIS_ERRORS).unwrap_or(0.0);
            let prev = snap.prev.get(&w.pid).copied().unwrap_or_default();
            let dt = prev.at.map(|at| now.duration_since(at).as_secs_f64());
            let rate = |new: Option<f64>, old: Option<f64>| match (new, old, dt) {
                (Some(n), Some(o), Some(dt)) if dt > 0.0 => Some(((n - o) / dt).max(0.0)),
                _ => None,
            };
            let cpu = rate(w.cpu_secs, prev.cpu).map(|r| r * 100.0);
            if let Some(dt) = dt.filter(|&d| d > 0.0) {
                redis_sum += (sum - prev.redis_sum).max(0.0);
                redis_count += (count - prev.redis_count).max(0.0);
                redis_errors += (errors - prev.redis_errors).max(0.0) / dt;
                dt_total = f64::max(dt_total, dt);
            }
            // A worker that reports metrics but never opened its breaker has no breaker series.
            let redis_open = w
                .text
                .as_ref()
                .map(|_| value(text, crate::observe::names::BREAKER_OPEN).is_some_and(|v| v > 0.0));
            points.push(WorkerPoint {
                index: w.slot,
                pid: w.pid,
                rss: w.rss,
                cpu,
                rps: rate(requests, prev.requests),
                redis_open,
                redis_since: value(text, crate::observe::names::BREAKER_CHANGED)
                    .filter(|t| *t > 0.0),
            });
            prev_map.insert(
                w.pid,
                Prev {
                    at: Some(now),
                    cpu: w.cpu_secs,
                    requests,
                    redis_sum: sum,
                    redis_count: count,
                    redis_errors: errors,
                },
            );
        }
        snap.prev = prev_map;
        snap.history.push_back(Sample {
            t: unix_now(),
            workers: points,
            redis_ms: (redis_count > 0.0).then(|| redis_sum / redis_count * 1000.0),
            redis_rps: if dt_total > 0.0 {
                redis_count / dt_total
            } else {
                0.0
            },
            redis_errors,
        });
        while snap.history.len() > HISTORY {
            snap.history.pop_front();
        }
        snap.status = Some(status);
        snap.workers = workers;
    }

    /// CPU percent and requests per second of each worker pid at the latest sample.
    pub(crate) fn latest(&self) -> HashMap<u32, (Option<f64>, Option<f64>)> {
        let snap = self.lock();
        snap.history
            .back()
            .map(|s| s.workers.iter().map(|w| (w.pid, (w.cpu, w.rps))).collect())
            .unwrap_or_default()
    }

    /// Each worker pid's Redis breaker at the latest sample: `closed`/`open`, and since when.
    pub(crate) fn redis_breakers(&self) -> HashMap<u32, (String, Option<f64>)> {
        let snap = self.lock();
        let Some(sample) = snap.history.back() else {
            return HashMap::new();
        };
        let state = |open: bool| if open { "open" } else { "closed" }.to_owned();
        (sample.workers.iter())
            .filter_map(|w| Some((w.pid, (state(w.redis_open?), w.redis_since))))
            .collect()
    }

    /// Every worker's series with a `worker` label, then the master's own, in the text format.
    pub(crate) fn render_metrics(&self) -> String {
        let snap = self.lock();
        // Families must stay contiguous: group the samples of all workers by family.
        let mut families: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
        for w in &snap.workers {
            let Some(text) = &w.text else { continue };
            let mut family = String::new();
            for line in text.lines() {
                if let Some(meta) = line
                    .strip_prefix("# HELP ")
                    .or_else(|| line.strip_prefix("# TYPE "))
                {
                    family = meta.split_whitespace().next().unwrap_or("").to_owned();
                    let entry = families.entry(family.clone()).or_default();
                    if !entry.0.iter().any(|l| l == line) {
                        entry.0.push(line.to_owned());
                    }
                } else if !line.is_empty() && !line.starts_with('#') {
                    if family.is_empty() {
                        family = line.split(['{', ' ']).next().unwrap_or_default().to_owned();
                    }
                    families
                        .entry(family.clone())
                        .or_default()
                        .1
                        .push(line.to_owned());
                }
            }
        }
        let mut out = String::new();
        for (header, samples) in families.values() {
            for line in header.iter().chain(samples) {
                out.push_str(line);
                out.push('\n');
            }
        }
        let status = snap.status.as_ref();
        let mut master = |name: &str, kind: &str, help: &str, rows: Vec<(usize, String)>| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (slot, v) in rows {
                out.push_str(&format!("{name}{{worker=\"{slot}\"}} {v}\n"));
            }
        };
        let rows = |f: &dyn Fn(&WorkerSnapshot) -> Option<String>| {
            snap.workers
                .iter()
                .filter_map(|w| f(w).map(|v| (w.slot, v)))
                .collect::<Vec<_>>()
        };
        master(
            "herd_worker_up",
            "gauge",
            "1 for each running worker of a slot.",
            rows(&|_| Some("1".into())),
        );
        master(
            "herd_worker_restarts_total",
            "counter",
            "Restarts of the slot after crashes.",
            rows(&|w| Some(w.restarts.to_string())),
        );
        master(
            "herd_worker_hangs_total",
            "counter",
            "Workers of the slot killed and replaced because their heartbeat stopped.",
            rows(&|w| Some(w.hangs.to_string())),
        );
        master(
            "herd_worker_resident_memory_bytes",
            "gauge",
            "Resident memory of the worker (from /proc).",
            rows(&|w| w.rss.map(|v| v.to_string())),
        );
        master(
            "herd_worker_cpu_seconds_total",
            "counter",
            "User and system CPU time of the worker (from /proc).",
            rows(&|w| w.cpu_secs.map(|v| format!("{v:.2}"))),
        );
        let slots = status.map_or(0, |s| {
            s.workers
                .iter()
                .map(|w| w.index)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
        });
        out.push_str(&format!(
            "# HELP herd_workers Worker slots.\n# TYPE herd_workers gauge\nherd_workers {slots}\n"
        ));
        out
    }

    fn status_json(&self) -> String {
        let snap = self.lock();
        #[derive(Serialize)]
        struct Api<'a> {
            status: Option<&'a Status>,
            history: &'a VecDeque<Sample>,
            controls: bool,
        }
        serde_json::to_string(&Api {
            status: snap.status.as_ref(),
            history: &snap.history,
            controls: self.token.is_some(),
        })
        .unwrap_or_else(|_| "{}".into())
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        match (&self.token, headers.get(TOKEN_HEADER)) {
            (Some(ours), Some(offered)) => token_matches(offered.as_bytes(), ours.as_bytes()),
            _ => false,
        }
    }

    async fn control(&self, request: Request) -> Response {
        let (reply, answer) = oneshot::channel();
        if self.control.send((request, reply)).is_err() {
            return json(StatusCode::SERVICE_UNAVAILABLE, r#"{"ok":false}"#.into());
        }
        let response = answer
            .await
            .unwrap_or_else(|_| ControlResponse::err("the master is exiting"));
        let code = if response.ok {
            StatusCode::OK
        } else {
            StatusCode::CONFLICT
        };
        json(code, serde_json::to_string(&response).unwrap_or_default())
    }
}

fn json(code: StatusCode, body: String) -> Response {
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

async fn metrics(State(o): State<Arc<Observer>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        o.render_metrics(),
    )
        .into_response()
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:",
            ),
        ],
        PAGE,
    )
        .into_response()
}

async fn api_status(State(o): State<Arc<Observer>>) -> Response {
    json(StatusCode::OK, o.status_json())
}

fn forbidden() -> Response {
    json(
        StatusCode::FORBIDDEN,
        r#"{"ok":false,"message":"controls need --dashboard-token and the x-herd-token header"}"#
            .into(),
    )
}

async fn api_reload(State(o): State<Arc<Observer>>, headers: HeaderMap) -> Response {
    if !o.authorized(&headers) {
        return forbidden();
    }
    o.control(Request::Reload).await
}

async fn api_scale(
    State(o): State<Arc<Observer>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    if !o.authorized(&headers) {
        return forbidden();
    }
    let workers = uri.query().unwrap_or("").split('&').find_map(|kv| {
        kv.strip_prefix("workers=")
            .and_then(|w| w.parse::<usize>().ok())
    });
    match workers {
        Some(workers) if workers >= 1 => o.control(Request::Scale { workers }).await,
        _ => json(
            StatusCode::BAD_REQUEST,
            r#"{"ok":false,"message":"workers must be an integer >= 1"}"#.into(),
        ),
    }
}

/// Bind `addr` now (so that a bad address fails the start), refusing a non-loopback address
/// unless `allow_remote`.
pub(crate) fn bind(addr: &str, what: &str, allow_remote: bool) -> Result<std::net::TcpListener> {
    let bind_err = |source| Error::Bind {
        addr: addr.to_owned(),
        source,
    };
    let sockaddr = super::spawn::resolve(addr)?;
    if !sockaddr.ip().is_loopback() && !allow_remote {
        return Err(bind_err(std::io::Error::other(format!(
            "refusing to serve the {what} on a non-loopback address without a dashboard token \
             (or --dashboard-allow-remote)"
        ))));
    }
    let listener = std::net::TcpListener::bind(sockaddr).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}

/// Serve `/metrics` only (the `--metrics` address).
pub(crate) async fn serve_metrics(listener: std::net::TcpListener, observer: Arc<Observer>) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(observer);
    serve(listener, app).await;
}

/// Serve the dashboard (and `/metrics`).
pub(crate) async fn serve_dashboard(listener: std::net::TcpListener, observer: Arc<Observer>) {
    let app = Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/api/status", get(api_status))
        .route("/api/reload", post(api_reload))
        .route("/api/scale", post(api_scale))
        .with_state(observer);
    serve(listener, app).await;
}

async fn serve(listener: std::net::TcpListener, app: Router) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("herd: dashboard/metrics server failed: {e}");
    }
}

/// User + system CPU seconds of `pid`, from `/proc/PID/stat` (in clock ticks of 1/100 s, the
/// `USER_HZ` Linux reports there on every architecture).
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3 (index 0 here); utime and stime are fields 14 and 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_unlabelled_values() {
        let text =
            "# TYPE herd_requests_total counter\nherd_requests_total 42\nherd_requests_total_x 1\n";
        assert_eq!(value(text, "herd_requests_total"), Some(42.0));
        assert_eq!(value(text, "missing"), None);
        let labelled = "herd_requests_total{worker=\"2\"} 7\nx{worker=\"2\",op=\"get\"} 1\n";
        assert_eq!(value(labelled, "herd_requests_total"), Some(7.0));
        assert_eq!(
            value(labelled, "x"),
            None,
            "a series split by another label"
        );
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(token_matches(b"secret", b"secret"));
        assert!(!token_matches(b"secreT", b"secret"));
        assert!(!token_matches(b"secret1", b"secret"));
        assert!(!token_matches(b"", b"secret"));
    }

    #[test]
    fn cpu_of_this_process_is_read() {
        assert!(cpu_seconds(std::process::id()).is_some());
    }
}
