//! The circuit breaker: what the client knows of Redis' health, from its own traffic and, when it is
//! idle or the breaker is open, from a `PING` probe. The rules are documented once, in the
//! [client module docs](super).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often the probe task wakes up; while the breaker is open, it sends a `PING` each time.
pub(crate) const PROBE_EVERY: Duration = Duration::from_millis(200);
/// With no answer from Redis for this long (an idle client), the probe task sends a `PING`.
pub(crate) const IDLE_PROBE_AFTER: Duration = Duration::from_secs(2);
/// Redis must have been silent this long (unanswered calls, none answered in between) before the
/// breaker opens: one dropped connection that redis-rs reconnects at once, a call cut short by a
/// request deadline that was nearly spent, or a Redis far away (100 ms per round trip) says
/// nothing about Redis being down.
pub(crate) const MIN_SILENCE: Duration = Duration::from_millis(500);

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// The state of a client's circuit breaker (see the [client module docs](super)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Redis answers: calls go through.
    Closed,
    /// Redis stopped answering: calls fail at once with
    /// [`Error::Unavailable`](crate::Error::Unavailable) until a probe gets an answer.
    Open,
    /// A probe is in flight; calls still fail at once until it is answered.
    HalfOpen,
}

impl BreakerState {
    /// `"closed"`, `"open"` or `"half-open"`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }
}

/// What a client knows of Redis' health right now ([`RedisClient::health`](super::RedisClient::health)).
#[derive(Clone, Copy, Debug)]
pub struct RedisHealth {
    /// The breaker's state.
    pub state: BreakerState,
    /// When the breaker last opened or closed (`None`: closed since the client was made).
    pub since: Option<SystemTime>,
    /// How many times the breaker opened since the client was made.
    pub opened: u64,
}

/// A round trip's outcome as the breaker sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Heard {
    /// Redis answered (a value or an error reply: either way it is alive).
    Answer,
    /// No answer: timed out, refused, dropped, I/O error.
    Silence,
}

/// Lock-free: one atomic load per call on the fast path, one relaxed store per answer.
#[derive(Debug)]
pub(crate) struct Breaker {
    /// False without a probe task (no tokio runtime at hand): nothing could close it again.
    enabled: bool,
    origin: Instant,
    state: AtomicU8,
    /// Microseconds from `origin` to the last answer Redis gave (the client's creation at first).
    last_answer_us: AtomicU64,
    /// Microseconds from `origin` to the start of the oldest call unanswered since the last answer
    /// (`u64::MAX`: none).
    silent_since_us: AtomicU64,
    /// Unix milliseconds of the last open or close (0: never).
    changed_unix_ms: AtomicU64,
    opened: AtomicU64,
    /// Wakes the calls waiting for a pooled connection when the breaker opens: they fail at once
    /// rather than wait for a connection to a Redis that does not answer.
    opening: tokio::sync::Notify,
}

