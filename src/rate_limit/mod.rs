//! Shared rate limits: one answer for every worker on every host, decided in Redis.
//!
//! A [`RateLimiter`] counts requests per *key* (a client IP, a session owner, an API token, a
//! route: whatever the app derives from the request) against a [`Quota`]. Each decision is one
//! round trip: one Lua script on one key (so one slot on a cluster) runs the generic cell rate
//! algorithm (GCRA) on **Redis' clock** (`TIME` inside the script): the clocks of the machines
//! that ask never enter the decision, so skew between them does not matter.
//!
//! [`RateLimitLayer`] applies a limiter to a router: a request over the limit gets `429 Too Many
//! Requests` with `Retry-After` (whole seconds, at least 1) and the IETF `RateLimit` /
//! `RateLimit-Policy` headers (draft-ietf-httpapi-ratelimit-headers-10 syntax:
//! `RateLimit-Policy: "name";q=50;w=10` and `RateLimit: "name";r=0;t=1`); a request within it
//! goes on, with the [`Decision`] in its extensions for the handler. [`RateLimiter::check`] is the
//! same decision for use inside a handler (limit logins per account, say).
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::{routing::post, Router};
//! use herd::rate_limit::{client_ip, Quota, RateLimitLayer, RateLimiter};
//!
//! # async fn run(redis: herd::RedisClient) -> herd::Result<()> {
//! // At most 5 login attempts per client IP per minute, across the whole herd.
//! let logins = RateLimiter::new(redis, "login", Quota::per(5, Duration::from_secs(60)))?;
//! let app: Router = Router::new()
//!     .route("/login", post(|| async { "welcome" }))
//!     .layer(RateLimitLayer::new(logins, client_ip));
//! # Ok(()) }
//! ```
//!
//! # The quota
//! [`Quota::per(limit, period)`](Quota::per) allows a sustained rate of `limit` requests per
//! `period`, one every `period / limit` (the *emission interval*), and a burst of `limit` requests
//! at once ([`Quota::with_burst`] changes the burst). After a burst the client gets one more
//! request each emission interval: with `Quota::per(50, 10 s)`, 50 at once, then one every 200 ms.
//! In any window of length `w`, at most `burst + w / interval` requests pass.
//!
//! # When Redis is unavailable
//! Each limiter has a policy ([`RateLimiter::when_unavailable`]): [`WhenUnavailable::Deny`] (the
//! default: the request gets `503` with `Retry-After`, for limits that protect logins and other
//! costly or sensitive routes) or [`WhenUnavailable::Allow`] (the request goes on unlimited, for
//! limits that only smooth load). A decision whose reply was lost counts as unavailable.
//!
//! # Keys in Redis
//! Limiter `name`, client key `k`: `{prefix}:rl:name:{hex(k)}`, one string (the GCRA state) that
//! expires as soon as the client is back to a full burst. Keys from requests are hex-encoded (and
//! replaced by their SHA-256 over 32 bytes), so nothing a client sends reaches a key name raw and
//! no client can make a key name long.

mod layer;

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use crate::client::{Effect, RedisClient};
use crate::error::{Error, Result};
use crate::keys::validate_name;

#[cfg(feature = "launcher")]
pub use self::layer::client_ip;
pub use self::layer::{PeerAddr, RateLimitLayer, RateLimitService};

static GCRA: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("gcra.lua")));

/// How many requests a limiter lets through: a sustained rate and a burst. See the
/// [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    limit: u32,
    period: Duration,
    burst: u32,
}

impl Quota {
    /// `limit` requests per `period` on average, with a burst of `limit` (at least 1 each; the
    /// period at least 1 ms).
    pub fn per(limit: u32, period: Duration) -> Quota {
        let limit = limit.max(1);
        Quota {
            limit,
            period: period.max(Duration::from_millis(1)),
            burst: limit,
        }
    }

    /// How many requests may come at once (at least 1).
    pub fn with_burst(mut self, burst: u32) -> Quota {
        self.burst = burst.max(1);
        self
    }

