//! Observability: `tracing` spans per request and Prometheus metrics.
//!
//! **Tracing** is always on (it costs nothing without a subscriber): the [`SessionLayer`]
//! opens a `herd.request` span at `DEBUG` level per request with the fields `worker` (the
//! launcher slot, when there is one), `method`, `path` (without the query string),
//! `session_loaded`, `redis_round_trips`, `redis_ms` and `status`. Session ids, cookie values and
//! session data are never recorded. The launcher logs spawn, ready, exit (with the status),
//! restart (with the backoff) and every step of a reload at `INFO`.
//!
//! **Metrics** (cargo feature `metrics`) go through the [`metrics`](https://docs.rs/metrics) facade,
//! so any recorder works; `install_prometheus` (feature `metrics`) installs the Prometheus one.
//! Under the launcher with `--metrics ADDR` or `--dashboard`, each worker installs it by itself and
//! sends its rendered series to the master every second; the master serves them all, each labelled
//! `worker="N"`.
//!
//! | metric | type | what |
//! |---|---|---|
//! | `herd_requests_total` | counter | requests served (the launcher's `Worker::serve`, or [`RequestsTotalLayer`]) |
//! | `herd_session_loads_total` | counter | sessions read from Redis (a request's first read) |
//! | `herd_session_saves_total` | counter | atomic session writes |
//! | `herd_session_creates_total` | counter | new sessions stored (a new id) |
//! | `herd_session_destroys_total` | counter | sessions destroyed (logout) |
//! | `herd_redis_command_seconds` | histogram | latency of each round trip on the shared connection |
//! | `herd_redis_errors_total` | counter | round trips that failed or timed out |
//! | `herd_redis_pool_wait_seconds` | histogram | wait for a dedicated (pooled) connection |
//! | `herd_redis_breaker_open` | gauge | 1 while the client's circuit breaker is open or half-open (Redis not answering), 0 when closed ([`client`](crate::client)) |
//! | `herd_redis_breaker_opened_total` | counter | times the breaker opened |
//! | `herd_redis_breaker_changed_seconds` | gauge | Unix time of the breaker's last opening or closing (shown by `herd status` and the dashboard) |
//! | `herd_update_conflicts_total` | counter | optimistic updates that lost a race (`WATCH` fired) |
//! | `herd_update_retries_total` | counter | retries after such a conflict |
//!
//! The master adds, per worker: `herd_worker_restarts_total`, `herd_worker_resident_memory_bytes`,
//! `herd_worker_cpu_seconds_total`, `herd_worker_up`; and `herd_workers` (slots).
//!
//! Install the recorder before the first request: the handles are looked up once and kept.
//!
//! [`SessionLayer`]: crate::SessionLayer

use std::cell::Cell;
use std::time::Duration;

/// Metric names, one place.
pub mod names {
    /// Counter: requests served.
    pub const REQUESTS: &str = "herd_requests_total";
    /// Counter: sessions loaded from Redis.
    pub const SESSION_LOADS: &str = "herd_session_loads_total";
    /// Counter: atomic session writes.
    pub const SESSION_SAVES: &str = "herd_session_saves_total";
    /// Counter: new sessions stored.
    pub const SESSION_CREATES: &str = "herd_session_creates_total";
    /// Counter: sessions destroyed.
    pub const SESSION_DESTROYS: &str = "herd_session_destroys_total";
    /// Histogram (seconds): Redis round-trip latency on the shared connection.
    pub const REDIS_SECONDS: &str = "herd_redis_command_seconds";
    /// Counter: failed or timed-out Redis round trips.
    pub const REDIS_ERRORS: &str = "herd_redis_errors_total";
    /// Histogram (seconds): wait for a pooled connection.
    pub const POOL_WAIT_SECONDS: &str = "herd_redis_pool_wait_seconds";
    /// Gauge: 1 while the Redis circuit breaker is open, 0 when closed.
    pub const BREAKER_OPEN: &str = "herd_redis_breaker_open";
    /// Counter: times the Redis circuit breaker opened.
    pub const BREAKER_OPENED: &str = "herd_redis_breaker_opened_total";
    /// Gauge: Unix time (seconds) of the breaker's last opening or closing.
    pub const BREAKER_CHANGED: &str = "herd_redis_breaker_changed_seconds";
    /// Counter: optimistic updates that lost a race.
    pub const UPDATE_CONFLICTS: &str = "herd_update_conflicts_total";
    /// Counter: retries after a conflict.
    pub const UPDATE_RETRIES: &str = "herd_update_retries_total";
}

#[cfg(feature = "metrics")]
mod recorder {
    use super::names;
    use std::sync::OnceLock;

