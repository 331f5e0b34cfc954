//! Sessions for axum, stored in Redis, shared by every worker process.
//!
//! Add a [`SessionLayer`] to the router and take a [`Session`] in handlers:
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use herd::{Config, RedisClient, Session, SessionLayer};
//!
//! async fn counter(session: Session) -> herd::Result<String> {
//!     let n = session.incr("counter", 1).await?; // one round trip, atomic in Redis
//!     Ok(format!("you have been here {n} times"))
//! }
//!
//! # async fn run() -> herd::Result<()> {
//! let redis = RedisClient::connect(Config::from_env()?).await?;
//! let app: Router = Router::new()
//!     .route("/", get(counter))
//!     .layer(SessionLayer::from_env(redis)?.with_secure(false)); // plain-http dev only
//! # Ok(()) }
//! ```
//!
//! # How it works
//! * **Lazy.** The layer puts a handle in the request and does nothing else: a request whose handler
//!   never touches the session costs no Redis round trip and, even with a cookie, no signature check.
//! * **One read.** The first read loads the whole session (one `HGETALL`).
//! * **Buffered writes.** [`insert`](Session::insert), [`remove`](Session::remove),
//!   [`clear`](Session::clear), [`cycle_id`](Session::cycle_id), [`destroy`](Session::destroy),
//!   [`set_owner`](Session::set_owner) only record a change. After the handler, the changes are applied
//!   in one round trip, *before the response leaves*: the visitor's next request, on any worker, reads
//!   its own writes. Only changed fields are written, so two concurrent requests of one visitor that
//!   change different keys both keep their change.
//! * **Planned, then executed.** After the handler (or at an `incr`) a pure planner turns the buffered
//!   changes and what the request knows of the stored session into one write plan; the store runs it
//!   as one Lua script that checks, then writes, atomically; its reply (the id, the timing record, the
//!   owner, the counter) replaces the request's view of the session. So a later write in the same
//!   request works from what Redis holds, never from a stale copy.
//! * **Never resurrect.** A save into a session that was destroyed (logout in another tab) or expired
//!   while the request ran keeps nothing. If the handler had read the session, the response becomes
//!   `409` ([`Error::SessionGone`](crate::Error::SessionGone)) and removes the cookie; if it only
//!   wrote blindly, the changes go into a fresh session with a fresh id.
//! * **Atomic counters.** [`incr`](Session::incr) runs `HINCRBY` in Redis at once (with any buffered
//!   changes, still one round trip) and returns the new value. An acknowledged increment was applied
//!   exactly once; a lost reply is [`OutcomeUnknown`](crate::Error::OutcomeUnknown) (it may have
//!   been applied: do not repeat it), never `Unavailable`.
//!
//! # Logins and concurrent requests
//! [`cycle_id`](Session::cycle_id) moves the session to a fresh id and leaves under the old id a
//! **tombstone** for one minute: no data and no pointer to the new id, so a fixated pre-login id
//! gains nothing. A request that carries the old id and meets the tombstone (it reads, writes,
//! increments or logs out after the login moved the session, e.g. an XHR fired before the login's
//! response arrived) gets `409` ([`Error::SessionGone`](crate::Error::SessionGone)) **without any
//! `Set-Cookie`**: it neither deletes the login's cookie nor replaces it with a fresh session's, and
//! nothing it buffered is written anywhere. Within that minute no request creates a fresh session
//! for the old id. So a login is never undone by a request that started before it; the browser's
//! next request carries the new cookie. (After the minute the old id is an unknown id: ignored, as
//! any cookie that names no session.)
//!
//! The guarantees, for concurrent requests of one visitor and "log out everywhere" from elsewhere:
//! every write is all or nothing; a destroyed or expired session is never resurrected; a session's
//! TTL follows the idle timeout stored in it (its own, if one was set) and never runs past the
//! absolute deadline or the owner index's coverage; each acknowledged `incr` counts
//! once; a login is never undone by an earlier-started request.
//!
//! | handler does | Redis round trips |
//! |---|---|
//! | nothing with the session (with or without a cookie) | 0 |
//! | reads only | 1 |
//! | writes without reading | 1 |
//! | reads, then writes | 2 |
//! | `incr` | 1 |
//! | `cycle_id` (login) or `destroy` (logout), with or without writes | 1 (a cycle on a Redis Cluster: 3; writes after a `destroy` start a new session: 2) |
//!
//! # Cookies
//! Signed with the layer's key (see [Cookie keys](#cookie-keys)), `HttpOnly`, `SameSite=Lax`, `Path=/`,
//! `Secure` (turn off only for plain-http development with
//! [`with_secure(false)`](SessionLayer::with_secure)), optionally with the `__Host-` prefix. Old keys
//! still verify (key rotation). `Set-Cookie` is sent only when a session is created, gets a new id, or
//! is destroyed. A cookie that fails verification, is malformed, or names a session Redis does not have
//! is ignored: the visitor gets a fresh session, with a fresh id, when the handler first writes.
//!
//! # Cookie keys
//! The layer signs cookies with one key and verifies them with it and any old keys (rotation). The
//! keys are the layer's own, not the Redis client's [`Config`](crate::Config):
//!
//! | where the key comes from | how |
//! |---|---|
//! | the environment | [`SessionLayer::from_env`]: `HERD_SECRET` (base64 of at least 64 random bytes, `openssl rand -base64 64`) signs; `HERD_OLD_SECRETS` (comma-separated) still verify. A blank variable counts as unset |
//! | code | [`SessionLayer::with_key`] and [`SessionLayer::with_old_keys`] ([`Key`](crate::cookie::Key) from the `cookie` crate, re-exported as `herd::cookie`) |
//! | neither | a random key for this process only, and a loud warning when the layer is first used: cookies verify in this one process and until it restarts ([`SessionLayer::key_is_ephemeral`] says so) |
//!
//! A secret that is set but malformed (not base64, fewer than 64 bytes) is an
//! [`Error::Config`](crate::Error::Config) naming the variable: [`from_env`](SessionLayer::from_env)
//! refuses rather than guess. Under the launcher the master checks `HERD_SECRET`, or makes one
//! random key per master life, and hands it to every worker: workers that build their layer with
//! [`from_env`](SessionLayer::from_env) all verify each other's cookies. Keys never appear in
//! `Debug` output or logs.
//!
//! # Expiry
//! * **Idle timeout** ([`with_idle_timeout`](SessionLayer::with_idle_timeout), default 24 h; per
//!   session with [`Session::set_idle_timeout`]): the key's TTL. Requests push it back at most once
//!   per tenth of the timeout (off the request's path when the request only read or only changed
//!   fields), so busy traffic does not pay for a TTL write on every request.
//! * **Absolute timeout** ([`with_absolute_timeout`](SessionLayer::with_absolute_timeout), default
//!   7 days): counted from creation (or the last [`cycle_id`](Session::cycle_id)); activity never
//!   extends it.
//!
//! # Owners: log out everywhere
//! [`Session::set_owner`] ties a session to a user id; [`SessionStore::destroy_owner`] destroys every
//! session of that user, in two round trips, without scanning keys (a login that races it on a
//! cluster notices and removes its new session). The index is a sorted set of
//! session ids, each listed until a time its session cannot outlive: an owned session's TTL is
//! capped at its index entry, and while the session is used its entry is pushed forward (to `7/4`
//! of the idle timeout ahead, when less than `5/4` is left; off the request's path, about once per
//! idle timeout). So the index always lists every live session of its owner, and it ends at most
//! one idle timeout after the last of them. A logout that has read the session (so knows the owner)
//! also takes it out of the index in the same round trip.