    /// The sustained number of requests per [`period`](Self::period).
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The period of the sustained rate.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// The burst.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// The time between two requests at the sustained rate, in whole microseconds (at least 1).
    fn interval_micros(&self) -> u64 {
        let micros = self.period.as_micros() / u128::from(self.limit);
        u64::try_from(micros).unwrap_or(u64::MAX).max(1)
    }
}

/// What a limiter does when Redis cannot answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WhenUnavailable {
    /// Refuse the request (`503` + `Retry-After` from the layer; the error from
    /// [`RateLimiter::check`]). The default ("fail closed").
    #[default]
    Deny,
    /// Let the request through unlimited ("fail open"); [`RateLimiter::check`] answers a
    /// [`Decision`] with [`Decision::is_unchecked`] true.
    Allow,
}

/// One limiter: a name, a quota and a policy for when Redis is unavailable; cheap to clone.
#[derive(Clone, Debug)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

#[derive(Clone, Debug)]
struct Inner {
    client: RedisClient,
    name: String,
    quota: Quota,
    when_unavailable: WhenUnavailable,
    /// `"name";q=L;w=S`, sent as `RateLimit-Policy`.
    policy_header: http::HeaderValue,
}

impl RateLimiter {
    /// A limiter named `name` (its keys live under the client's prefix, see the
    /// [module docs](self)); every worker that uses the same name and prefix shares the counts,
    /// and should use the same quota.
    ///
    /// # Errors
    /// [`Error::InvalidName`] unless the name is 1–128 characters of letters, digits and `_.:-`.
    pub fn new(client: RedisClient, name: &str, quota: Quota) -> Result<RateLimiter> {
        validate_name(name)?;
        let window = quota.period.as_secs().max(1);
        let policy = format!("\"{name}\";q={};w={window}", quota.limit);
        let policy_header = http::HeaderValue::from_str(&policy)
            .map_err(|_| Error::invalid_name(name, "not usable in a header"))?;
        Ok(RateLimiter {
            inner: Arc::new(Inner {
                client,
                name: name.to_owned(),
                quota,
                when_unavailable: WhenUnavailable::Deny,
                policy_header,
            }),
        })
    }

    /// What to do when Redis is unavailable (default [`WhenUnavailable::Deny`]).
    pub fn when_unavailable(mut self, policy: WhenUnavailable) -> RateLimiter {
        Arc::make_mut(&mut self.inner).when_unavailable = policy;
        self
    }

    /// The limiter's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The limiter's quota.
    pub fn quota(&self) -> Quota {
        self.inner.quota
    }

    /// The policy for when Redis is unavailable.
    pub fn unavailable_policy(&self) -> WhenUnavailable {
        self.inner.when_unavailable
    }

    /// Counts one request of `key` and says whether it is allowed. One round trip.
    ///
    /// ```no_run
    /// # async fn run(limiter: herd::RateLimiter, account: &str) -> herd::Result<()> {
    /// let decision = limiter.check(account).await?;
    /// if !decision.is_allowed() {
    ///     let wait = decision.retry_after();
    ///     // answer "too many attempts, try again in {wait:?}"
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// With [`WhenUnavailable::Deny`]: [`Error::Unavailable`] and [`Error::OutcomeUnknown`] when
    /// Redis cannot decide. Always: [`Error::Redis`] if the key holds something else.
    pub async fn check(&self, key: impl AsRef<[u8]>) -> Result<Decision> {
        self.check_n(key, 1).await
    }

    /// [`check`](Self::check) for a request that costs `cost` units (at least 1): allowed only if
    /// all of them are available, and then all are counted. A cost over the quota's burst is
    /// never allowed.
    ///
    /// # Errors
    /// As [`check`](Self::check).
    pub async fn check_n(&self, key: impl AsRef<[u8]>, cost: u32) -> Result<Decision> {
        match self.decide(key.as_ref(), cost.max(1)).await {
            Err(e)
                if (e.is_unavailable() || e.is_outcome_unknown())
                    && self.inner.when_unavailable == WhenUnavailable::Allow =>
            {
                tracing::warn!(limiter = %self.inner.name, "rate limit not checked (fail open): {e}");
                Ok(Decision::unchecked(self))
            }
            other => other,
        }
    }

