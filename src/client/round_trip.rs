//! Round trips on the shared connection: refused while the breaker is open, counted, bounded by
//! the command timeout and the request's deadline, and classified (see the
//! [client module docs](super#deadlines-and-fail-fast-what-redis-trouble-costs-a-request)).

use std::future::Future;
use std::time::Duration;

use redis::{Cmd, Value};

use super::breaker::Heard;
#[cfg(feature = "cluster")]
use super::cluster;
use super::connection::Connection;
use super::{deadline, Effect, RedisClient, Shared};
use crate::error::{Error, Result};

/// Round trips on the shared connection, bounded by the command timeout and the request's deadline.
impl RedisClient {
    /// The multiplexed connection (connecting it first on a cluster or through Sentinel), for a
    /// round trip that may write or not (`effect`).
    pub(super) async fn connection(&self, effect: Effect) -> redis::RedisResult<Connection> {
        let _ = effect; // used on a cluster only
        match &self.inner.shared {
            Shared::Single(c) => Ok(Connection::Single(c.clone())),
            #[cfg(feature = "cluster")]
            Shared::Cluster(cluster) => cluster
                .conn
                .get_or_try_init(|| cluster.client.get_async_connection())
                .await
                .map(|c| {
                    Connection::Cluster(cluster::RoundTrip {
                        conn: c.clone(),
                        effect,
                        redirects: std::sync::Arc::clone(&cluster.redirects),
                    })
                }),
            #[cfg(feature = "sentinel")]
            Shared::Sentinel(master) => master.connection().await.map(Connection::Sentinel),
        }
    }

    /// Runs one round trip on the shared multiplexed connection, bounded by the command timeout and
    /// the request's deadline; refused at once while the breaker is open (see the module docs).
    /// `effect` says whether the command can change data (it decides how a lost reply is reported).
    /// On a cluster the command or pipeline must stay within one hash slot.
    ///
    /// Not an `async fn` of its own (nor is [`run_alongside`](Self::run_alongside)): the future
    /// is the round trip's, one level less in every handler's future (rustc's layout depth limit).
    pub(crate) fn run<'a, T, F, Fut>(
        &'a self,
        effect: Effect,
        f: F,
    ) -> impl Future<Output = Result<T>> + 'a
    where
        F: FnOnce(Connection) -> Fut + 'a,
        Fut: Future<Output = redis::RedisResult<T>> + 'a,
        T: 'a,
    {
        self.shared_round_trip(effect, Gate::Counted, f)
    }

    /// [`run`](Self::run) for a request sent at the same time as another, counted one (on a cluster,
    /// commands for other slots that travel in parallel): not counted as a round trip of its own.
    pub(crate) fn run_alongside<'a, T, F, Fut>(
        &'a self,
        effect: Effect,
        f: F,
    ) -> impl Future<Output = Result<T>> + 'a
    where
        F: FnOnce(Connection) -> Fut + 'a,
        Fut: Future<Output = redis::RedisResult<T>> + 'a,
        T: 'a,
    {
        self.shared_round_trip(effect, Gate::Uncounted, f)
    }

    /// A round trip on the shared connection: refused at once while the breaker is open (except a
    /// probe), counted (or not), bounded, and fed to the breaker.
    pub(super) async fn shared_round_trip<T, F, Fut>(
        &self,
        effect: Effect,
        gate: Gate,
        f: F,
    ) -> Result<T>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if gate != Gate::Probe && !self.inner.breaker.admits() {
            return Err(circuit_open());
        }
        if gate == Gate::Counted {
            self.count_round_trip();
        }
        let mut used = None; // the Sentinel connection the round trip went out on
        let used_slot = &mut used;
        let round_trip = async move {
            let conn = self.connection(effect).await?;
            *used_slot = conn.sentinel_generation();
            f(conn).await
        };
        let bound = self.bound()?;
        let outcome = tokio::time::timeout_at(bound.limit, round_trip).await;
        if outcome.is_err() {
            self.forget_after_timeout(used);
        }
        self.settle(effect, &bound, outcome)
    }

    /// Sends commands that may belong to different hash slots: one pipeline on a single server or
    /// Sentinel (one round trip), one command each and all at once on a cluster (one round trip of
    /// latency, one per node in load). The replies come back in order. Only for commands that are
    /// independent of each other: on a cluster their order of execution is not defined.
    pub(crate) async fn run_each(&self, effect: Effect, cmds: Vec<Cmd>) -> Result<Vec<Value>> {
        if !self.is_cluster() {
            let mut pipe = redis::pipe();
            for cmd in cmds {
                pipe.add_command(cmd);
            }
            return self
                .run(
                    effect,
                    |mut c| async move { pipe.query_async(&mut c).await },
                )
                .await;
        }
        // They go out together: one round trip of latency.
        self.count_round_trip();
        let each = cmds.into_iter().map(|cmd| async move {
            self.run_alongside(effect, |mut c| async move {
                cmd.query_async::<Value>(&mut c).await
            })
            .await
        });
        let replies = futures_util::future::join_all(each).await;
        replies.into_iter().collect()
    }

    /// Starts a bounded round trip: its limit is the earlier of the command timeout and the
    /// request's deadline (a call made once the deadline passed fails at once, nothing sent).
    /// Sync, with [`settle`](Self::settle), so that the callers await the round trip themselves:
    /// one async layer less in every handler's future.
    #[inline]
    pub(super) fn bound(&self) -> Result<Bound> {
        let started = std::time::Instant::now(); // observe: latency histogram, error counter
        let (limit, by_deadline) = self.limit(started, self.inner.config.command_timeout);
        if by_deadline && limit <= started {
            return Err(deadline_passed());
        }
        Ok(Bound {
            started,
            limit: limit.into(),
            budget: limit - started,
            by_deadline,
        })
    }

    /// Classifies a bounded round trip's outcome and feeds it to the breaker.
    pub(super) fn settle<T>(
        &self,
        effect: Effect,
        bound: &Bound,
        outcome: std::result::Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T> {
        let ended = std::time::Instant::now();
        let started = bound.started;
        let waited = ended - started;
        let breaker = &self.inner.breaker;
        let result = match outcome {
            Ok(Ok(value)) => {
                breaker.record(started, ended, Heard::Answer);
                Ok(value)
            }
            Ok(Err(e)) => {
                breaker.record(started, ended, heard(&e));
                Err(Error::from_redis(e, effect, bound.budget))
            }
            Err(_elapsed) => {
                breaker.record(started, ended, Heard::Silence);
                Err(no_reply(effect, waited, bound.by_deadline))
            }
        };
        crate::observe::redis_round_trip(waited, result.is_ok());
        result
    }

    /// When a wait that began at `now` and may last `own` must end: the earlier of `now + own` and
    /// the request's deadline; `true` when the deadline is the bound.
    #[inline]
    pub(super) fn limit(
        &self,
        now: std::time::Instant,
        own: Duration,
    ) -> (std::time::Instant, bool) {
        let own = now + own;
        match deadline::current() {
            Some(deadline) if deadline < own => (deadline, true),
            _ => (own, false),
        }
    }

    /// After a round trip timed out: through Sentinel, drops the master connection it went out on
    /// (`generation`), so the next request asks the sentinels again. A frozen or partitioned master
    /// answers nothing at all — no error ever reaches [`sentinel::MasterConnection`]'s own checks,
    /// because the timeout drops the request first — and without this herd would keep sending to
    /// it after the sentinels promoted its replica, until it thawed.
    pub(super) fn forget_after_timeout(&self, generation: Option<u64>) {
        #[cfg(feature = "sentinel")]
        if let (Shared::Sentinel(master), Some(generation)) = (&self.inner.shared, generation) {
            master.forget(generation, "no reply within the command timeout");
        }
        let _ = generation;
    }
}

