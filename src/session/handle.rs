//! The [`Session`] handle: buffers a request's changes and asks the planner and the store to
//! apply them (see the [module docs](super)).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::fields::Fields;
use super::plan::{self, Buffered, Change, Known, Limits, WritePlan};
use super::store::{self, Destroyed, Executed, Found, Loaded};
use super::timing::{ms, now_ms, MAX_MS};
use super::{cookie, CookieAction, CookieHeaders, SessionStore, Settings};
use crate::client::RedisClient;
use crate::error::{Error, Result};
use crate::keys::{self, SessionId};

/// A visitor's session, taken as an axum extractor in handlers behind a
/// [`SessionLayer`](super::SessionLayer).
///
/// Cheap to clone (all clones are one session). See the [module docs](super) for how reads and
/// writes reach Redis.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

struct Inner {
    settings: Arc<Settings>,
    /// The request's `Cookie` headers; ours is found and verified on first use.
    cookies: CookieHeaders,
    /// The handler called a method of the session: only then is there anything to do after it.
    used: AtomicBool,
    /// The cookie names an id that was cycled away (another request logged in): every use of the
    /// session fails with [`Error::SessionGone`], and the response carries no `Set-Cookie`.
    cycled_away: AtomicBool,
    state: tokio::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The cookie has been verified (or found absent) and `id` set from it.
    resolved: bool,
    /// The id whose data is (or is believed to be) in Redis. `None`: no session (yet).
    id: Option<SessionId>,
    load: LoadState,
    changes: Fields<Change>,
    clear: bool,
    owner: Option<String>,
    idle_override_ms: Option<u64>,
    cycle: bool,
    /// Sessions to delete at save time (destroyed in this request), with their owner when known;
    /// each leaves the list only once Redis confirmed it.
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

    /// Forgets the buffered changes (not the destroys).
    fn drop_changes(&mut self) {
        self.changes.clear();
        self.clear = false;
        self.owner = None;
        self.idle_override_ms = None;
        self.cycle = false;
    }
}

#[derive(Default)]
enum LoadState {
    #[default]
    NotLoaded,
    /// Read in this request and absent (or expired), or destroyed in it.
    Missing,
    /// Read (or created) in this request: what Redis held after this request's last round trip,
    /// plus nothing else (buffered changes live in `State`).
    Present(Loaded),
}

