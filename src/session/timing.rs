//! Time arithmetic of sessions: the expiry settings, the timing record `$c`, the owner index's
//! schedule. Pure functions of their inputs (the clock is read only by [`now_ms`]).
//!
//! Every duration is clamped to [`MAX_MS`] (a hundred years) when it becomes milliseconds, so no sum
//! of a time and a duration overflows, and every figure stays exact in Lua (whose numbers are
//! doubles) and legal for `PEXPIRE`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The longest duration herd stores, ms: a hundred years.
pub(crate) const MAX_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// Expiry settings in force for one layer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Expiry {
    pub(crate) idle: Duration,
    pub(crate) absolute: Duration,
}

/// A session's timing record (field `$c`): `created:touched:idle:indexed`, unix ms (idle in ms),
/// empty parts absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Timing {
    /// Start of the absolute timeout.
    pub(crate) created: u64,
    /// When a save last wrote the timing record; a write of user fields only pushes the TTL back
    /// without recording it, so the TTL may run later than `touched` says, never earlier.
    pub(crate) touched: u64,
    /// The session's own idle timeout, ms.
    pub(crate) idle: Option<u64>,
    /// Until when the owner's index lists the session; present exactly when it has an owner.
    pub(crate) indexed: Option<u64>,
}

impl Timing {
    /// Parses a record; `None` for anything herd did not write (not a session). One pass over the
    /// bytes: it runs on every load and every `incr`.
    pub(crate) fn parse(value: &[u8]) -> Option<Timing> {
        let mut parts = [0u64; 4];
        let mut lens = [0u8; 4];
        let mut part = 0;
        for &b in value {
            if b.is_ascii_digit() {
                if lens[part] == 19 {
                    return None;
                }
                parts[part] = parts[part] * 10 + u64::from(b - b'0');
                lens[part] += 1;
            } else if b == b':' && part < 3 {
                part += 1;
            } else {
                return None;
            }
        }
        let given = |i: usize| (lens[i] > 0).then_some(parts[i]);
        Some(Timing {
            created: given(0).filter(|c| *c > 0)?,
            touched: parts[1],
            idle: given(2),
            indexed: given(3),
        })
    }

    /// The session's idle timeout, ms: its own, else the layer's.
    pub(crate) fn idle(&self, expiry: Expiry) -> u64 {
        self.idle.unwrap_or(ms(expiry.idle)).min(MAX_MS)
    }

    pub(crate) fn deadline(&self, expiry: Expiry) -> u64 {
        self.created.saturating_add(ms(expiry.absolute))
    }

    /// The latest time the key may live until: the absolute deadline, and the index's coverage.
    pub(crate) fn limit(&self, expiry: Expiry) -> u64 {
        let deadline = self.deadline(expiry);
        self.indexed.map_or(deadline, |x| x.min(deadline))
    }

    /// The TTL a write at `now` gives the key; `None` when the session is over.
    pub(crate) fn ttl(&self, now: u64, expiry: Expiry) -> Option<u64> {
        let left = self.limit(expiry).saturating_sub(now);
        (left > 0).then(|| self.idle(expiry).min(left))
    }

    /// Whether pushing the key's TTL back to `now + ttl` (`ttl` from [`ttl`](Self::ttl)) is worth
    /// a write. The key expires at `touched + idle` at the latest (capped); the push is due once it
    /// would move that by more than a tenth of the idle timeout: sessions then expire between 90%
    /// and 100% of the idle timeout after the last request, and a busy visitor costs at most one
    /// refresh per tenth of the idle timeout, not one per request.
    pub(crate) fn refresh_due(&self, now: u64, ttl: u64, expiry: Expiry) -> bool {
        let idle = self.idle(expiry);
        let expires = self.touched.saturating_add(idle).min(self.limit(expiry));
        expires.saturating_add(idle / 10) < now.saturating_add(ttl)
    }

    /// Whether the owner's index should be pushed forward (see [`bump_index`]).
    pub(crate) fn index_due(&self, now: u64, expiry: Expiry) -> bool {
        self.indexed.is_some_and(|indexed| {
            index_due(indexed, self.idle(expiry), now, self.deadline(expiry))
        })
    }
}

/// Whether an index coverage running until `indexed` should be pushed forward at `now`: less than
/// `5/4` of the idle timeout is left, and it does not yet reach the session's `deadline` (pass
/// `u64::MAX` when it is not known).
pub(crate) fn index_due(indexed: u64, idle_ms: u64, now: u64, deadline: u64) -> bool {
    indexed
        < now
            .saturating_add(idle_ms.saturating_add(idle_ms / 4))
            .min(deadline)
}

/// How far an owner's index is pushed forward at `now`: `7/4` of the idle timeout.
pub(crate) fn index_target(now: u64, idle_ms: u64) -> u64 {
    now.saturating_add(idle_ms.saturating_add(idle_ms / 4 * 3))
}

/// Now, unix ms.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A duration in ms, at most [`MAX_MS`].
pub(crate) fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(MAX_MS)) as u64
}

#[cfg(test)]
mod tests {
    use super::Timing;

    #[test]
    fn the_longest_durations_do_not_overflow() {
        use super::{index_due, index_target, ms, Expiry, MAX_MS};
        use std::time::Duration;
        let expiry = Expiry {
            idle: Duration::MAX,
            absolute: Duration::MAX,
        };
        assert_eq!(ms(Duration::MAX), MAX_MS);
        let t = Timing {
            created: 2,
            touched: 2,
            idle: Some(u64::MAX),
            indexed: Some(u64::MAX),
        };
        assert_eq!(t.ttl(2, expiry), Some(MAX_MS));
        assert!(!t.index_due(u64::MAX, expiry));
        assert!(index_due(0, u64::MAX, u64::MAX, u64::MAX));
        assert_eq!(index_target(u64::MAX, u64::MAX), u64::MAX);
    }

    #[test]
    fn timing_records_parse_and_refuse_garbage() {
        let t = |s: &str| Timing::parse(s.as_bytes());
        assert_eq!(
            t("1700000000000:1700000000123::"),
            Some(Timing {
                created: 1_700_000_000_000,
                touched: 1_700_000_000_123,
                idle: None,
                indexed: None,
            })
        );
        assert_eq!(
            t("5:6:7:8"),
            Some(Timing {
                created: 5,
                touched: 6,
                idle: Some(7),
                indexed: Some(8),
            })
        );
        // Older records: created alone, or created:touched.
        assert_eq!(t("5").map(|t| (t.created, t.touched)), Some((5, 0)));
        assert_eq!(t("5:6").map(|t| (t.created, t.touched)), Some((5, 6)));
        for bad in [
            "",
            ":1::",
            "0:1::",
            "x",
            "1:2:3:4:5",
            "1;2",
            "-1",
            "99999999999999999999",
        ] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
    }
}
