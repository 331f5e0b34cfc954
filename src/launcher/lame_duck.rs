//! The lame-duck state of a worker's process: set by the master's `DRAINING` line (or, without a
//! master, by the worker's own first `SIGTERM`), read by health routes.

use std::sync::LazyLock;

use tokio::sync::watch;

/// Whether this process's host is draining (a lame duck, see the [module
/// docs](super#lame-duck-several-hosts-behind-a-load-balancer)): one per process, because a process
/// is at most one worker. Never set back to `false`: a lame duck only stops.
pub(crate) static DRAINING: LazyLock<watch::Sender<bool>> =
    LazyLock::new(|| watch::Sender::new(false));

/// Mark this process's host as draining (idempotent).
pub(crate) fn start_draining() {
    if !DRAINING.send_replace(true) {
        tracing::info!("herd worker: the host is a lame duck: /healthz reports draining");
    }
}

/// Whether the host this worker runs on is in its lame-duck period: it still serves, but it is
/// about to stop, and its health route should say so (`503`) so that a load balancer moves
/// traffic away. `false` outside a herd worker and during rolling reloads. See
/// [`Worker::is_draining`](super::Worker::is_draining) and [`healthz`].
pub fn is_draining() -> bool {
    *DRAINING.borrow()
}

/// A ready health-check handler for a load balancer: `200 {"ok":true}`, or `503
/// {"ok":false,"draining":true}` with `Retry-After: 1` while the host [is
/// draining](is_draining).
///
/// ```no_run
/// use axum::{routing::get, Router};
/// let app: Router = Router::new().route("/healthz", get(herd::launcher::healthz));
/// ```
pub async fn healthz() -> axum::response::Response {
    use axum::http::{header, HeaderValue, StatusCode};
    let (status, body) = if is_draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"ok":false,"draining":true}"#,
        )
    } else {
        (StatusCode::OK, r#"{"ok":true}"#)
    };
    let mut res = axum::response::Response::new(axum::body::Body::from(body));
    *res.status_mut() = status;
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    res
}
