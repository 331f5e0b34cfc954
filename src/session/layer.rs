//! [`SessionLayer`], its service, and the [`Session`] extractor.

use std::cell::Cell;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use cookie::SameSite;
use http::{header, Request, StatusCode};
use tower_layer::Layer;
use tower_service::Service;

use super::cookie as codec;
use super::signing::{self, SigningKeys};
use super::timing::Expiry;
use super::{CookieAction, CookieHeaders, Session, SessionStore, Settings};
use crate::client::{RedisClient, WithDeadline};

/// A tower [`Layer`] that gives every request a lazy [`Session`] stored in Redis. See the
/// [module docs](crate::session).
///
/// Defaults are the secure ones: cookie `herd_session`, `HttpOnly`, `Secure`, `SameSite=Lax`,
/// `Path=/`, no `Max-Age` (a browser-session cookie), idle timeout 24 h, absolute timeout 7 days,
/// values up to 64 KiB, sessions up to 1 MiB. The cookie signing key comes from
/// [`from_env`](Self::from_env) (`HERD_SECRET`) or [`with_key`](Self::with_key); see the
/// [module docs](crate::session#cookie-keys).
///
/// ```no_run
/// # async fn run(redis: herd::RedisClient) -> herd::Result<()> {
/// use std::time::Duration;
/// let layer = herd::SessionLayer::from_env(redis)?
///     .with_cookie_name("sid")
///     .with_host_prefix(true)
///     .with_idle_timeout(Duration::from_secs(30 * 60))
///     .with_absolute_timeout(Duration::from_secs(12 * 3600));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct SessionLayer {
    settings: Arc<Settings>,
    host_prefix: bool,
    base_name: String,
}

impl SessionLayer {
    /// A layer storing sessions through `client` (under the client's key prefix), signing cookies
    /// with a random key made for this process only (a warning says so when the layer is used).
    /// Give it the application's key with [`with_key`](Self::with_key), or start from
    /// [`from_env`](Self::from_env) instead.
    pub fn new(client: RedisClient) -> SessionLayer {
        SessionLayer::with_signing_keys(client, SigningKeys::ephemeral())
    }

    /// [`new`](Self::new) with the signing keys of the environment: `HERD_SECRET` (base64 of at
    /// least 64 bytes) signs and verifies cookies, `HERD_OLD_SECRETS` (comma-separated) still
    /// verify. Without `HERD_SECRET` (unset or blank), a random key for this process only, as
    /// [`new`](Self::new). Under the launcher every worker gets the master's `HERD_SECRET`, so a
    /// cookie verifies in all of them. See the [module docs](crate::session#cookie-keys).
    ///
    /// ```no_run
    /// # async fn run() -> herd::Result<()> {
    /// let redis = herd::RedisClient::connect(herd::Config::from_env()?).await?;
    /// let layer = herd::SessionLayer::from_env(redis)?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) naming the variable when a secret is not base64 or
    /// decodes to fewer than 64 bytes.
    pub fn from_env(client: RedisClient) -> crate::Result<SessionLayer> {
        Ok(SessionLayer::with_signing_keys(
            client,
            SigningKeys::from_env()?,
        ))
    }

    fn with_signing_keys(client: RedisClient, keys: SigningKeys) -> SessionLayer {
        let cookie = codec::CookieConfig::default();
        SessionLayer {
            base_name: cookie.name.clone(),
            host_prefix: false,
            settings: Arc::new(Settings {
                verifier: keys.verifier(),
                keys,
                client,
                cookie,
                expiry: Expiry {
                    idle: Duration::from_secs(24 * 3600),
                    absolute: Duration::from_secs(7 * 24 * 3600),
                },
                max_value_bytes: 64 * 1024,
                max_session_bytes: 1024 * 1024,
            }),
        }
    }

    fn settings_mut(&mut self) -> &mut Settings {
        Arc::make_mut(&mut self.settings)
    }