impl Breaker {
    pub(crate) fn new(enabled: bool) -> Breaker {
        Breaker {
            enabled,
            origin: Instant::now(),
            state: AtomicU8::new(CLOSED),
            last_answer_us: AtomicU64::new(0),
            silent_since_us: AtomicU64::new(u64::MAX),
            changed_unix_ms: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            opening: tokio::sync::Notify::new(),
        }
    }

    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_micros()).unwrap_or(u64::MAX)
    }

    pub(crate) fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            CLOSED => BreakerState::Closed,
            OPEN => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }

    pub(crate) fn health(&self) -> RedisHealth {
        let changed = self.changed_unix_ms.load(Ordering::Relaxed);
        RedisHealth {
            state: self.state(),
            since: (changed != 0).then(|| UNIX_EPOCH + Duration::from_millis(changed)),
            opened: self.opened.load(Ordering::Relaxed),
        }
    }

    /// Whether a call may go out now: only while closed.
    #[inline]
    pub(crate) fn admits(&self) -> bool {
        self.state.load(Ordering::Acquire) == CLOSED
    }

    /// Feeds the outcome of a call that started at `started` and ended at `ended`.
    pub(crate) fn record(&self, started: Instant, ended: Instant, heard: Heard) {
        let ended_us = self.micros(ended);
        match heard {
            Heard::Answer => {
                // A plain store: two racing answers may leave the earlier one, a few µs off.
                if self.last_answer_us.load(Ordering::Relaxed) < ended_us {
                    self.last_answer_us.store(ended_us, Ordering::Relaxed);
                }
                if self.silent_since_us.load(Ordering::Relaxed) != u64::MAX {
                    self.silent_since_us.store(u64::MAX, Ordering::Relaxed);
                }
                if self.state.load(Ordering::Acquire) != CLOSED {
                    self.close();
                }
            }
            Heard::Silence => {
                let started_us = self.micros(started);
                // Redis answered someone while this call waited: busy, not gone.
                if self.last_answer_us.load(Ordering::Relaxed) >= started_us {
                    return;
                }
                let since = self
                    .silent_since_us
                    .fetch_min(started_us, Ordering::Relaxed)
                    .min(started_us);
                // Half-open: the probe went unanswered, open again at once.
                let half_open = self.state.load(Ordering::Acquire) == HALF_OPEN;
                if half_open || ended_us.saturating_sub(since) >= MIN_SILENCE.as_micros() as u64 {
                    self.open();
                }
            }
        }
    }

    fn open(&self) {
        if !self.enabled {
            return;
        }
        match self.state.load(Ordering::Acquire) {
            CLOSED
                if self
                    .state
                    .compare_exchange(CLOSED, OPEN, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok() =>
            {
                let now = unix_ms();
                self.changed_unix_ms.store(now, Ordering::Relaxed);
                self.opened.fetch_add(1, Ordering::Relaxed);
                crate::observe::breaker(true, now);
                self.opening.notify_waiters();
                tracing::warn!(
                    "herd: Redis is not answering; failing fast (503) until a probe gets an answer"
                );
            }
            HALF_OPEN => {
                // The probe went unanswered: open again, still "open since" the first opening.
                let _ = self.state.compare_exchange(
                    HALF_OPEN,
                    OPEN,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
            _ => {}
        }
    }

    fn close(&self) {
        let previous = self.state.swap(CLOSED, Ordering::AcqRel);
        if previous != CLOSED {
            let now = unix_ms();
            self.changed_unix_ms.store(now, Ordering::Relaxed);
            crate::observe::breaker(false, now);
            tracing::info!("herd: Redis answers again; calls go through");
        }
    }

    /// Whether Redis answered any call since `at`.
    pub(crate) fn answered_since(&self, at: Instant) -> bool {
        self.last_answer_us.load(Ordering::Relaxed) >= self.micros(at)
    }

    /// A future that completes when the breaker next opens.
    pub(crate) fn opening(&self) -> tokio::sync::futures::Notified<'_> {
        self.opening.notified()
    }

    /// Called by the probe task at each tick: whether to send a `PING` now. While open, the
    /// breaker moves to half-open for the probe's duration.
    pub(crate) fn wants_probe(&self, now: Instant) -> bool {
        match self.state.load(Ordering::Acquire) {
            OPEN => self
                .state
                .compare_exchange(OPEN, HALF_OPEN, Ordering::AcqRel, Ordering::Acquire)
                .is_ok(),
            CLOSED => {
                let quiet = self
                    .micros(now)
                    .saturating_sub(self.last_answer_us.load(Ordering::Relaxed));
                quiet >= IDLE_PROBE_AFTER.as_micros() as u64
            }
            _ => false,
        }
    }

    /// A probe ended without a verdict of its own (it could not even be sent): back to open, so
    /// that the next tick probes again.
    pub(crate) fn probe_abandoned(&self) {
        let _ = self
            .state
            .compare_exchange(HALF_OPEN, OPEN, Ordering::AcqRel, Ordering::Acquire);
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(b: &Breaker, ms: u64) -> Instant {
        b.origin + Duration::from_millis(ms)
    }

    #[test]
    fn silence_with_no_answer_since_the_call_began_opens() {
        let b = Breaker::new(true);
        b.record(at(&b, 10), at(&b, 20), Heard::Answer);
        b.record(at(&b, 30), at(&b, 1030), Heard::Silence);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.admits());
        assert!(b.health().since.is_some());
        assert_eq!(b.health().opened, 1);
    }

    #[test]
    fn silence_while_others_got_answers_is_busy_not_down() {
        let b = Breaker::new(true);
        // A call started at 30 ms timed out at 1030 ms, but another was answered at 500 ms.
        b.record(at(&b, 100), at(&b, 500), Heard::Answer);
        b.record(at(&b, 30), at(&b, 1030), Heard::Silence);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.admits());
    }

    #[test]
    fn the_probe_half_opens_and_its_answer_closes() {
        let b = Breaker::new(true);
        b.record(at(&b, 5), at(&b, 600), Heard::Silence);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.wants_probe(at(&b, 200)));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(
            !b.admits(),
            "traffic still fails fast while the probe is out"
        );
        assert!(!b.wants_probe(at(&b, 400)), "one probe at a time");
        // The probe is unanswered: open again, then a new probe, answered.
        b.record(at(&b, 200), at(&b, 300), Heard::Silence);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.wants_probe(at(&b, 400)));
        b.record(at(&b, 400), at(&b, 401), Heard::Answer);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(
            b.health().opened,
            1,
            "half-open → open is not a new opening"
        );
    }

    #[test]
    fn an_idle_client_probes_and_a_busy_one_does_not() {
        let b = Breaker::new(true);
        b.record(at(&b, 0), at(&b, 1000), Heard::Answer);
        assert!(!b.wants_probe(at(&b, 1500)));
        assert!(b.wants_probe(at(&b, 3000)));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn silence_must_last_before_it_opens() {
        let b = Breaker::new(true);
        // A dropped connection, at once reconnected and answered: stays closed.
        b.record(at(&b, 10), at(&b, 11), Heard::Silence);
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(at(&b, 12), at(&b, 13), Heard::Answer);
        // A call cut short after 300 ms by its request's deadline: stays closed.
        b.record(at(&b, 20), at(&b, 320), Heard::Silence);
        assert_eq!(b.state(), BreakerState::Closed);
        // Refusals for 500 ms since that call began, no answer in between: open.
        b.record(at(&b, 400), at(&b, 401), Heard::Silence);
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(at(&b, 519), at(&b, 520), Heard::Silence);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn a_breaker_without_a_probe_never_opens() {
        let b = Breaker::new(false);
        b.record(at(&b, 5), at(&b, 2000), Heard::Silence);
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