    pub(super) struct Handles {
        pub(super) requests: metrics::Counter,
        pub(super) loads: metrics::Counter,
        pub(super) saves: metrics::Counter,
        pub(super) creates: metrics::Counter,
        pub(super) destroys: metrics::Counter,
        pub(super) redis_seconds: metrics::Histogram,
        pub(super) redis_errors: metrics::Counter,
        pub(super) pool_wait: metrics::Histogram,
        pub(super) breaker_open: metrics::Gauge,
        pub(super) breaker_opened: metrics::Counter,
        pub(super) breaker_changed: metrics::Gauge,
        pub(super) conflicts: metrics::Counter,
        pub(super) retries: metrics::Counter,
    }

    /// The handles, registered once with whatever recorder is installed at the first call (a
    /// no-op one if none is): no lookup and no allocation per request afterwards.
    pub(super) fn handles() -> &'static Handles {
        static HANDLES: OnceLock<Handles> = OnceLock::new();
        HANDLES.get_or_init(|| {
            use metrics::{describe_counter, describe_histogram, Unit};
            describe_counter!(names::REQUESTS, "Requests served.");
            describe_counter!(names::SESSION_LOADS, "Sessions read from Redis.");
            describe_counter!(names::SESSION_SAVES, "Atomic session writes.");
            describe_counter!(names::SESSION_CREATES, "New sessions stored.");
            describe_counter!(names::SESSION_DESTROYS, "Sessions destroyed.");
            describe_histogram!(
                names::REDIS_SECONDS,
                Unit::Seconds,
                "Redis round-trip latency on the shared connection."
            );
            describe_counter!(
                names::REDIS_ERRORS,
                "Failed or timed-out Redis round trips."
            );
            describe_histogram!(
                names::POOL_WAIT_SECONDS,
                Unit::Seconds,
                "Wait for a dedicated pooled Redis connection."
            );
            metrics::describe_gauge!(
                names::BREAKER_OPEN,
                "1 while the Redis circuit breaker is open (Redis not answering)."
            );
            describe_counter!(
                names::BREAKER_OPENED,
                "Times the Redis circuit breaker opened."
            );
            metrics::describe_gauge!(
                names::BREAKER_CHANGED,
                "Unix time of the Redis circuit breaker's last opening or closing."
            );
            describe_counter!(
                names::UPDATE_CONFLICTS,
                "Optimistic updates that lost a race."
            );
            describe_counter!(names::UPDATE_RETRIES, "Retries after a conflict.");
            Handles {
                requests: metrics::counter!(names::REQUESTS),
                loads: metrics::counter!(names::SESSION_LOADS),
                saves: metrics::counter!(names::SESSION_SAVES),
                creates: metrics::counter!(names::SESSION_CREATES),
                destroys: metrics::counter!(names::SESSION_DESTROYS),
                redis_seconds: metrics::histogram!(names::REDIS_SECONDS),
                redis_errors: metrics::counter!(names::REDIS_ERRORS),
                pool_wait: metrics::histogram!(names::POOL_WAIT_SECONDS),
                breaker_open: metrics::gauge!(names::BREAKER_OPEN),
                breaker_opened: metrics::counter!(names::BREAKER_OPENED),
                breaker_changed: metrics::gauge!(names::BREAKER_CHANGED),
                conflicts: metrics::counter!(names::UPDATE_CONFLICTS),
                retries: metrics::counter!(names::UPDATE_RETRIES),
            }
        })
    }
}

/// Install the Prometheus recorder as the global `metrics` recorder and return its handle
/// (`handle.render()` gives the text format). Latency histograms use buckets from 100 µs to
/// 2.5 s, so that series of several workers can be summed.
///
/// # Errors
///
/// When a global recorder is already installed.
#[cfg(feature = "metrics")]
pub fn install_prometheus(
) -> Result<metrics_exporter_prometheus::PrometheusHandle, Box<dyn std::error::Error + Send + Sync>>
{
    install_prometheus_labelled(&[])
}

/// [`install_prometheus`] with labels on every series (the launcher's `worker="N"`), through the
/// exporter's global labels.
#[cfg(feature = "metrics")]
pub(crate) fn install_prometheus_labelled(
    labels: &[(&str, String)],
) -> Result<metrics_exporter_prometheus::PrometheusHandle, Box<dyn std::error::Error + Send + Sync>>
{
    let mut builder = metrics_exporter_prometheus::PrometheusBuilder::new().set_buckets(&[
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ])?;
    for (key, value) in labels {
        builder = builder.add_global_label(*key, value.clone());
    }
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)?;
    recorder::handles();
    Ok(handle)
}