    /// The key that signs new cookies and verifies them (at least 64 bytes of a secret; e.g.
    /// `Key::from(&bytes)` or [`Key::generate`](cookie::Key::generate) for tests). Replaces a
    /// key from [`from_env`](Self::from_env).
    ///
    /// ```no_run
    /// # fn f(redis: herd::RedisClient, secret: &[u8; 64]) {
    /// let layer = herd::SessionLayer::new(redis).with_key(herd::cookie::Key::from(secret));
    /// # }
    /// ```
    pub fn with_key(mut self, key: cookie::Key) -> Self {
        let s = self.settings_mut();
        s.keys.current = key;
        s.keys.ephemeral = false;
        s.verifier = s.keys.verifier();
        self
    }

    /// Earlier keys, still accepted when verifying cookies (key rotation); new cookies are signed
    /// with the current key only. Replaces the old keys set before (or read by
    /// [`from_env`](Self::from_env) from `HERD_OLD_SECRETS`).
    ///
    /// ```no_run
    /// # fn f(redis: herd::RedisClient, new: herd::cookie::Key, old: herd::cookie::Key) {
    /// let layer = herd::SessionLayer::new(redis).with_key(new).with_old_keys([old]);
    /// # }
    /// ```
    pub fn with_old_keys(mut self, keys: impl IntoIterator<Item = cookie::Key>) -> Self {
        let s = self.settings_mut();
        s.keys.old = keys.into_iter().collect();
        s.verifier = s.keys.verifier();
        self
    }

    /// True when no key was given (neither [`with_key`](Self::with_key) nor `HERD_SECRET`) and
    /// cookies are signed with a random key of this process: they verify only here, and only
    /// until it restarts.
    pub fn key_is_ephemeral(&self) -> bool {
        self.settings.keys.ephemeral
    }

    fn update_name(&mut self) {
        let name = if self.host_prefix {
            format!("__Host-{}", self.base_name)
        } else {
            self.base_name.clone()
        };
        self.settings_mut().cookie.name = name;
    }

    /// The cookie's name. Default `herd_session`.
    ///
    /// ```no_run
    /// # fn f(redis: herd::RedisClient) {
    /// let layer = herd::SessionLayer::new(redis).with_cookie_name("sid");
    /// # }
    /// ```
    pub fn with_cookie_name(mut self, name: impl Into<String>) -> Self {
        self.base_name = name.into();
        self.update_name();
        self
    }

    /// Prefix the cookie name with `__Host-`, which makes browsers refuse it unless it is `Secure`,
    /// has `Path=/` and no `Domain` (protection against cookie injection from sibling domains).
    /// Forces `Secure` on and the domain off. Default off.
    ///
    /// ```no_run
    /// # fn f(redis: herd::RedisClient) {
    /// let layer = herd::SessionLayer::new(redis).with_host_prefix(true);
    /// # }
    /// ```
    pub fn with_host_prefix(mut self, on: bool) -> Self {
        self.host_prefix = on;
        if on {
            let s = self.settings_mut();
            s.cookie.secure = true;
            s.cookie.domain = None;
            s.cookie.path = "/".into();
        }
        self.update_name();
        self
    }

    /// The `Secure` attribute. Default on; turn off only for plain-http development (browsers do not
    /// send `Secure` cookies over http). Ignored with [`with_host_prefix(true)`](Self::with_host_prefix).
    ///
    /// ```no_run
    /// # fn f(redis: herd::RedisClient) {
    /// let dev = herd::SessionLayer::new(redis).with_secure(false);
    /// # }
    /// ```
    pub fn with_secure(mut self, secure: bool) -> Self {
        if !self.host_prefix {
            self.settings_mut().cookie.secure = secure;
        }
        self
    }

