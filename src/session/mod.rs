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
//!     .layer(SessionLayer::new(redis).with_secure(false)); // plain-http dev only
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
//!   change different keys both keep their change. A write after a read (the request knows the
//!   session's timing and size) is a plain pipeline (`HSET`/`HDEL`, `PEXPIRE`, `HEXISTS`); every other
//!   write is one Lua script that checks before it writes.
//! * **Never resurrect.** A save into a session that was destroyed (logout in another tab) or expired
//!   while the request ran keeps nothing (a pipeline that lands after a destroy leaves a hash without
//!   the timing record, which no read accepts and which is deleted at once). If the handler had read
//!   the session, the response becomes `409` ([`Error::SessionGone`]); if it only wrote blindly, the
//!   changes go into a fresh session with a fresh id.
//! * **Atomic counters.** [`incr`](Session::incr) runs `HINCRBY` in Redis at once (with any buffered
//!   changes, still one round trip) and returns the new value.
//!
//! | handler does | Redis round trips |
//! |---|---|
//! | nothing with the session (with or without a cookie) | 0 |
//! | reads only | 1 |
//! | writes without reading | 1 |
//! | reads, then writes | 2 |
//! | `incr` | 1 |
//! | `cycle_id` (login) or `destroy` (logout), with or without writes | 1 |
//!
//! # Cookies
//! Signed with the configured key ([`Config`](crate::Config)), `HttpOnly`, `SameSite=Lax`, `Path=/`,
//! `Secure` (turn off only for plain-http development with
//! [`with_secure(false)`](SessionLayer::with_secure)), optionally with the `__Host-` prefix. Old keys
//! still verify (key rotation). `Set-Cookie` is sent only when a session is created, gets a new id, or
//! is destroyed. A cookie that fails verification, is malformed, or names a session Redis does not have
//! is ignored: the visitor gets a fresh session, with a fresh id, when the handler first writes.
//!
//! # Expiry
//! * **Idle timeout** ([`with_idle_timeout`](SessionLayer::with_idle_timeout), default 24 h; per
//!   session with [`Session::set_idle_timeout`]): the key's TTL. Reads push it back at most once per
//!   tenth of the timeout, so read-only traffic does not write on every request.
//! * **Absolute timeout** ([`with_absolute_timeout`](SessionLayer::with_absolute_timeout), default
//!   7 days): counted from creation (or the last [`cycle_id`](Session::cycle_id)); activity never
//!   extends it.
//!
//! # Owners: log out everywhere
//! [`Session::set_owner`] ties a session to a user id; [`SessionStore::destroy_owner`] destroys every
//! session of that user, in two round trips, without scanning keys. The index is a sorted set of
//! session ids, each listed until a time its session cannot outlive: an owned session's TTL is
//! capped at its index entry, and while the session is used its entry is pushed forward (to `7/4`
//! of the idle timeout ahead, when less than `5/4` is left; off the request's path, about once per
//! idle timeout). So the index always lists every live session of its owner, and it ends at most
//! one idle timeout after the last of them. A logout that has read the session (so knows the owner)
//! also takes it out of the index in the same round trip.

mod cookie;
mod fields;
mod layer;
pub(crate) mod store;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use self::fields::Fields;
pub use self::layer::{ResponseFuture, SessionLayer, SessionMissing, SessionService};
use self::store::{Delta, Expiry, Loaded, Save, SaveMode, SaveOutcome};
use crate::client::RedisClient;
use crate::error::{Error, Result};
use crate::keys::{self, SessionId};

/// Settings of one [`SessionLayer`], shared by every request it handles.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) client: RedisClient,
    pub(crate) cookie: cookie::CookieConfig,
    /// Keyed HMAC states of the client's current and old keys.
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
    /// [`Error::InvalidName`] for an empty or over-long owner; [`Error::Unavailable`] /
    /// [`Error::OutcomeUnknown`] when Redis does not answer.
    pub async fn destroy_owner(&self, owner: &str) -> Result<usize> {
        store::destroy_owner(&self.client, owner).await
    }
}

