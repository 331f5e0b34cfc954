//! Leases: at most one holder across every worker and every host, with fencing tokens.
//!
//! A [`Lease`] is a named lock with a time to live, kept in Redis. [`Lease::try_acquire`] takes it
//! when it is free and hands out a [`FencingToken`] that is strictly greater than every token of
//! that lease handed out before; the holder renews it ([`LeaseGuard::renew`]) before the TTL runs
//! out, and releases it ([`LeaseGuard::release`]) when done. [`LeaseGuard::keep`] renews in the
//! background and tells the holder when the lease is lost; [`Lease::run_exclusive`] and
//! [`Lease::every`] are the "run once across the whole herd" helpers built on it.
//!
//! ```no_run
//! # async fn run(globals: herd::Globals) -> herd::Result<()> {
//! use std::time::Duration;
//! let stats = globals.group("stats")?;
//! let lease = globals.lease("nightly-report", Duration::from_secs(10))?;
//! // Every worker of every host runs this; one of them at a time runs the closure.
//! lease
//!     .every(Duration::from_secs(1), move |token| {
//!         let stats = stats.clone();
//!         async move {
//!             // Fenced: refused if a newer holder has written meanwhile.
//!             let _ = stats.incr_fenced("ticks", 1, token).await;
//!         }
//!     })
//!     .await;
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//! The guide `docs/coordination.md` explains them with the failure cases; in short:
//!
//! * **At most one holder at any instant**, given Redis' own guarantees (one server, or the master
//!   of a Sentinel group or of a cluster slot, keeping its data). A holder believes it holds the
//!   lease until *the moment it sent its last successful acquire or renew, plus the TTL*; Redis
//!   starts the TTL when it runs the command, which is later, so the holder's belief ends first
//!   (both clocks need only run at the same rate, not agree on the time).
//! * **Fencing tokens** are `max(last token + 1, Redis' clock in µs)`: strictly increasing while
//!   Redis keeps its data, and still increasing after it lost it (a restart without persistence, a
//!   Sentinel failover to a replica that missed the last write), as long as Redis' clock moved
//!   forward. Those data losses can give the lease to a second holder while the first still
//!   believes it holds it (for at most one TTL); writes made with
//!   [`Group::set_fenced`](super::Group::set_fenced) / [`incr_fenced`](super::Group::incr_fenced)
//!   are still refused from the older token once the newer one has written.
//! * **A lost lease is noticed within one renew interval** (TTL / 3 by default): the keeper's next
//!   renewal finds the lease gone, or, with Redis unreachable, the holder's own deadline passes.
//! * **A released lease is free at once**: release deletes it (only if it still holds this
//!   holder's token), and the next [`try_acquire`](Lease::try_acquire) anywhere succeeds.
//!
//! # Redis keys and round trips
//! Lease `name` is the key `{prefix}:l:{name}` (the holder's token, with the TTL) and its token
//! counter `{prefix}:l:{name}:fence` ([`Lease::every`] adds `{prefix}:l:{name}:last`, when its
//! job last ran); all share the hash tag `{name}`, so each operation is one script on one slot,
//! on every topology. Each operation is one round trip: acquire, renew and
//! release are one Lua script each (the conditional write is simpler as a script than as
//! `WATCH`/`MULTI`, and works on a cluster).

use std::future::Future;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::{ttl_millis, Globals};
use crate::client::Effect;
use crate::error::{Error, Result};
use crate::keys::validate_name;

static ACQUIRE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lease/acquire.lua")));
static RENEW: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lease/renew.lua")));
static RELEASE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lease/release.lua")));
static DUE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lease/due.lua")));
static MARK_RUN: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lease/mark_run.lua")));

/// The shortest TTL a lease accepts: below it, one slow round trip would lose the lease.
pub const MIN_LEASE_TTL: Duration = Duration::from_millis(30);

/// A number that identifies one acquisition of a lease and is strictly greater than the token of
/// every earlier acquisition of the same lease. Pass it along with every write made on behalf of
/// the lease so that whoever stores the write can refuse an older holder (see the
/// [module docs](self) and [`Group::incr_fenced`](super::Group::incr_fenced)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(u64);

impl FencingToken {
    /// A token received from elsewhere (another process, a stored write).
    pub fn new(value: u64) -> FencingToken {
        FencingToken(value)
    }