    /// The `SameSite` attribute. Default `Lax`. `SameSite::None` always sends `Secure` too (browsers
    /// refuse it otherwise), even with [`with_secure(false)`](Self::with_secure).
    ///
    /// ```no_run
    /// # fn f(redis: herd::RedisClient) {
    /// let layer = herd::SessionLayer::new(redis).with_same_site(cookie::SameSite::Strict);
    /// # }
    /// ```
    pub fn with_same_site(mut self, same_site: SameSite) -> Self {
        self.settings_mut().cookie.same_site = same_site;
        self
    }

    /// The cookie's `Domain`. Default none (host-only). Ignored with the `__Host-` prefix.
    ///
    /// ```no_run
    /// # fn f(redis: herd::RedisClient) {
    /// let layer = herd::SessionLayer::new(redis).with_domain("example.com");
    /// # }
    /// ```
    pub fn with_domain(mut self, domain: impl Into<String>) -> Self {
        if !self.host_prefix {
            self.settings_mut().cookie.domain = Some(domain.into());
        }
        self
    }

    /// The cookie's `Path`. Default `/`. Ignored with the `__Host-` prefix.
    ///
    /// ```no_run
    /// # fn f(redis: herd::RedisClient) {
    /// let layer = herd::SessionLayer::new(redis).with_path("/app");
    /// # }
    /// ```
    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        if !self.host_prefix {
            self.settings_mut().cookie.path = path.into();
        }
        self
    }

    /// Give the cookie a `Max-Age` equal to the absolute timeout, so it survives browser restarts.
    /// Default off (the cookie ends with the browser session). The server-side timeouts apply either way.
    ///
    /// ```no_run
    /// # fn f(redis: herd::RedisClient) {
    /// let layer = herd::SessionLayer::new(redis).with_persistent_cookie(true);
    /// # }
    /// ```
    pub fn with_persistent_cookie(mut self, on: bool) -> Self {
        self.settings_mut().cookie.persistent = on;
        self
    }

    /// How long a session lives without requests that touch it. Default 24 hours.
    ///
    /// ```no_run
    /// # fn f(redis: herd::RedisClient) {
    /// let layer = herd::SessionLayer::new(redis).with_idle_timeout(std::time::Duration::from_secs(1800));
    /// # }
    /// ```
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.settings_mut().expiry.idle = timeout.max(Duration::from_millis(1));
        self
    }

    /// How long a session lives at most from its creation (or its last id cycle), however active.
    /// Default 7 days.
    ///
    /// ```no_run
    /// # fn f(redis: herd::RedisClient) {
    /// let layer = herd::SessionLayer::new(redis).with_absolute_timeout(std::time::Duration::from_secs(86400));
    /// # }
    /// ```
    pub fn with_absolute_timeout(mut self, timeout: Duration) -> Self {
        self.settings_mut().expiry.absolute = timeout.max(Duration::from_millis(1));
        self
    }

    /// Largest value (key + JSON) accepted by [`Session::insert`]. Default 64 KiB.
    ///
    /// ```no_run
    /// # fn f(redis: herd::RedisClient) {
    /// let layer = herd::SessionLayer::new(redis).with_max_value_size(4096);
    /// # }
    /// ```
    pub fn with_max_value_size(mut self, bytes: usize) -> Self {
        self.settings_mut().max_value_bytes = bytes;
        self
    }

    /// Largest session (all keys + values). Default 1 MiB.
    ///
    /// ```no_run
    /// # fn f(redis: herd::RedisClient) {
    /// let layer = herd::SessionLayer::new(redis).with_max_session_size(64 * 1024);
    /// # }
    /// ```
    pub fn with_max_session_size(mut self, bytes: usize) -> Self {
        self.settings_mut().max_session_bytes = bytes;
        self
    }

    /// A [`SessionStore`] over the same Redis, for work outside requests ("log out everywhere").
    pub fn store(&self) -> SessionStore {
        SessionStore::new(self.settings.client.clone())
    }
}

impl<S> Layer<S> for SessionLayer {
    type Service = SessionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        if self.settings.keys.ephemeral {
            signing::warn_ephemeral_key();
        }
        SessionService {
            inner,
            settings: self.settings.clone(),
        }
    }
}