    async fn decide(&self, key: &[u8], cost: u32) -> Result<Decision> {
        let inner = &self.inner;
        let redis_key = inner.client.keys().rate_limit(&inner.name, key);
        let mut invocation = GCRA.prepare_invoke();
        invocation
            .key(redis_key)
            .arg(inner.quota.interval_micros())
            .arg(inner.quota.burst)
            .arg(cost);
        // Boxed: the script's future nests deeply, and without the box an app's handler future
        // that awaits a check can exceed the compiler's query depth limit.
        let (allowed, remaining, retry_after, reset): (i64, i64, i64, i64) =
            Box::pin(inner.client.run(Effect::MayWrite, |mut c| async move {
                invocation.invoke_async(&mut c).await
            }))
            .await?;
        let micros = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
        Ok(Decision {
            limiter: self.clone(),
            allowed: allowed == 1,
            unchecked: false,
            remaining: u32::try_from(remaining.max(0)).unwrap_or(u32::MAX),
            retry_after: micros(retry_after),
            reset: micros(reset),
        })
    }
}

/// The answer of a [`RateLimiter`] for one request.
#[derive(Clone, Debug)]
pub struct Decision {
    limiter: RateLimiter,
    allowed: bool,
    unchecked: bool,
    remaining: u32,
    retry_after: Duration,
    reset: Duration,
}

impl Decision {
    fn unchecked(limiter: &RateLimiter) -> Decision {
        Decision {
            limiter: limiter.clone(),
            allowed: true,
            unchecked: true,
            remaining: limiter.inner.quota.burst,
            retry_after: Duration::ZERO,
            reset: Duration::ZERO,
        }
    }

    /// Whether the request may go on.
    pub fn is_allowed(&self) -> bool {
        self.allowed
    }

    /// True when Redis could not decide and the limiter fails open
    /// ([`WhenUnavailable::Allow`]): the request was let through without being counted.
    pub fn is_unchecked(&self) -> bool {
        self.unchecked
    }

    /// How many more requests the key may make right now.
    pub fn remaining(&self) -> u32 {
        self.remaining
    }

    /// For a refused request, how long until the same request would be allowed (zero when
    /// allowed).
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// `Retry-After` in whole seconds, rounded up, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        whole_seconds(self.retry_after).max(1)
    }

    /// How long until the key is back to its full burst.
    pub fn reset(&self) -> Duration {
        self.reset
    }

    /// The limiter that decided.
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// The `RateLimit` header value: `"name";r=REMAINING;t=SECONDS`, where `t` is the wait before
    /// the next request passes when none remain, else the time until the burst is full again.
    pub fn ratelimit_header(&self) -> http::HeaderValue {
        let t = if self.allowed {
            whole_seconds(self.reset)
        } else {
            self.retry_after_secs()
        };
        let value = format!("\"{}\";r={};t={t}", self.limiter.inner.name, self.remaining);
        // The name passed `validate_name` (letters, digits, `_.:-`): always a valid header.
        http::HeaderValue::from_str(&value).unwrap_or_else(|_| http::HeaderValue::from_static(""))
    }

    /// The `RateLimit-Policy` header value: `"name";q=LIMIT;w=PERIOD_SECONDS`.
    pub fn policy_header(&self) -> http::HeaderValue {
        self.limiter.inner.policy_header.clone()
    }
}

fn whole_seconds(d: Duration) -> u64 {
    d.as_micros()
        .div_ceil(1_000_000)
        .try_into()
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_intervals() {
        let q = Quota::per(50, Duration::from_secs(10));
        assert_eq!(q.interval_micros(), 200_000);
        assert_eq!(q.burst(), 50);
        assert_eq!(Quota::per(0, Duration::ZERO).interval_micros(), 1_000);
        assert_eq!(q.with_burst(0).burst(), 1);
    }

    #[test]
    fn seconds_round_up() {
        assert_eq!(whole_seconds(Duration::ZERO), 0);
        assert_eq!(whole_seconds(Duration::from_micros(1)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1000)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1001)), 2);
    }
}