/// A visitor's session, taken as an axum extractor in handlers behind a [`SessionLayer`].
///
/// Cheap to clone (all clones are one session). See the [module docs](self) for how reads and writes
/// reach Redis.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

/// A request's `Cookie` header values (reference-counted clones, not copies).
pub(crate) struct CookieHeaders {
    pub(crate) first: Option<http::HeaderValue>,
    pub(crate) rest: Vec<http::HeaderValue>,
}

struct Inner {
    settings: Arc<Settings>,
    /// The request's `Cookie` headers; ours is found and verified on first use.
    cookies: CookieHeaders,
    /// Set by every method; an untouched session costs nothing after the handler either.
    touched: AtomicBool,
    state: tokio::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The cookie has been verified (or found absent) and `id` set from it.
    resolved: bool,
    /// The id whose data is (or is believed to be) in Redis. `None`: a new session.
    id: Option<SessionId>,
    load: LoadState,
    changes: Fields<Change>,
    clear: bool,
    owner: Option<String>,
    idle_override_ms: Option<u64>,
    cycle: bool,
    /// Sessions to delete at save time (destroyed in this request), with their owner when known.
    destroy: Vec<(SessionId, Option<String>)>,
    /// What the response must tell the browser.
    cookie: CookieAction,
}

impl State {
    /// Nothing buffered: no write, no destroy, no new id.
    fn is_clean(&self) -> bool {
        self.destroy.is_empty()
            && self.changes.is_empty()
            && !self.clear
            && self.owner.is_none()
            && self.idle_override_ms.is_none()
            && !self.cycle
    }
}

#[derive(Default)]
enum LoadState {
    #[default]
    NotLoaded,
    /// Read in this request and absent (or expired).
    Missing,
    Present(Loaded),
}

enum Change {
    Set(Vec<u8>),
    Remove,
}

/// What the response must say about the cookie.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum CookieAction {
    #[default]
    None,
    Set(SessionId, Duration),
    Remove,
}

impl Session {
    pub(crate) fn new(settings: Arc<Settings>, cookies: CookieHeaders) -> Session {
        Session {
            inner: Arc::new(Inner {
                settings,
                cookies,
                touched: AtomicBool::new(false),
                state: tokio::sync::Mutex::new(State::default()),
            }),
        }
    }

    fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    fn client(&self) -> &RedisClient {
        &self.inner.settings.client
    }

