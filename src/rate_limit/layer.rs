//! [`RateLimitLayer`]: a [`RateLimiter`] in front of a service.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::response::{IntoResponse, Response};
use http::{header, HeaderName, HeaderValue, Request, StatusCode};
use tower_layer::Layer;
use tower_service::Service;

use super::{Decision, RateLimiter, WhenUnavailable};

static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// The peer address of a connection, which the launcher's workers
/// ([`Worker::serve`](crate::launcher::Worker::serve)) put in every request's extensions as
/// `ConnectInfo<PeerAddr>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// The client's IP address, from the connection: `ConnectInfo<PeerAddr>` (apps served by the
/// launcher's workers) or `ConnectInfo<SocketAddr>` (apps served with axum's
/// `into_make_service_with_connect_info::<SocketAddr>()`); `None` without either, and the request
/// is then not limited. The key function for "per client IP" limits. Behind a proxy, derive the
/// key from the header your proxy sets instead (and trust it only from that proxy). With the
/// `launcher` feature (which gives axum its `tokio` feature, where `ConnectInfo` lives).
#[cfg(feature = "launcher")]
pub fn client_ip(parts: &http::request::Parts) -> Option<String> {
    use axum::extract::ConnectInfo;
    let ext = &parts.extensions;
    ext.get::<ConnectInfo<PeerAddr>>()
        .map(|ConnectInfo(PeerAddr(addr))| addr)
        .or_else(|| {
            ext.get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(addr)| addr)
        })
        .map(|addr| addr.ip().to_string())
}

/// A tower layer that limits requests with a [`RateLimiter`], keyed by a function of the request
/// (its head: method, URI, headers, extensions). A request for which the function returns `None`
/// is not limited.
///
/// Allowed requests go on with their [`Decision`] in the request extensions (read it with
/// `Extension<Decision>`) and get the `RateLimit` / `RateLimit-Policy` headers on their response.
/// Refused ones get `429` with `Retry-After` (whole seconds, at least 1), the same headers and a
/// JSON body `{"error": "too many requests"}`. When Redis cannot decide, the limiter's
/// [`WhenUnavailable`] policy applies: `503` with `Retry-After`, or the request goes on. One
/// round trip per limited request. See the [module docs](super).
///
/// ```no_run
/// # async fn run(redis: herd::RedisClient) -> herd::Result<()> {
/// use herd::rate_limit::{Quota, RateLimitLayer, RateLimiter};
/// let api = RateLimiter::new(redis, "api", Quota::per(100, std::time::Duration::from_secs(60)))?;
/// // Per API token, from a header; requests without one are not limited here.
/// let layer = RateLimitLayer::new(api, |req: &http::request::Parts| {
///     req.headers.get("x-api-token").and_then(|v| v.to_str().ok()).map(str::to_owned)
/// });
/// # let _ = layer;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RateLimitLayer<K> {
    limiter: RateLimiter,
    key: Arc<K>,
}

impl<K> std::fmt::Debug for RateLimitLayer<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("limiter", &self.limiter)
            .finish_non_exhaustive()
    }
}

impl<K> RateLimitLayer<K>
where
    K: Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
{
    /// Limits requests with `limiter`, keyed by `key` (for example [`client_ip`]).
    pub fn new(limiter: RateLimiter, key: K) -> Self {
        RateLimitLayer {
            limiter,
            key: Arc::new(key),
        }
    }
}

impl<S, K> Layer<S> for RateLimitLayer<K> {
    type Service = RateLimitService<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            limiter: self.limiter.clone(),
            key: Arc::clone(&self.key),
        }
    }
}

/// The service of [`RateLimitLayer`].
#[derive(Clone)]
pub struct RateLimitService<S, K> {
    inner: S,
    limiter: RateLimiter,
    key: Arc<K>,
}

impl<S, K> std::fmt::Debug for RateLimitService<S, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitService")
            .field("limiter", &self.limiter)
            .finish_non_exhaustive()
    }
}

impl<S, K, B> Service<Request<B>> for RateLimitService<S, K>
where
    S: Service<Request<B>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    K: Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
    B: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The clone that was driven to readiness serves this request (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (parts, body) = req.into_parts();
        let key = (self.key)(&parts);
        let mut req = Request::from_parts(parts, body);
        let limiter = self.limiter.clone();
        Box::pin(async move {
            let Some(key) = key else {
                return inner.call(req).await;
            };
            let decision = match limiter.check(key.as_bytes()).await {
                Ok(decision) => decision,
                Err(e) => return Ok(unavailable(&limiter, e)),
            };
            if !decision.is_allowed() {
                return Ok(too_many(&decision));
            }
            let headers = (!decision.is_unchecked())
                .then(|| (decision.ratelimit_header(), decision.policy_header()));
            req.extensions_mut().insert(decision);
            let mut res = inner.call(req).await?;
            if let Some((ratelimit, policy)) = headers {
                let h = res.headers_mut();
                h.insert(RATELIMIT.clone(), ratelimit);
                h.insert(RATELIMIT_POLICY.clone(), policy);
            }
            Ok(res)
        })
    }
}

/// 429 with `Retry-After` and the IETF headers.
fn too_many(decision: &Decision) -> Response {
    let mut res = (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::CONTENT_TYPE, "application/json")],
        r#"{"error":"too many requests"}"#,
    )
        .into_response();
    let h = res.headers_mut();
    h.insert(
        header::RETRY_AFTER,
        HeaderValue::from(decision.retry_after_secs()),
    );
    h.insert(RATELIMIT.clone(), decision.ratelimit_header());
    h.insert(RATELIMIT_POLICY.clone(), decision.policy_header());
    res
}

/// Redis could not decide and the policy is [`WhenUnavailable::Deny`] (with `Allow`,
/// [`RateLimiter::check`] answered an unchecked decision instead): herd's usual answer for the
/// error (503 + `Retry-After` for unavailability).
fn unavailable(limiter: &RateLimiter, e: crate::Error) -> Response {
    debug_assert_eq!(limiter.unavailable_policy(), WhenUnavailable::Deny);
    tracing::warn!(limiter = %limiter.name(), "rate limit not decided, request refused: {e}");
    e.into_response()
}