    /// The number itself.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for FencingToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A named lease with a time to live; cheap to clone. Made by [`Globals::lease`]. See the
/// [module docs](self).
#[derive(Clone, Debug)]
pub struct Lease {
    globals: Globals,
    name: Arc<str>,
    key: Arc<str>,
    fence_key: Arc<str>,
    last_run_key: Arc<str>,
    ttl: Duration,
    renew_every: Duration,
    retry_every: Duration,
}

impl Globals {
    /// The lease named `name` with time to live `ttl` (at least [`MIN_LEASE_TTL`]). Every worker
    /// that names the same lease under the same prefix competes for the same lock. Renewed every
    /// `ttl / 3` by [`LeaseGuard::keep`]; waiting acquirers try again every `ttl / 3` too.
    ///
    /// ```no_run
    /// # async fn run(globals: herd::Globals) -> herd::Result<()> {
    /// let lease = globals.lease("cleanup", std::time::Duration::from_secs(5))?;
    /// if let Some(guard) = lease.try_acquire().await? {
    ///     // ... the work only one worker may do ...
    ///     guard.release().await?;
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidName`] unless the name is 1–128 characters of letters, digits and `_.:-`;
    /// [`Error::Config`] for a TTL under [`MIN_LEASE_TTL`].
    pub fn lease(&self, name: &str, ttl: Duration) -> Result<Lease> {
        validate_name(name)?;
        if ttl < MIN_LEASE_TTL {
            return Err(Error::Config(format!(
                "lease `{name}`: a TTL of {ttl:?} is under the minimum of {MIN_LEASE_TTL:?}"
            )));
        }
        let keys = &self.settings.keys;
        Ok(Lease {
            globals: self.clone(),
            key: keys.lease(name).into(),
            fence_key: keys.lease_fence(name).into(),
            last_run_key: keys.lease_last_run(name).into(),
            name: name.into(),
            ttl,
            renew_every: ttl / 3,
            retry_every: ttl / 3,
        })
    }
}

impl Lease {
    /// The lease's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The lease's time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How often [`LeaseGuard::keep`] renews (default `ttl / 3`, kept between 1 ms and `ttl / 2`):
    /// a lost lease is noticed within this interval.
    pub fn with_renew_every(mut self, every: Duration) -> Lease {
        self.renew_every = every.clamp(Duration::from_millis(1), self.ttl / 2);
        self
    }

    /// How often [`acquire`](Self::acquire), [`run_exclusive`](Self::run_exclusive) and
    /// [`every`](Self::every) try again while another worker holds the lease or Redis is
    /// unavailable (default `ttl / 3`, at least 1 ms).
    pub fn with_retry_every(mut self, every: Duration) -> Lease {
        self.retry_every = every.max(Duration::from_millis(1));
        self
    }

    /// Takes the lease if nobody holds it: `Some` guard with a new [`FencingToken`], or `None`
    /// while another holder has it. One round trip.
    ///
    /// # Errors
    /// [`Error::Unavailable`]; [`Error::OutcomeUnknown`] when the reply was lost (the lease may
    /// then be held by nobody you know of until its TTL runs out).
    pub async fn try_acquire(&self) -> Result<Option<LeaseGuard>> {
        let sent = Instant::now();
        let mut invocation = ACQUIRE.prepare_invoke();
        invocation
            .key(&*self.key)
            .key(&*self.fence_key)
            .arg(ttl_millis(self.ttl));
        let (acquired, value): (i64, u64) = self
            .globals
            .client
            .run(Effect::MayWrite, |mut c| async move {
                invocation.invoke_async(&mut c).await
            })
            .await?;
        if acquired != 1 {
            return Ok(None);
        }
        Ok(Some(LeaseGuard {
            lease: self.clone(),
            token: FencingToken(value),
            deadline: sent + self.ttl,
        }))
    }

    /// Waits until the lease is free and takes it, trying every
    /// [`retry_every`](Self::with_retry_every).
    ///
    /// # Errors
    /// As [`try_acquire`](Self::try_acquire): the first error ends the wait.
    pub async fn acquire(&self) -> Result<LeaseGuard> {
        loop {
            if let Some(guard) = self.try_acquire().await? {
                return Ok(guard);
            }
            tokio::time::sleep(self.retry_every).await;
        }
    }

    /// The token of the current holder, `None` while the lease is free. One round trip. For a
    /// resource that checks tokens itself: a write carrying a lower token comes from an older
    /// holder.
    ///
    /// # Errors
    /// [`Error::Unavailable`], [`Error::Redis`] if the key holds something else.
    pub async fn holder(&self) -> Result<Option<FencingToken>> {
        let key = Arc::clone(&self.key);
        let token: Option<u64> = self
            .globals
            .client
            .run(Effect::ReadOnly, |mut c| async move {
                redis::cmd("GET").arg(&*key).query_async(&mut c).await
            })
            .await?;
        Ok(token.map(FencingToken))
    }

    /// Waits for the lease (retrying through Redis outages, logging them), keeps it renewed, and
    /// runs `job` with its token. `Some(result)` when the job finished while the lease was held;
    /// `None` when the lease was lost first: the job's future is then dropped at its next
    /// `.await`, and whatever it wrote with the token after the loss is refused by fenced writes.
    /// The lease is released when the job ends.
    pub async fn run_exclusive<F, Fut, T>(&self, job: F) -> Option<T>
    where
        F: FnOnce(FencingToken) -> Fut,
        Fut: Future<Output = T>,
    {
        let kept = Box::pin(self.acquire_patiently()).await.keep();
        let token = kept.token();
        let outcome = tokio::select! {
            out = job(token) => Some(out),
            () = kept.lost() => None,
        };
        if let Err(e) = kept.release().await {
            tracing::warn!(lease = %self.name, "releasing the lease failed (it expires by itself): {e}");
        }
        outcome
    }

    /// Runs `job` once per `interval` across every worker that runs this: whoever holds the lease
    /// calls `job` every `interval`, and when the lease is lost it goes back to waiting for it.
    /// The schedule survives handovers: each run is recorded on Redis' clock (key
    /// `{prefix}:l:{name}:last`, only while the token holds the lease), and a new holder's first
    /// run comes one `interval` after the last run of any holder (at once if that is past).
    /// Never returns: spawn it, and drop the future (or abort the task) to stop; the lease is
    /// then released. Runs never overlap: a job that takes longer than `interval` delays the
    /// next. A killed holder's runs are missed until its lease expires (at most `ttl` after its
    /// last renewal) and another worker takes it (within `retry_every`). Each run costs one round
    /// trip besides the job's own, and renewals one every `renew_every`.
    pub async fn every<F, Fut>(&self, interval: Duration, mut job: F)
    where
        F: FnMut(FencingToken) -> Fut,
        Fut: Future<Output = ()>,
    {
        let interval = interval.max(Duration::from_millis(1));
        loop {
            // Boxed, as each step below: the futures of scripts nest deeply, and the whole loop
            // unboxed can exceed the compiler's query depth limit in the app that awaits it.
            let kept = Box::pin(self.acquire_patiently()).await.keep();
            let token = kept.token();
            tracing::debug!(lease = %self.name, %token, "holding the lease");
            let wait = match Box::pin(self.until_due(interval)).await {
                Ok(wait) => wait,
                Err(e) => {
                    tracing::warn!(lease = %self.name, "reading the schedule: {e}");
                    interval
                }
            };
            let mut ticks = tokio::time::interval_at(Instant::now() + wait, interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let lost = kept.lost();
            tokio::pin!(lost);
            loop {
                tokio::select! {
                    () = &mut lost => break,
                    _ = ticks.tick() => {}
                }
                if !kept.is_held() {
                    break;
                }
                match Box::pin(self.mark_run(token)).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    // Unknown whether it was recorded: run anyway (the lease is held, the
                    // schedule is at worst one interval behind).
                    Err(e) => tracing::warn!(lease = %self.name, "recording the run: {e}"),
                }
                tokio::select! {
                    () = &mut lost => break,
                    () = job(token) => {}
                }
            }
            tracing::info!(lease = %self.name, %token, "lost the lease; waiting for it again");
            drop(kept);
        }
    }

    /// How long until the job of [`every`](Self::every) is due (Redis' clock).
    async fn until_due(&self, interval: Duration) -> Result<Duration> {
        let mut invocation = DUE.prepare_invoke();
        invocation
            .key(&*self.last_run_key)
            .arg(u64::try_from(interval.as_micros()).unwrap_or(u64::MAX));
        let micros: u64 = self
            .globals
            .client
            .run(Effect::ReadOnly, |mut c| async move {
                invocation.invoke_async(&mut c).await
            })
            .await?;
        Ok(Duration::from_micros(micros))
    }

    /// Records a run of [`every`](Self::every)'s job, if `token` still holds the lease.
    async fn mark_run(&self, token: FencingToken) -> Result<bool> {
        let mut invocation = MARK_RUN.prepare_invoke();
        invocation
            .key(&*self.key)
            .key(&*self.last_run_key)
            .arg(token.0);
        let marked: i64 = self
            .globals
            .client
            .run(Effect::MayWrite, |mut c| async move {
                invocation.invoke_async(&mut c).await
            })
            .await?;
        Ok(marked == 1)
    }

    /// [`acquire`](Self::acquire), logging errors and retrying until it succeeds.
    async fn acquire_patiently(&self) -> LeaseGuard {
        loop {
            match self.try_acquire().await {
                Ok(Some(guard)) => return guard,
                Ok(None) => {}
                Err(e) => tracing::warn!(lease = %self.name, "acquiring the lease: {e}"),
            }
            tokio::time::sleep(self.retry_every).await;
        }
    }

    /// Runs the renew or release script for `token` (`ttl`: the renewal's TTL).
    async fn conditional(
        &self,
        script: &redis::Script,
        token: FencingToken,
        ttl: Option<u64>,
    ) -> Result<bool> {
        let mut invocation = script.prepare_invoke();
        invocation.key(&*self.key).arg(token.0);
        if let Some(ttl) = ttl {
            invocation.arg(ttl);
        }
        let done: i64 = self
            .globals
            .client
            .run(Effect::MayWrite, |mut c| async move {
                invocation.invoke_async(&mut c).await
            })
            .await?;
        Ok(done == 1)
    }
}

/// One acquisition of a [`Lease`]: its token and until when this process may consider itself the
/// holder. Dropping the guard does not release the lease (that needs a round trip): call
/// [`release`](Self::release), or let the TTL run out.
#[derive(Debug)]
pub struct LeaseGuard {
    lease: Lease,
    token: FencingToken,
    /// When the TTL of the last successful acquire or renew, counted from when it was sent, ends.
    deadline: Instant,
}

impl LeaseGuard {
    /// This acquisition's fencing token.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// The lease this guard holds.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Whether the TTL of the last successful acquire or renew has not run out yet (a local
    /// check, no round trip). `false` means the lease may already belong to someone else.
    pub fn is_held(&self) -> bool {
        Instant::now() < self.deadline
    }

    /// Extends the lease by its TTL if this guard still holds it: `true` when extended, `false`
    /// when it expired or another holder has it (the guard is then useless). One round trip.
    ///
    /// # Errors
    /// [`Error::Unavailable`], [`Error::OutcomeUnknown`] (whether it was extended is unknown; the
    /// deadline is kept as it was, and a later renew may still succeed).
    pub async fn renew(&mut self) -> Result<bool> {
        let sent = Instant::now();
        let renewed = self
            .lease
            .conditional(&RENEW, self.token, Some(ttl_millis(self.lease.ttl)))
            .await?;
        if renewed {
            self.deadline = sent + self.lease.ttl;
        } else {
            self.deadline = sent.min(self.deadline);
        }
        Ok(renewed)
    }

    /// Frees the lease at once if this guard still holds it (`true`), so another worker can take
    /// it; `false` when it had already expired or passed on. One round trip.
    ///
    /// # Errors
    /// [`Error::Unavailable`], [`Error::OutcomeUnknown`]; the lease then expires by itself.
    pub async fn release(self) -> Result<bool> {
        self.lease.conditional(&RELEASE, self.token, None).await
    }

    /// Keeps the lease renewed in the background (a tokio task, every
    /// [`renew_every`](Lease::with_renew_every)) and reports its loss through [`KeptLease`].
    /// Must be called inside a tokio runtime.
    pub fn keep(self) -> KeptLease {
        let (held_tx, held_rx) = watch::channel(true);
        let (release_tx, release_rx) = oneshot::channel();
        let (released_tx, released_rx) = oneshot::channel();
        let shared = Arc::new(Mutex::new(self.deadline));
        let token = self.token;
        let name = Arc::clone(&self.lease.name);
        tokio::spawn(keeper(
            self,
            Arc::clone(&shared),
            held_tx,
            release_rx,
            released_tx,
        ));
        KeptLease {
            name,
            token,
            deadline: shared,
            held: held_rx,
            release: Some((release_tx, released_rx)),
        }
    }
}

/// What the keeper task is asked to do when the [`KeptLease`] ends.
type ReleaseRequest = oneshot::Receiver<()>;

/// Renews every `renew_every` until the lease is lost or a release is asked for. Declares the
/// lease lost when a renewal finds it gone, or when the deadline (last successful renewal sent +
/// TTL) passes without a successful renewal (Redis unreachable or slow).
async fn keeper(
    mut guard: LeaseGuard,
    deadline: Arc<Mutex<Instant>>,
    held: watch::Sender<bool>,
    mut release: ReleaseRequest,
    released: oneshot::Sender<Result<bool>>,
) {
    let renew_every = guard.lease.renew_every;
    let mut next = Instant::now() + renew_every;
    let lost = loop {
        tokio::select! {
            () = tokio::time::sleep_until(next.min(guard.deadline)) => {}
            _ = &mut release => {
                let _ = held.send(false);
                let _ = released.send(guard.release().await);
                return;
            }
        }
        if !guard.is_held() {
            break "its TTL ran out before a renewal succeeded";
        }
        next = Instant::now() + renew_every;
        let until = guard.deadline;
        let renewed = tokio::select! {
            r = guard.renew() => Some(r),
            () = tokio::time::sleep_until(until) => None,
        };
        match renewed {
            Some(Ok(true)) => {
                *deadline.lock().unwrap_or_else(|e| e.into_inner()) = guard.deadline;
            }
            Some(Ok(false)) => break "it expired or passed to another holder",
            Some(Err(e)) => {
                tracing::warn!(lease = %guard.lease.name, "renewing the lease: {e}");
            }
            None => break "its TTL ran out while a renewal was under way",
        }
    };
    *deadline.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now().min(guard.deadline);
    tracing::info!(lease = %guard.lease.name, token = %guard.token, "lease lost: {lost}");
    let _ = held.send(false);
    // Released by whoever ends the `KeptLease`: nothing left to free.
    let _ = released.send(Ok(false));
}

/// A lease kept renewed by a background task ([`LeaseGuard::keep`]). Tells when it is lost
/// ([`lost`](Self::lost), [`watch`](Self::watch)); dropping it releases the lease (in the
/// background task), as does [`release`](Self::release).
#[derive(Debug)]
pub struct KeptLease {
    name: Arc<str>,
    token: FencingToken,
    deadline: Arc<Mutex<Instant>>,
    held: watch::Receiver<bool>,
    release: Option<(oneshot::Sender<()>, oneshot::Receiver<Result<bool>>)>,
}

impl KeptLease {
    /// This acquisition's fencing token.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// The lease's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the lease is still held: the keeper has not reported a loss and the deadline of the
    /// last successful renewal has not passed (checked here, so it is right even when the keeper
    /// has not run yet, after the process was paused).
    pub fn is_held(&self) -> bool {
        *self.held.borrow()
            && Instant::now() < *self.deadline.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Completes when the lease is lost (or released). Cancel-safe.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut held = self.held.clone();
        let deadline = Arc::clone(&self.deadline);
        async move {
            loop {
                let until = *deadline.lock().unwrap_or_else(|e| e.into_inner());
                tokio::select! {
                    r = held.wait_for(|h| !*h) => { let _ = r; return; }
                    () = tokio::time::sleep_until(until) => {
                        if Instant::now() >= *deadline.lock().unwrap_or_else(|e| e.into_inner()) {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// A watch channel of "still held" (`true` until the lease is lost or released).
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.held.clone()
    }

    /// Stops renewing and frees the lease at once if still held (`true`), `false` if it had been
    /// lost already.
    ///
    /// # Errors
    /// [`Error::Unavailable`], [`Error::OutcomeUnknown`]: the lease then expires by itself
    /// within its TTL.
    pub async fn release(mut self) -> Result<bool> {
        let Some((tx, rx)) = self.release.take() else {
            return Ok(false);
        };
        let _ = tx.send(());
        rx.await.unwrap_or(Ok(false))
    }
}

impl Drop for KeptLease {
    fn drop(&mut self) {
        // The keeper task releases (one round trip) and ends.
        if let Some((tx, _)) = self.release.take() {
            let _ = tx.send(());
        }
    }
}