/// The service made by [`SessionLayer`].
#[derive(Clone, Debug)]
pub struct SessionService<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S, ReqBody> Service<Request<ReqBody>> for SessionService<S>
where
    S: Service<Request<ReqBody>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    /// The request's deadline for its Redis calls is in scope while it runs
    /// ([client module docs](crate::client)).
    type Future = WithDeadline<ResponseFuture<S::Future, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let deadline = std::time::Instant::now() + self.settings.client.config().request_timeout;
        // Only the `Cookie` headers are kept (a reference-counted clone, no copy); finding and
        // verifying our cookie waits until the handler first uses the session.
        let mut all = req.headers().get_all(header::COOKIE).iter();
        let cookies = CookieHeaders {
            first: all.next().cloned(),
            rest: all.cloned().collect(), // HTTP/2 may split cookies; empty (no allocation) otherwise
        };
        let session = Session::new(self.settings.clone(), cookies);
        req.extensions_mut().insert(session.clone());
        // observe: one span per request; never the cookie, the session id or the query string.
        let span = tracing::debug_span!(
            "herd.request",
            worker = crate::observe::worker_index(),
            method = %req.method(),
            path = req.uri().path(),
            session_loaded = tracing::field::Empty,
            redis_round_trips = tracing::field::Empty,
            redis_ms = tracing::field::Empty,
            status = tracing::field::Empty,
        );
        // The service polled ready is called here, at once: its future owns what it needs, so no
        // clone of the inner service (for axum a boxed route: an allocation) is made per request.
        let inner = self.inner.call(req);
        let handler = ResponseFuture {
            kind: Kind::Handler {
                inner,
                session,
                settings: self.settings.clone(),
            },
            observed: (!span.is_disabled()).then(|| Box::new(Observed::new(span))),
            error: PhantomData,
        };
        WithDeadline::new(handler, deadline)
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`SessionService`]: the handler, then (only if the session has
    /// changes) the write, before the response leaves. One path whether or not the request's
    /// tracing span is enabled: an enabled span is entered around each poll and gets the
    /// request's Redis figures at the end. Not boxed: a request that does not write costs no
    /// allocation here.
    pub struct ResponseFuture<F, E> {
        #[pin]
        kind: Kind<F>,
        observed: Option<Box<Observed>>,
        error: PhantomData<fn() -> E>,
    }
}

pin_project_lite::pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        // The handler runs.
        Handler {
            #[pin]
            inner: F,
            session: Session,
            settings: Arc<Settings>,
        },
        // The session's changes are being written (boxed: the save's state machine is large).
        Committing {
            commit: Pin<Box<dyn Future<Output = crate::Result<CookieAction>> + Send>>,
            res: Option<Response>,
            session: Session,
            settings: Arc<Settings>,
        },
    }
}

/// The request's enabled tracing span, and its Redis figures so far (carried between polls in
/// the `observe::REQUEST` task-local, which the client updates).
struct Observed {
    span: tracing::Span,
    round_trips: u32,
    redis_nanos: u64,
    loaded: bool,
}

impl Observed {
    fn new(span: tracing::Span) -> Observed {
        Observed {
            span,
            round_trips: 0,
            redis_nanos: 0,
            loaded: false,
        }
    }

    /// Records the figures and the status on the span, and one event in it.
    fn finish<E>(&self, result: &Result<Response, E>) {
        let span = &self.span;
        span.record("session_loaded", self.loaded);
        span.record("redis_round_trips", self.round_trips);
        span.record("redis_ms", self.redis_nanos as f64 / 1e6);
        if let Ok(res) = result {
            span.record("status", res.status().as_u16());
        }
        span.in_scope(|| tracing::debug!("herd: request done"));
    }
}

