//! [`MaxRequestsLayer`]: counts a worker's requests for
//! [`Launcher::max_requests`](super::Launcher::max_requests).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use super::master_channel::Channel;

#[derive(Debug)]
struct CounterInner {
    count: AtomicU64,
    limit: Option<u64>,
    channel: Arc<Channel>,
}

/// Counts the requests of a worker for [`Launcher::max_requests`](super::Launcher::max_requests)
/// and asks the master for a replacement at the limit; a tower [`Layer`](tower_layer::Layer). See
/// [`Worker::requests`](super::Worker::requests). (The Prometheus counter `herd_requests_total` is
/// [`RequestsTotalLayer`](crate::observe)'s.)
#[derive(Debug, Clone)]
pub struct MaxRequestsLayer {
    inner: Arc<CounterInner>,
}

impl MaxRequestsLayer {
    /// A counter that asks for a replacement on `channel` at `limit` (none: it only counts).
    pub(crate) fn new(limit: Option<u64>, channel: Arc<Channel>) -> MaxRequestsLayer {
        MaxRequestsLayer {
            inner: Arc::new(CounterInner {
                count: AtomicU64::new(0),
                limit,
                channel,
            }),
        }
    }

    /// Count one request; at the limit, ask the master for a replacement.
    pub fn record(&self) {
        let n = self.inner.count.fetch_add(1, Ordering::Relaxed) + 1;
        if self.inner.limit.is_some_and(|limit| n >= limit) {
            self.inner.channel.recycle();
        }
    }

    /// Requests counted so far.
    pub fn count(&self) -> u64 {
        self.inner.count.load(Ordering::Relaxed)
    }
}

impl<S> tower_layer::Layer<S> for MaxRequestsLayer {
    type Service = MaxRequestsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MaxRequestsService {
            inner,
            counter: self.clone(),
        }
    }
}

/// The service made by the [`MaxRequestsLayer`].
#[derive(Debug, Clone)]
pub struct MaxRequestsService<S> {
    inner: S,
    counter: MaxRequestsLayer,
}

impl<S, R> tower_service::Service<R> for MaxRequestsService<S>
where
    S: tower_service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        self.counter.record();
        self.inner.call(req)
    }
}