/// `record!(h => expr)`: run `expr` with the metric handles `h`, only with feature `metrics`.
macro_rules! record {
    ($h:ident => $($body:tt)*) => {{
        #[cfg(feature = "metrics")]
        {
            let $h = recorder::handles();
            $($body)*;
        }
    }};
}

/// Per-request Redis figures, kept in a task-local while the request's span is enabled.
#[derive(Debug, Default)]
pub(crate) struct RequestStats {
    pub(crate) round_trips: Cell<u32>,
    pub(crate) redis_nanos: Cell<u64>,
    pub(crate) loaded: Cell<bool>,
}

tokio::task_local! {
    pub(crate) static REQUEST: RequestStats;
}

/// The launcher slot of this process (`HERD_WORKER_INDEX`), read once.
pub(crate) fn worker_index() -> Option<u64> {
    static INDEX: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *INDEX.get_or_init(|| {
        std::env::var("HERD_WORKER_INDEX")
            .ok()
            .and_then(|v| v.parse().ok())
    })
}

/// One request served.
#[inline]
pub(crate) fn request() {
    record!(h => h.requests.increment(1));
}

/// One round trip on the shared connection took `elapsed`; `ok` is false for an error/timeout.
#[inline]
pub(crate) fn redis_round_trip(elapsed: Duration, ok: bool) {
    record!(h => {
        h.redis_seconds.record(elapsed.as_secs_f64());
        if !ok {
            h.redis_errors.increment(1);
        }
    });
    let _ = ok;
    let _ = REQUEST.try_with(|s| {
        s.redis_nanos
            .set(s.redis_nanos.get() + elapsed.as_nanos() as u64);
    });
}

/// One round trip (shared or dedicated connection), for the request's span.
#[inline]
pub(crate) fn round_trip() {
    let _ = REQUEST.try_with(|s| s.round_trips.set(s.round_trips.get() + 1));
}

/// Waited `elapsed` for a pooled connection.
#[inline]
pub(crate) fn pool_wait(elapsed: Duration) {
    record!(h => h.pool_wait.record(elapsed.as_secs_f64()));
    let _ = elapsed;
}

/// A session was read from Redis.
#[inline]
pub(crate) fn session_loaded() {
    record!(h => h.loads.increment(1));
    let _ = REQUEST.try_with(|s| s.loaded.set(true));
}

/// A session write was applied; `created` when it stored a new session id.
#[inline]
pub(crate) fn session_saved(created: bool) {
    record!(h => {
        h.saves.increment(1);
        if created {
            h.creates.increment(1);
        }
    });
    let _ = created;
}

/// The Redis circuit breaker opened (`true`) or closed, at `unix_ms`.
pub(crate) fn breaker(open: bool, unix_ms: u64) {
    record!(h => {
        h.breaker_open.set(if open { 1.0 } else { 0.0 });
        h.breaker_changed.set(unix_ms as f64 / 1000.0);
        if open {
            h.breaker_opened.increment(1);
        }
    });
    let _ = (open, unix_ms);
}

/// A session was destroyed.
#[inline]
pub(crate) fn session_destroyed() {
    record!(h => h.destroys.increment(1));
}

/// An optimistic update lost a race; `retry` when it will try again.
#[inline]
pub(crate) fn update_conflict(retry: bool) {
    record!(h => {
        h.conflicts.increment(1);
        if retry {
            h.retries.increment(1);
        }
    });
    let _ = retry;
}

/// A tower layer that counts requests in the `herd_requests_total` metric (the launcher's
/// `Worker::serve` adds it when the master collects metrics; add it yourself otherwise). It only
/// feeds the metric: recycling a worker after a number of requests is the launcher's
/// `Worker::requests` layer.
///
/// Wrap the whole router with it rather than calling `Router::layer`, which wraps every route in
/// one more boxed service (an allocation per request):
///
/// ```no_run
/// use tower_layer::Layer as _;
/// let router: axum::Router = axum::Router::new();
/// let app = herd::observe::RequestsTotalLayer.layer(router);
/// # let _ = app;
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestsTotalLayer;

impl<S> tower_layer::Layer<S> for RequestsTotalLayer {
    type Service = RequestsTotalService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestsTotalService { inner }
    }
}

/// The service made by [`RequestsTotalLayer`].
#[derive(Debug, Clone)]
pub struct RequestsTotalService<S> {
    inner: S,
}

impl<S, R> tower_service::Service<R> for RequestsTotalService<S>
where
    S: tower_service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        request();
        self.inner.call(req)
    }
}