impl<F, E> std::fmt::Debug for ResponseFuture<F, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, E> Future for ResponseFuture<F, E>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(observed) = this.observed.as_deref_mut() else {
            return poll_kind(this.kind, cx);
        };
        let _entered = observed.span.enter();
        let stats = crate::observe::RequestStats {
            round_trips: Cell::new(observed.round_trips),
            redis_nanos: Cell::new(observed.redis_nanos),
            loaded: Cell::new(observed.loaded),
        };
        let kind = this.kind;
        let (poll, (round_trips, redis_nanos, loaded)) =
            crate::observe::REQUEST.sync_scope(stats, || {
                let poll = poll_kind(kind, cx);
                let figures = crate::observe::REQUEST
                    .with(|s| (s.round_trips.get(), s.redis_nanos.get(), s.loaded.get()));
                (poll, figures)
            });
        observed.round_trips = round_trips;
        observed.redis_nanos = redis_nanos;
        observed.loaded = loaded;
        if let Poll::Ready(result) = &poll {
            observed.finish(result);
        }
        poll
    }
}

/// The handler, then the commit.
fn poll_kind<F, E>(mut kind: Pin<&mut Kind<F>>, cx: &mut Context<'_>) -> Poll<Result<Response, E>>
where
    F: Future<Output = Result<Response, E>>,
{
    loop {
        match kind.as_mut().project() {
            KindProj::Handler {
                inner,
                session,
                settings,
            } => {
                let mut res = match inner.poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(res)) => res,
                };
                // Untouched or read-only: settled at once, without a future.
                if let Some(committed) = session.commit_if_clean() {
                    finish(settings, &mut res, committed, session);
                    return Poll::Ready(Ok(res));
                }
                let session = session.clone();
                let settings = settings.clone();
                let commit = {
                    let session = session.clone();
                    Box::pin(async move { session.commit().await })
                };
                kind.set(Kind::Committing {
                    commit,
                    res: Some(res),
                    session,
                    settings,
                });
            }
            KindProj::Committing {
                commit,
                res,
                session,
                settings,
            } => {
                let committed = match commit.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(committed) => committed,
                };
                let mut res = res.take().expect("ResponseFuture polled after completion");
                finish(settings, &mut res, committed, session);
                return Poll::Ready(Ok(res));
            }
        }
    }
}

/// Puts the commit's outcome on the response: the cookie to set or remove, or the error (a failed
/// save never reports success). A session that ended loses its cookie, unless its id was cycled
/// away: the browser may already hold the new id's cookie, which a removal would delete.
fn finish(
    settings: &Settings,
    res: &mut Response,
    committed: crate::Result<CookieAction>,
    session: &Session,
) {
    match committed {
        Ok(action) => apply_cookie(settings, res, action),
        Err(e) => {
            let gone = e.is_session_gone();
            *res = e.into_response();
            if gone && !session.is_cycled_away() {
                apply_cookie(settings, res, CookieAction::Remove);
            }
        }
    }
}

fn apply_cookie(settings: &Settings, res: &mut Response, action: CookieAction) {
    let value = match action {
        CookieAction::None => return,
        CookieAction::Set(id, max_age) => {
            codec::set_cookie(&settings.cookie, &settings.keys.current, &id, Some(max_age))
        }
        CookieAction::Remove => codec::removal(&settings.cookie),
    };
    res.headers_mut().append(header::SET_COOKIE, value);
}

/// The rejection of the [`Session`] extractor when no [`SessionLayer`] runs in front of the handler.
#[derive(Debug, Clone, Copy)]
pub struct SessionMissing;

impl std::fmt::Display for SessionMissing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "herd::Session was extracted but no herd::SessionLayer runs in front of this handler: \
             add `.layer(herd::SessionLayer::from_env(redis)?)` to the Router (after the routes that use it)",
        )
    }
}

impl std::error::Error for SessionMissing {}

impl IntoResponse for SessionMissing {
    fn into_response(self) -> Response {
        tracing::error!("{self}");
        (StatusCode::INTERNAL_SERVER_ERROR, self.to_string()).into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Session {
    type Rejection = SessionMissing;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Session>()
            .cloned()
            .ok_or(SessionMissing)
    }
}
