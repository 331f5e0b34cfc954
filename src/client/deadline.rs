//! The request deadline: a task-local instant that every Redis call made while a request is served
//! reads to bound its wait. Set by [`SessionLayer`](crate::SessionLayer) and by
//! [`RequestDeadlineLayer`]; the rules are in the [client module docs](super).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tower_layer::Layer;
use tower_service::Service;

tokio::task_local! {
    static DEADLINE: Instant;
}

/// The deadline of the request being served on this task, if any.
#[inline]
pub(crate) fn current() -> Option<Instant> {
    DEADLINE.try_with(|d| *d).ok()
}

/// Runs `fut` with `deadline` as the deadline of every Redis call it makes (for work outside an
/// HTTP request: a job, a message handler). Inside an enclosing deadline, the earlier one applies.
///
/// ```no_run
/// # async fn job(globals: herd::Globals) -> herd::Result<()> {
/// use std::time::{Duration, Instant};
/// let deadline = Instant::now() + Duration::from_millis(500);
/// herd::client::with_deadline(deadline, async {
///     globals.group("stats")?.incr("jobs", 1).await?;
///     Ok::<_, herd::Error>(())
/// })
/// .await
/// # }
/// ```
pub fn with_deadline<F: Future>(deadline: Instant, fut: F) -> WithDeadline<F> {
    WithDeadline::new(fut, deadline)
}

pin_project_lite::pin_project! {
    /// A future polled with a request deadline in scope (the earlier of its own and an enclosing
    /// one). Polling sets the task-local for the poll's duration only: no allocation, no timer.
    pub struct WithDeadline<F> {
        #[pin]
        inner: F,
        deadline: Instant,
        resolved: bool,
    }
}

impl<F> WithDeadline<F> {
    pub(crate) fn new(inner: F, deadline: Instant) -> WithDeadline<F> {
        WithDeadline {
            inner,
            deadline,
            resolved: false,
        }
    }
}

impl<F> std::fmt::Debug for WithDeadline<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WithDeadline")
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl<F: Future> Future for WithDeadline<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if !*this.resolved {
            // An enclosing layer's deadline, in scope while it polls us, wins if it is earlier.
            if let Some(outer) = current() {
                *this.deadline = (*this.deadline).min(outer);
            }
            *this.resolved = true;
        }
        let inner = this.inner;
        DEADLINE.sync_scope(*this.deadline, || inner.poll(cx))
    }
}

/// A tower layer that gives each request a deadline for its Redis calls, for apps that use
/// [`Globals`](crate::Globals) without [`SessionLayer`](crate::SessionLayer) (which sets the same
/// deadline itself). See the [client module docs](super).
///
/// ```no_run
/// # fn f(redis: herd::RedisClient) {
/// let app: axum::Router = axum::Router::new()
///     // .route(...)
///     .layer(herd::client::RequestDeadlineLayer::new(redis.config().request_timeout()));
/// # }
/// ```
#[derive(Clone, Copy, Debug)]
pub struct RequestDeadlineLayer {
    timeout: Duration,
}

impl RequestDeadlineLayer {
    /// Each request's Redis calls end at most `timeout` after the request reached this layer.
    pub fn new(timeout: Duration) -> RequestDeadlineLayer {
        RequestDeadlineLayer { timeout }
    }
}

impl<S> Layer<S> for RequestDeadlineLayer {
    type Service = RequestDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestDeadline {
            inner,
            timeout: self.timeout,
        }
    }
}

/// The service made by [`RequestDeadlineLayer`].
#[derive(Clone, Debug)]
pub struct RequestDeadline<S> {
    inner: S,
    timeout: Duration,
}

impl<S, R> Service<R> for RequestDeadline<S>
where
    S: Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = WithDeadline<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        WithDeadline::new(self.inner.call(req), Instant::now() + self.timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_earlier_deadline_wins_and_none_outside() {
        assert_eq!(current(), None);
        let now = Instant::now();
        let (a, b) = (now + Duration::from_secs(1), now + Duration::from_secs(5));
        let seen = with_deadline(a, async { with_deadline(b, async { current() }).await }).await;
        assert_eq!(seen, Some(a));
        let seen = WithDeadline::new(WithDeadline::new(async { current() }, a), b).await;
        assert_eq!(seen, Some(a), "an inner layer keeps its earlier deadline");
        let seen = WithDeadline::new(WithDeadline::new(async { current() }, b), a).await;
        assert_eq!(
            seen,
            Some(a),
            "an inner layer takes the outer, earlier deadline"
        );
        assert_eq!(current(), None);
    }
}