mod cookie;
mod cycle;
mod fields;
mod handle;
mod layer;
mod owners;
#[doc(hidden)]
pub mod pause;
mod plan;
pub(crate) mod signing;
pub(crate) mod store;
mod timing;

use std::time::Duration;

pub use self::handle::Session;
pub use self::layer::{ResponseFuture, SessionLayer, SessionMissing, SessionService};
use self::timing::Expiry;
use crate::client::RedisClient;
use crate::error::Result;
use crate::keys::SessionId;

/// Settings of one [`SessionLayer`], shared by every request it handles.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) client: RedisClient,
    pub(crate) cookie: cookie::CookieConfig,
    /// The current key (signs) and the old ones.
    pub(crate) keys: signing::SigningKeys,
    /// Keyed HMAC states of `keys`, current first.
    pub(crate) verifier: cookie::Verifier,
    pub(crate) expiry: Expiry,
    pub(crate) max_value_bytes: usize,
    pub(crate) max_session_bytes: usize,
}

/// Operations on sessions outside of a request, e.g. "log out everywhere" from an admin task.
#[derive(Clone, Debug)]
pub struct SessionStore {
    client: RedisClient,
}

impl SessionStore {
    /// A store over `client`, with the client's key prefix.
    pub fn new(client: RedisClient) -> SessionStore {
        SessionStore { client }
    }

    /// Destroys every session tied to `owner` with [`Session::set_owner`] ("log out everywhere").
    /// Returns how many sessions were deleted. Two round trips, whatever the number of sessions.
    ///
    /// # Errors
    /// [`Error::InvalidName`](crate::Error::InvalidName) for an empty or over-long owner;
    /// [`Error::Unavailable`](crate::Error::Unavailable) /
    /// [`Error::OutcomeUnknown`](crate::Error::OutcomeUnknown) when Redis does not answer.
    pub async fn destroy_owner(&self, owner: &str) -> Result<usize> {
        store::destroy_owner(&self.client, owner).await
    }
}

/// A request's `Cookie` header values (reference-counted clones, not copies).
pub(crate) struct CookieHeaders {
    pub(crate) first: Option<http::HeaderValue>,
    pub(crate) rest: Vec<http::HeaderValue>,
}

/// What the response must say about the cookie.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum CookieAction {
    #[default]
    None,
    Set(SessionId, Duration),
    Remove,
}