impl Session {
    pub(crate) fn new(settings: Arc<Settings>, cookies: CookieHeaders) -> Session {
        Session {
            inner: Arc::new(Inner {
                settings,
                cookies,
                used: AtomicBool::new(false),
                cycled_away: AtomicBool::new(false),
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
        self.inner.used.store(true, Ordering::Relaxed);
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

    /// The request's cookie names an id that was cycled away: from now on the session only answers
    /// [`Error::SessionGone`], and nothing buffered is written.
    fn cycled_away(&self, state: &mut State) -> Error {
        self.inner.cycled_away.store(true, Ordering::Relaxed);
        state.drop_changes();
        state.destroy.clear();
        state.id = None;
        state.load = LoadState::Missing;
        state.cookie = CookieAction::None;
        Error::SessionGone
    }

    /// Whether the request's cookie named an id that was cycled away (see the module docs): the
    /// response then carries no `Set-Cookie`, so it cannot undo the login that cycled it.
    pub(crate) fn is_cycled_away(&self) -> bool {
        self.inner.cycled_away.load(Ordering::Relaxed)
    }

    /// Loads the session if this request has not yet; afterwards `state.load` is Missing or Present.
    async fn ensure_loaded(&self, state: &mut State) -> Result<()> {
        if self.is_cycled_away() {
            return Err(Error::SessionGone);
        }
        if let (LoadState::NotLoaded, Some(id)) = (&state.load, &state.id) {
            let found = store::load(self.client(), id, self.settings().expiry).await?;
            crate::observe::session_loaded();
            match found {
                Found::Session(loaded) => state.load = LoadState::Present(loaded),
                Found::Missing => {
                    // Unknown, expired or destroyed id: never adopted; a write gets a fresh id.
                    state.id = None;
                    state.load = LoadState::Missing;
                }
                Found::Cycled => return Err(self.cycled_away(state)),
            }
        }
        Ok(())
    }

    /// The value stored under `key`, decoded from JSON; `None` if absent. The first read of a request
    /// costs one round trip; later reads are served from memory, and see this request's own changes.
    ///
    /// # Errors
    /// [`Error::Decode`] naming the key if the stored value is not a `T`; [`Error::Unavailable`] when
    /// Redis does not answer in time. [`Error::SessionGone`] when the cookie names an id that
    /// was cycled away (see the [module docs](super)).
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
    /// Redis does not answer in time. [`Error::SessionGone`] when the cookie names an id that
    /// was cycled away (see the [module docs](super)).
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
    /// [`Error::Unavailable`] when Redis could not be asked (nothing is written, the buffered changes
    /// stay); [`Error::OutcomeUnknown`] when the reply was lost (the increment may have been applied:
    /// do not repeat it); [`Error::SessionGone`] if the session was read in this request and ended
    /// meanwhile, or its id was cycled away.
    pub async fn incr(&self, key: &str, by: i64) -> Result<i64> {
        keys::validate_session_field(key)?;
        let mut state = self.state().await;
        let n = self.flush(&mut state, Some((key, by))).await?;
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
    /// [`Error::Unavailable`] when Redis does not answer in time. [`Error::SessionGone`] when the cookie names an id that
    /// was cycled away (see the [module docs](super)).
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
        state.idle_override_ms = Some(ms(timeout).clamp(1, MAX_MS));
    }

    /// True if the visitor has no stored session (no valid cookie, or its session has ended). Reads the
    /// session if needed (one round trip).
    ///
    /// # Errors
    /// [`Error::Unavailable`] when Redis does not answer in time. [`Error::SessionGone`] when the cookie names an id that
    /// was cycled away (see the [module docs](super)).
    pub async fn is_empty(&self) -> Result<bool> {
        let mut state = self.state().await;
        self.ensure_loaded(&mut state).await?;
        Ok(matches!(state.load, LoadState::Missing) && state.changes.is_empty())
    }

    /// A handle for operations beyond this session ("log out everywhere").
    pub fn store(&self) -> SessionStore {
        SessionStore::new(self.client().clone())
    }

    /// Whether the handler used the session at all (if not, there is nothing to do after it).
    pub(crate) fn is_used(&self) -> bool {
        self.inner.used.load(Ordering::Relaxed)
    }

    /// What the layer must do after the handler when nothing is buffered (the common read-only
    /// request): `Some(outcome)` without any future to await, or `None` if there are writes
    /// to apply with [`commit`](Self::commit).
    pub(crate) fn commit_if_clean(&self) -> Option<Result<CookieAction>> {
        if !self.is_used() {
            return Some(Ok(CookieAction::None));
        }
        if self.is_cycled_away() {
            return Some(Err(Error::SessionGone));
        }
        let mut state = self.inner.state.try_lock().ok()?;
        if !state.is_clean() {
            return None;
        }
        self.refresh_if_due(&mut state);
        Some(Ok(std::mem::take(&mut state.cookie)))
    }

    /// Applies the buffered changes (called by the layer after the handler). Returns what the response
    /// must say about the cookie.
    pub(crate) async fn commit(&self) -> Result<CookieAction> {
        if !self.is_used() {
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
                self.spawn_touch(id);
            }
        }
    }

    /// Pushes the session's idle timeout back off the request's path: a late refresh loses nothing.
    fn spawn_touch(&self, id: SessionId) {
        let client = self.client().clone();
        let expiry = self.settings().expiry;
        tokio::spawn(async move {
            if let Err(e) = store::touch(&client, &id, expiry).await {
                tracing::debug!(error = %e, "herd: session TTL refresh failed");
            }
        });
    }

    /// Writes everything buffered (plus an increment): the destroys, then one save planned by
    /// [`plan::plan`] and run by [`store::execute`], whose report replaces this request's view.
    ///
    /// When the outcome is unknown (no reply in time) or the session ended, the buffered changes are
    /// dropped: sending them again later (at commit, after a failed `incr`) would be a blind retry of
    /// a write that may have been applied, or a write into a session that is gone. When Redis
    /// refused the write before applying anything (not an integer, too large, unavailable), they stay
    /// buffered, as the handler may go on.
    async fn flush(&self, state: &mut State, incr: Option<(&str, i64)>) -> Result<Option<i64>> {
        if self.is_cycled_away() {
            return Err(Error::SessionGone);
        }
        // Boxed: the write paths make a large state machine, which would otherwise be part of (and
        // moved with) every handler future that calls `incr`, and of the layer's.
        let result = Box::pin(self.flush_inner(state, incr)).await;
        if let Err(Error::OutcomeUnknown { .. } | Error::SessionGone) = &result {
            state.drop_changes();
        }
        result
    }

    async fn flush_inner(
        &self,
        state: &mut State,
        incr: Option<(&str, i64)>,
    ) -> Result<Option<i64>> {
        while let Some((id, owner)) = state.destroy.first() {
            let destroyed = store::destroy(self.client(), id, owner.as_deref()).await?;
            if destroyed == Destroyed::Cycled {
                return Err(self.cycled_away(state));
            }
            state.destroy.remove(0);
            crate::observe::session_destroyed();
            // A session created later in this request replaces this with `Set`.
            state.cookie = CookieAction::Remove;
        }
        let settings = self.settings();
        let expiry = settings.expiry;
        let known = match (&state.load, state.id.is_some()) {
            (_, false) | (LoadState::Missing, _) => Known::Absent,
            (LoadState::NotLoaded, true) => Known::Unread,
            (LoadState::Present(loaded), true) => Known::Read {
                owner: loaded.owner.as_deref(),
                idle_ms: loaded.timing.idle,
                size: projected_size(state, None),
            },
        };
        let buffered = Buffered {
            changes: &state.changes,
            clear: state.clear,
            owner: state.owner.as_deref(),
            idle_override_ms: state.idle_override_ms,
            cycle: state.cycle,
            incr,
        };
        let limits = Limits {
            idle_ms: ms(expiry.idle),
            max_session_bytes: settings.max_session_bytes,
        };
        let save = match plan::plan(&buffered, known, limits, now_ms()) {
            WritePlan::Nothing => {
                self.refresh_if_due(state);
                return Ok(None);
            }
            WritePlan::Discard => {
                state.drop_changes();
                return Ok(None);
            }
            WritePlan::TooLarge { size } => return Err(too_large(size, settings)),
            WritePlan::Save(save) => save,
        };
        let stored = match store::execute(self.client(), &save, state.id, expiry).await? {
            Executed::Stored(stored) => stored,
            Executed::Dropped => {
                state.id = None;
                state.load = LoadState::Missing;
                state.drop_changes();
                return Ok(None);
            }
            Executed::Gone => return Err(Error::SessionGone),
            Executed::Cycled => return Err(self.cycled_away(state)),
            Executed::TooLarge { size } => return Err(too_large(size, settings)),
            Executed::NotAnInteger => {
                return Err(Error::NotAnInteger {
                    key: incr.map(|(k, _)| k.to_owned()).unwrap_or_default(),
                })
            }
        };
        crate::observe::session_saved(stored.created);

        // What Redis now holds replaces the view: the timing record and owner as the save wrote
        // them; the fields where this request knows them all (it read them, or created them).
        let delta = save.delta;
        let mut view = match std::mem::take(&mut state.load) {
            _ if stored.created => Some(Loaded::default()),
            LoadState::Present(view) => Some(view),
            LoadState::Missing | LoadState::NotLoaded => None,
        };
        if let Some(view) = &mut view {
            if delta.clear {
                view.fields.clear();
            }
            for (k, v) in delta.set {
                view.fields.insert(k, v);
            }
            for k in &delta.remove {
                view.fields.remove(k);
            }
            if let Some((k, _)) = &delta.incr {
                view.fields
                    .insert(k.clone(), stored.incr.to_string().into_bytes());
            }
            view.timing = stored.timing;
            view.owner = stored.owner.clone();
            view.needs_refresh = false;
            view.index_due = false;
        }
        state.load = match view {
            Some(view) => LoadState::Present(view),
            None => LoadState::NotLoaded,
        };
        if stored.new_id {
            state.cookie = CookieAction::Set(stored.id, expiry.absolute);
        }
        state.id = Some(stored.id);
        state.drop_changes();
        if stored.owner.is_some() && stored.timing.index_due(now_ms(), expiry) {
            // Refreshes the idle timeout too.
            self.spawn_index_bump(stored.id, stored.owner, stored.timing.idle);
        } else if stored.refresh_due {
            self.spawn_touch(stored.id);
        }
        Ok(delta.incr.map(|_| stored.incr))
    }

    /// Pushes the owner's index forward off the request's path (see `owners::bump_index`), for a
    /// session with its own idle timeout `idle_ms` (`None`: the layer's).
    fn spawn_index_bump(&self, id: SessionId, owner: Option<String>, idle_ms: Option<u64>) {
        let client = self.client().clone();
        let expiry = self.settings().expiry;
        let idle_ms = idle_ms.unwrap_or(ms(expiry.idle));
        tokio::spawn(async move {
            if let Err(e) = store::bump_index(&client, &id, expiry, owner, idle_ms).await {
                tracing::debug!(error = %e, "herd: pushing a session's owner index forward failed");
            }
        });
    }
}

fn too_large(size: usize, settings: &Settings) -> Error {
    Error::TooLarge {
        key: "<session>".into(),
        size,
        limit: settings.max_session_bytes,
    }
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