    /// Locks the state, verifying the cookie on first use.
    async fn state(&self) -> tokio::sync::MutexGuard<'_, State> {
        self.inner.touched.store(true, Ordering::Relaxed);
        let mut state = self.inner.state.lock().await;
        if !state.resolved {
            state.resolved = true;
            let settings = self.settings();
            let cookies = &self.inner.cookies;
            state.id = cookie::find_in(
                cookies.first.iter().chain(&cookies.rest),
                &settings.cookie.name,
            )
            .and_then(|raw| settings.verifier.verify(raw));
            if state.id.is_none() {
                state.load = LoadState::Missing;
            }
        }
        state
    }

    /// Loads the session if this request has not yet; afterwards `state.load` is Missing or Present.
    async fn ensure_loaded(&self, state: &mut State) -> Result<()> {
        if let (LoadState::NotLoaded, Some(id)) = (&state.load, &state.id) {
            let loaded = store::load(self.client(), id, self.settings().expiry).await?;
            crate::observe::session_loaded();
            match loaded {
                Some(loaded) => state.load = LoadState::Present(loaded),
                None => {
                    // Unknown, expired or destroyed id: never adopted; a write gets a fresh id.
                    state.id = None;
                    state.load = LoadState::Missing;
                }
            }
        }
        Ok(())
    }

    /// The value stored under `key`, decoded from JSON; `None` if absent. The first read of a request
    /// costs one round trip; later reads are served from memory, and see this request's own changes.
    ///
    /// # Errors
    /// [`Error::Decode`] naming the key if the stored value is not a `T`; [`Error::Unavailable`] when
    /// Redis does not answer in time.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let mut state = self.state().await;
        if !state.clear && !state.changes.contains_key(key) {
            self.ensure_loaded(&mut state).await?;
        }
        // Decoded from the buffer in place (under the lock): no copy of the stored bytes.
        let raw = match state.changes.get(key) {
            Some(Change::Set(v)) => Some(v.as_slice()),
            Some(Change::Remove) => None,
            None if state.clear => None,
            None => match &state.load {
                LoadState::Present(loaded) => loaded.fields.get(key).map(Vec::as_slice),
                _ => None,
            },
        };
        raw.map(|bytes| {
            serde_json::from_slice(bytes).map_err(|source| Error::Decode {
                key: key.to_owned(),
                source,
            })
        })
        .transpose()
    }

    /// Every key of the session with its JSON value (including this request's own changes); empty for
    /// a visitor without a session. Reads the session if needed (one round trip).
    ///
    /// # Errors
    /// [`Error::Decode`] naming the key if a stored value is not JSON; [`Error::Unavailable`] when
    /// Redis does not answer in time.
    pub async fn entries(&self) -> Result<std::collections::BTreeMap<String, serde_json::Value>> {
        let mut state = self.state().await;
        if !state.clear {
            self.ensure_loaded(&mut state).await?;
        }
        let mut raw: std::collections::BTreeMap<&str, &[u8]> = match (&state.load, state.clear) {
            (LoadState::Present(loaded), false) => loaded
                .fields
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect(),
            _ => Default::default(),
        };
        for (k, change) in &state.changes {
            match change {
                Change::Set(v) => {
                    raw.insert(k, v);
                }
                Change::Remove => {
                    raw.remove(k.as_str());
                }
            }
        }
        raw.into_iter()
            .map(|(k, v)| {
                serde_json::from_slice(v)
                    .map(|v| (k.to_owned(), v))
                    .map_err(|source| Error::Decode {
                        key: k.to_owned(),
                        source,
                    })
            })
            .collect()
    }

    /// Stores `value` (as JSON) under `key`, written to Redis after the handler. Costs no round trip now.
    ///
    /// # Errors
    /// [`Error::InvalidName`] for an empty key, a key over 256 bytes or one starting with `$`;
    /// [`Error::TooLarge`] if the value, or the session with it, is over the layer's limits (nothing is
    /// recorded then); [`Error::Encode`] if `value` does not serialize.
    pub async fn insert<T: Serialize>(&self, key: &str, value: T) -> Result<()> {
        keys::validate_session_field(key)?;
        let bytes = serde_json::to_vec(&value).map_err(|source| Error::Encode {
            key: key.to_owned(),
            source,
        })?;
        let limit = self.settings().max_value_bytes;
        if key.len() + bytes.len() > limit {
            return Err(Error::TooLarge {
                key: key.to_owned(),
                size: key.len() + bytes.len(),
                limit,
            });
        }
        let mut state = self.state().await;
        if let LoadState::Present(_) | LoadState::Missing = state.load {
            let size = projected_size(&state, Some((key, bytes.len())));
            let limit = self.settings().max_session_bytes;
            if size > limit {
                return Err(Error::TooLarge {
                    key: "<session>".into(),
                    size,
                    limit,
                });
            }
        }
        state.changes.insert(key.to_owned(), Change::Set(bytes));
        Ok(())
    }

    /// Removes `key`, written to Redis after the handler. Costs no round trip now.
    ///
    /// # Errors
    /// [`Error::InvalidName`] for a key herd would never store.
    pub async fn remove(&self, key: &str) -> Result<()> {
        keys::validate_session_field(key)?;
        let mut state = self.state().await;
        state.changes.insert(key.to_owned(), Change::Remove);
        Ok(())
    }

    /// Removes every key (the session and its id stay). Written after the handler.
    pub async fn clear(&self) {
        let mut state = self.state().await;
        state.changes.clear();
        state.clear = true;
    }

    /// Adds `by` to the integer under `key` (absent counts as 0) atomically in Redis and returns the
    /// new value. Runs now, in one round trip that also carries any changes buffered so far; creates the
    /// session if there is none.
    ///
    /// # Errors
    /// [`Error::NotAnInteger`] if `key` holds something else (nothing is written);
    /// [`Error::Unavailable`] / [`Error::OutcomeUnknown`] when Redis does not answer;
    /// [`Error::SessionGone`] if the session was read in this request and ended meanwhile.
    pub async fn incr(&self, key: &str, by: i64) -> Result<i64> {
        keys::validate_session_field(key)?;
        let mut state = self.state().await;
        // The common counter, nothing else buffered: straight to Redis, without building a save.
        // (Nothing is buffered, so an error here leaves nothing to drop.)
        if state.is_clean() && state.id.is_some() && !self.client().is_cluster() {
            if let Some(n) = self.incr_without_script(&mut state, key, by).await? {
                return Ok(n);
            }
        }
        let n = self.flush(&mut state, Some((key.to_owned(), by))).await?;
        Ok(n.unwrap_or_default())
    }

    /// Gives the session a new id, keeping its data (call it on login, against session fixation). The
    /// old id stops working. Applied after the handler, together with any other change, in one round
    /// trip. Also restarts the absolute timeout.
    pub async fn cycle_id(&self) {
        let mut state = self.state().await;
        if state.id.is_some() {
            state.cycle = true;
        }
    }

    /// Deletes the session from Redis and tells the browser to drop the cookie (logout). Applied after
    /// the handler, in one round trip. Changes made afterwards in the same request start a new session.
    pub async fn destroy(&self) {
        let mut state = self.state().await;
        if let Some(id) = state.id.take() {
            let owner = match &state.load {
                LoadState::Present(l) => l.owner.clone(),
                _ => None,
            };
            state.destroy.push((id, owner));
        }
        state.load = LoadState::Missing;
        state.changes.clear();
        state.clear = false;
        state.cycle = false;
        state.owner = None;
        state.idle_override_ms = None;
    }

    /// Ties the session to an owner (typically the user id) so that
    /// [`SessionStore::destroy_owner`] can end all of that owner's sessions. Applied after the handler.
    ///
    /// # Errors
    /// [`Error::InvalidName`] for an empty owner or one over 256 bytes.
    pub async fn set_owner(&self, owner: &str) -> Result<()> {
        keys::validate_owner(owner)?;
        let mut state = self.state().await;
        state.owner = Some(owner.to_owned());
        Ok(())
    }

    /// The session's owner, if one was set (reads the session: one round trip if not loaded yet).
    ///
    /// # Errors
    /// [`Error::Unavailable`] when Redis does not answer in time.
    pub async fn owner(&self) -> Result<Option<String>> {
        let mut state = self.state().await;
        if let Some(owner) = &state.owner {
            return Ok(Some(owner.clone()));
        }
        self.ensure_loaded(&mut state).await?;
        Ok(match &state.load {
            LoadState::Present(loaded) => loaded.owner.clone(),
            _ => None,
        })
    }

    /// Sets this session's idle timeout (e.g. longer for "remember me"); it still never outlives the
    /// absolute timeout. Applied after the handler.
    pub async fn set_idle_timeout(&self, timeout: Duration) {
        let mut state = self.state().await;
        state.idle_override_ms = Some(timeout.as_millis().clamp(1, u64::MAX as u128) as u64);
    }

    /// True if the visitor has no stored session (no valid cookie, or its session has ended). Reads the
    /// session if needed (one round trip).
    ///
    /// # Errors
    /// [`Error::Unavailable`] when Redis does not answer in time.
    pub async fn is_empty(&self) -> Result<bool> {
        let mut state = self.state().await;
        self.ensure_loaded(&mut state).await?;
        Ok(matches!(state.load, LoadState::Missing) && state.changes.is_empty())
    }

    /// A handle for operations beyond this session ("log out everywhere").
    pub fn store(&self) -> SessionStore {
        SessionStore::new(self.client().clone())
    }

    /// Whether the handler used the session at all (if not, there is nothing to commit).
    pub(crate) fn is_touched(&self) -> bool {
        self.inner.touched.load(Ordering::Relaxed)
    }

    /// What the layer must do after the handler when nothing is buffered (the common read-only
    /// request): `Some(cookie action)` without any future to await, or `None` if there are writes
    /// to apply with [`commit`](Self::commit).
    pub(crate) fn commit_if_clean(&self) -> Option<CookieAction> {
        if !self.is_touched() {
            return Some(CookieAction::None);
        }
        let mut state = self.inner.state.try_lock().ok()?;
        if !state.is_clean() {
            return None;
        }
        self.refresh_if_due(&mut state);
        Some(std::mem::take(&mut state.cookie))
    }

    /// Applies the buffered changes (called by the layer after the handler). Returns what the response
    /// must say about the cookie.
    pub(crate) async fn commit(&self) -> Result<CookieAction> {
        if !self.is_touched() {
            return Ok(CookieAction::None);
        }
        let mut state = self.inner.state.lock().await;
        self.flush(&mut state, None).await?;
        Ok(std::mem::take(&mut state.cookie))
    }

    /// Pushes the idle timeout (and the owner's index) forward if the load found it due, off the
    /// request's path: a late refresh loses nothing.
    fn refresh_if_due(&self, state: &mut State) {
        if let (LoadState::Present(loaded), Some(id)) = (&mut state.load, state.id) {
            if std::mem::take(&mut loaded.index_due) {
                // Refreshes the idle timeout too.
                loaded.needs_refresh = false;
                self.spawn_index_bump(id, loaded.owner.clone(), loaded.timing.idle);
            } else if std::mem::take(&mut loaded.needs_refresh) {
                let client = self.client().clone();
                let expiry = self.settings().expiry;
                tokio::spawn(async move {
                    if let Err(e) = store::touch(&client, &id, expiry).await {
                        tracing::debug!(error = %e, "herd: session TTL refresh failed");
                    }
                });
            }
        }
    }

    /// Writes everything buffered (plus an increment) in one round trip where possible.
    ///
    /// When the outcome is unknown (no reply in time) or the session ended, the buffered changes are
    /// dropped: sending them again later (at commit, after a failed `incr`) would be a blind retry of
    /// a write that may have been applied, or a write into a session that is gone. When Redis
    /// refused the write before applying anything (not an integer, too large, unavailable), they stay
    /// buffered, as the handler may go on.
    async fn flush(&self, state: &mut State, incr: Option<(String, i64)>) -> Result<Option<i64>> {
        // Boxed: the write paths make a large state machine, which would otherwise be part of (and
        // moved with) every handler future that calls `incr`, and of the layer's.
        let result = Box::pin(self.flush_once(state, incr)).await;
        if let Err(Error::OutcomeUnknown { .. } | Error::SessionGone) = &result {
            state.changes.clear();
            state.clear = false;
            state.owner = None;
            state.idle_override_ms = None;
            state.cycle = false;
        }
        result
    }

    async fn flush_once(
        &self,
        state: &mut State,
        incr: Option<(String, i64)>,
    ) -> Result<Option<i64>> {
        for (id, owner) in std::mem::take(&mut state.destroy) {
            store::destroy(self.client(), &id, owner.as_deref()).await?;
            crate::observe::session_destroyed();
            // A session created later in this request replaces this with `Set`.
            state.cookie = CookieAction::Remove;
        }
        let mut delta = Delta {
            clear: state.clear,
            set: Vec::new(),
            remove: Vec::new(),
            owner: state.owner.clone(),
            idle_override_ms: state.idle_override_ms,
            incr,
        };
        for (field, change) in &state.changes {
            match change {
                Change::Set(v) => delta.set.push((field.clone(), v.clone())),
                Change::Remove => delta.remove.push(field.clone()),
            }
        }
        if delta.is_empty() && !state.cycle {
            self.refresh_if_due(state);
            return Ok(None);
        }
        if state.id.is_none() && !has_content(&delta) {
            // Clearing or removing keys of a session that does not exist: nothing to store.
            state.changes.clear();
            state.clear = false;
            return Ok(None);
        }

        let settings = self.settings();
        let expiry = settings.expiry;
        let read_before = matches!(state.load, LoadState::Present(_));
        // Check the whole session's size in Redis only when it was not read here and fields are
        // set (removals and meta shrink or keep the size; an increment adds one integer at most).
        let max_bytes = match &state.load {
            LoadState::NotLoaded if !delta.set.is_empty() => settings.max_session_bytes,
            _ => 0,
        };
        if !matches!(state.load, LoadState::NotLoaded) {
            let size = projected_size(state, None);
            if size > settings.max_session_bytes {
                return Err(Error::TooLarge {
                    key: "<session>".into(),
                    size,
                    limit: settings.max_session_bytes,
                });
            }
        }
        let loaded_owner = match &state.load {
            LoadState::Present(l) => l.owner.clone(),
            _ => None,
        };
        let known_owner = state.owner.clone().or_else(|| loaded_owner.clone());

        // Without a script where the request's knowledge makes one unnecessary (not on a cluster,
        // where a session being moved to a new id, marked `$m`, must not be written to).
        let scriptless = !state.cycle && !self.client().is_cluster();
        let plain = !delta.clear && delta.owner.is_none() && delta.idle_override_ms.is_none();
        // (An increment alone on an existing session never gets here: `incr` sends it itself.)
        // Read, then write (the generic read-modify-write): the load gave the timing record and
        // the size, so no script is needed (see `store::save_loaded`).
        if let (LoadState::Present(loaded), Some(id), true) = (
            &mut state.load,
            state.id,
            scriptless && plain && delta.incr.is_none(),
        ) {
            let outcome =
                store::save_loaded(self.client(), &id, &delta, loaded.timing, expiry).await?;
            if outcome == store::WriteOutcome::Gone {
                return Err(Error::SessionGone);
            }
            crate::observe::session_saved(false);
            if std::mem::take(&mut loaded.index_due) {
                self.spawn_index_bump(id, loaded.owner.clone(), loaded.timing.idle);
            }
            for (k, v) in delta.set {
                loaded.fields.insert(k, v);
            }
            for k in delta.remove {
                loaded.fields.remove(&k);
            }
            loaded.needs_refresh = false;
            state.changes.clear();
            return Ok(None);
        }

        let mut mode = match (&state.id, state.cycle) {
            (None, _) => SaveMode::New,
            (Some(_), true) => SaveMode::Cycle,
            (Some(_), false) => SaveMode::Existing,
        };
        // The idle timeout the session will have, as far as this request knows (for the index).
        let idle_ms = delta
            .idle_override_ms
            .or(match &state.load {
                LoadState::Present(l) => l.timing.idle,
                _ => None,
            })
            .unwrap_or(store::ms(expiry.idle));
        let mut attempts = 0;
        let (final_id, outcome) = loop {
            attempts += 1;
            // Fresh ids only where needed: each costs a call to the OS random generator.
            let (id, new_id) = match (mode, state.id) {
                (SaveMode::New, _) | (_, None) => (SessionId::generate(), None),
                (SaveMode::Cycle, Some(id)) => (id, Some(SessionId::generate())),
                (SaveMode::Existing, Some(id)) => (id, None),
            };
            // A new id, or a new owner, goes into the owner's index (with the save, index first).
            let index_owner = match mode {
                SaveMode::New | SaveMode::Cycle => known_owner.as_deref(),
                SaveMode::Existing => state.owner.as_deref(),
            };
            let index = index_owner.map(|owner| store::IndexUpdate {
                owner,
                until: store::index_target(store::now_ms(), idle_ms),
            });
            let outcome = store::save(
                self.client(),
                Save {
                    mode,
                    id: &id,
                    new_id: new_id.as_ref(),
                    delta: &delta,
                    expiry,
                    max_bytes,
                    index,
                },
            )
            .await?;
            match outcome {
                SaveOutcome::Gone if !read_before && attempts < 3 => {
                    // A blind write into a session that ended: the changes start a fresh session
                    // (never under the old id).
                    state.id = None;
                    state.load = LoadState::Missing;
                    if !has_content(&delta) {
                        state.changes.clear();
                        state.clear = false;
                        state.cycle = false;
                        return Ok(None);
                    }
                    mode = SaveMode::New;
                }
                SaveOutcome::IdTaken if attempts < 3 => {}
                outcome => break (new_id.unwrap_or(id), outcome),
            }
        };
        let n = match outcome {
            SaveOutcome::Applied {
                incr,
                owner,
                indexed,
            } => {
                crate::observe::session_saved(mode == SaveMode::New);
                match (mode, &known_owner, &owner, indexed) {
                    (SaveMode::Cycle, None, Some(owner), Some(indexed))
                        if !self.client().is_cluster() =>
                    {
                        // A blind cycle of an owned session on one server: the script moved the
                        // data (owner and index coverage included) to the new id; list the new id
                        // too (rare: a second round trip). If that fails, the new session must not
                        // live unlisted: it is removed, and the error reported.
                        let mut pipe = redis::pipe();
                        let now = store::now_ms();
                        store::add_owner_index(
                            &mut pipe,
                            self.client(),
                            owner,
                            &final_id,
                            now,
                            indexed,
                        );
                        let listed = self
                            .client()
                            .run(
                                true,
                                |mut c| async move { pipe.query_async::<()>(&mut c).await },
                            )
                            .await;
                        if let Err(e) = listed {
                            let _ = store::destroy(self.client(), &final_id, None).await;
                            state.cookie = CookieAction::Remove;
                            return Err(e);
                        }
                    }
                    (_, _, Some(owner), Some(indexed))
                        if store::index_due(indexed, idle_ms, store::now_ms(), u64::MAX) =>
                    {
                        self.spawn_index_bump(final_id, Some(owner.clone()), Some(idle_ms));
                    }
                    _ => {}
                }
                incr
            }
            SaveOutcome::Gone => return Err(Error::SessionGone),
            SaveOutcome::IdTaken => {
                return Err(Error::Unavailable {
                    reason: "could not allocate a session id".into(),
                    source: None,
                })
            }
            SaveOutcome::TooLarge { size } => {
                return Err(Error::TooLarge {
                    key: "<session>".into(),
                    size,
                    limit: settings.max_session_bytes,
                })
            }
            SaveOutcome::NotAnInteger => {
                return Err(Error::NotAnInteger {
                    key: delta.incr.map(|(k, _)| k).unwrap_or_default(),
                })
            }
        };

        // Bring the in-memory view up to date with what is now stored.
        if matches!(mode, SaveMode::New | SaveMode::Cycle) {
            state.cookie = CookieAction::Set(final_id, expiry.absolute);
        }
        let mut view = match std::mem::take(&mut state.load) {
            LoadState::Present(l) => Some(l),
            LoadState::Missing => Some(Loaded::default()),
            LoadState::NotLoaded => None,
        };
        if let Some(view) = &mut view {
            if delta.clear {
                view.fields.clear();
            }
            for (k, v) in delta.set {
                view.fields.insert(k, v);
            }
            for k in delta.remove {
                view.fields.remove(&k);
            }
            if let Some((k, _)) = &delta.incr {
                view.fields.insert(k.clone(), n.to_string().into_bytes());
            }
            if let Some(owner) = delta.owner {
                view.owner = Some(owner);
            }
            view.needs_refresh = false;
            view.index_due = false;
        }
        state.load = match view {
            Some(v) => LoadState::Present(v),
            None => LoadState::NotLoaded,
        };
        state.id = Some(final_id);
        state.changes.clear();
        state.clear = false;
        state.cycle = false;
        state.owner = None;
        state.idle_override_ms = None;
        Ok(Some(n))
    }

    /// `incr` on an existing session with nothing else to write, without a script (see
    /// `store::incr_existing`): `Some(new value)`, or `None` when the session turned out to have
    /// ended before this request (the caller then starts a fresh one). Not on a cluster, nor with a
    /// new id pending.
    async fn incr_without_script(
        &self,
        state: &mut State,
        field: &str,
        by: i64,
    ) -> Result<Option<i64>> {
        let Some(id) = state.id else {
            return Ok(None);
        };
        let expiry = self.settings().expiry;
        let (known, owner) = match &state.load {
            LoadState::Present(l) => (Some(l.timing), l.owner.clone()),
            _ => (None, None),
        };
        match store::incr_existing(self.client(), &id, field, by, expiry, known).await? {
            store::IncrOutcome::Applied(n, timing) => {
                crate::observe::session_saved(false);
                if timing.index_due(store::now_ms(), expiry) {
                    self.spawn_index_bump(id, owner, timing.idle);
                }
                if let LoadState::Present(view) = &mut state.load {
                    view.fields
                        .insert(field.to_owned(), n.to_string().into_bytes());
                    view.needs_refresh = false;
                    view.index_due = false;
                }
                Ok(Some(n))
            }
            store::IncrOutcome::NotAnInteger => Err(Error::NotAnInteger {
                key: field.to_owned(),
            }),
            store::IncrOutcome::Gone if known.is_some() => Err(Error::SessionGone),
            store::IncrOutcome::Gone => {
                // Ended before this request: the increment starts a fresh session.
                state.id = None;
                state.load = LoadState::Missing;
                Ok(None)
            }
        }
    }

    /// Pushes the owner's index forward off the request's path (see `store::bump_index`), for a
    /// session with its own idle timeout `idle_ms` (`None`: the layer's).
    fn spawn_index_bump(&self, id: SessionId, owner: Option<String>, idle_ms: Option<u64>) {
        let client = self.client().clone();
        let expiry = self.settings().expiry;
        let idle_ms = idle_ms.unwrap_or(store::ms(expiry.idle));
        tokio::spawn(async move {
            if let Err(e) = store::bump_index(&client, &id, expiry, owner, idle_ms).await {
                tracing::debug!(error = %e, "herd: pushing a session's owner index forward failed");
            }
        });
    }
}

/// Whether a delta would put anything into a session that does not exist yet.
fn has_content(delta: &Delta) -> bool {
    !delta.set.is_empty()
        || delta.incr.is_some()
        || delta.owner.is_some()
        || delta.idle_override_ms.is_some()
}

/// The session's size (user field names + values) once the buffered changes (and `extra`) apply.
/// Only meaningful when the session has been loaded (or is new).
fn projected_size(state: &State, extra: Option<(&str, usize)>) -> usize {
    let replaced = |k: &str| state.changes.contains_key(k) || extra.is_some_and(|(e, _)| e == k);
    let mut size = 0;
    if !state.clear {
        if let LoadState::Present(loaded) = &state.load {
            size += loaded
                .fields
                .iter()
                .filter(|(k, _)| !replaced(k))
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        }
    }
    for (k, change) in &state.changes {
        if let (Change::Set(v), false) = (change, extra.is_some_and(|(e, _)| e == k)) {
            size += k.len() + v.len();
        }
    }
    if let Some((k, len)) = extra {
        size += k.len() + len;
    }
    size
}