/// How a round trip on the shared connection passes the breaker and the round-trip count.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Gate {
    /// A round trip of its own: refused while the breaker is open, counted.
    Counted,
    /// Sent alongside a counted one: refused while open, not counted.
    Uncounted,
    /// The breaker's probe: always sent, never counted.
    Probe,
}

/// A round trip under way: when it began, when it must end, and whether the request's deadline
/// (rather than the command timeout) is what ends it.
pub(super) struct Bound {
    pub(super) started: std::time::Instant,
    pub(super) limit: tokio::time::Instant,
    /// How long it may wait (reported by a write whose reply is lost).
    pub(super) budget: Duration,
    pub(super) by_deadline: bool,
}

/// The error of a call refused by an open breaker: nothing was sent.
pub(super) fn circuit_open() -> Error {
    Error::Unavailable {
        reason: "Redis is not answering (circuit breaker open): failing fast until a probe gets an answer".into(),
        source: None,
    }
}

/// The error of a call made after its request's deadline: nothing was sent.
pub(super) fn deadline_passed() -> Error {
    Error::Unavailable {
        reason: "the request's deadline for Redis calls has passed".into(),
        source: None,
    }
}

/// A round trip that got no reply within `waited`.
fn no_reply(effect: Effect, waited: Duration, by_deadline: bool) -> Error {
    match (effect, by_deadline) {
        (Effect::MayWrite, _) => Error::OutcomeUnknown { timeout: waited },
        (Effect::ReadOnly, true) => Error::Unavailable {
            reason: format!("no reply from Redis before the request's deadline ({waited:?})"),
            source: None,
        },
        (Effect::ReadOnly, false) => Error::Unavailable {
            reason: format!("no reply from Redis within {waited:?}"),
            source: None,
        },
    }
}

/// Whether an error means Redis answered (an error reply) or did not (no reply, no connection).
pub(super) fn heard(e: &redis::RedisError) -> Heard {
    if e.is_timeout() || e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        Heard::Silence
    } else {
        Heard::Answer
    }
}
