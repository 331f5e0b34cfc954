//! The one error type of herd, and how each error becomes an HTTP response.
//!
//! | error | status | notes |
//! |---|---|---|
//! | [`Error::Unavailable`] (Redis down, refused, timed out, pool exhausted, `LOADING`, `READONLY`, out of memory) | 503 | with `Retry-After` |
//! | [`Error::OutcomeUnknown`] (a write was sent but its reply never came) | 503 | with `Retry-After`; the write may or may not have been applied |
//! | [`Error::SessionGone`] (the session was destroyed or expired while the request ran) | 409 | nothing was written |
//! | [`Error::Conflict`] (optimistic update retried too often) | 409 | nothing was written |
//! | [`Error::TooLarge`] | 413 | nothing was written |
//! | everything else (a bad key name, a stored value that does not decode, a Redis command error, configuration, [`Error::Unsupported`]) | 500 | |
//!
//! Response bodies are short, fixed sentences: internal causes (addresses, Redis error texts, key names)
//! are logged with `tracing`, never sent to the client.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};

use crate::client::Effect;

/// The result type of herd.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in herd.
///
/// Branch on the kind with the predicates ([`Error::is_unavailable`], [`Error::is_outcome_unknown`],
/// ...) rather than on variants where you can: the enum is `#[non_exhaustive]`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is missing or malformed (raised at startup).
    #[error("configuration: {0}")]
    Config(String),

    /// herd does not offer this operation or combination of settings on this Redis topology (for
    /// example a `WATCH` connection on Redis Cluster, or a CA file together with Sentinel). The
    /// sentence says what to use instead.
    #[error("not supported: {0}")]
    Unsupported(String),

    /// Redis cannot be reached or cannot serve right now (connection refused or dropped before the command
    /// was sent, pool wait timed out, server loading, read-only replica, out of memory). Nothing was
    /// applied; retrying later is safe.
    #[error("Redis is unavailable: {reason}")]
    Unavailable {
        /// What happened, for logs.
        reason: String,
        /// The underlying Redis error, if any.
        #[source]
        source: Option<redis::RedisError>,
    },

    /// A write was sent but no reply arrived in time (or the connection dropped while waiting): it may
    /// or may not have been applied. herd never retries such a write by itself.
    #[error("no reply from Redis within {timeout:?}: the outcome of the write is unknown")]
    OutcomeUnknown {
        /// The timeout that expired.
        timeout: Duration,
    },

    /// Redis answered a command with an error that is not about availability (for example `WRONGTYPE`).
    #[error("Redis command failed: {0}")]
    Redis(#[source] redis::RedisError),

    /// A command inside an atomic group (MULTI/EXEC) failed. Redis does not roll back: the commands of
    /// the group before and after `index` were applied.
    #[error("command {index} of the atomic group failed: {source}")]
    GroupCommandFailed {
        /// Zero-based position of the failing command in the group.
        index: usize,
        /// The error Redis returned for it.
        #[source]
        source: redis::RedisError,
    },

    /// Redis refused an atomic group before running any of it (`EXECABORT`): the command at `index`
    /// was rejected while it was queued (for example by an ACL rule or as a syntax error). Nothing
    /// was applied.
    #[error("the atomic group was refused before it ran (command {index}): {source}; nothing was applied")]
    GroupAborted {
        /// Zero-based position of the command Redis rejected.
        index: usize,
        /// The error Redis returned for it.
        #[source]
        source: redis::RedisError,
    },

    /// An atomic group, `get_many` or `update` names more variables than the limit allows.
    #[error("{len} variables in one atomic operation, over the limit of {limit}")]
    GroupTooLarge {
        /// How many the operation named.
        len: usize,
        /// The limit.
        limit: usize,
    },

    /// The session was destroyed (logout elsewhere) or expired while this request ran, after the request
    /// had read it. Its changes were not written, so a destroyed session is never resurrected.
    #[error("the session ended while this request was in flight; its changes were not saved")]
    SessionGone,

    /// An optimistic read-modify-write lost the race too many times.
    #[error("conflict: gave up after {attempts} attempts")]
    Conflict {
        /// How many attempts were made.
        attempts: u32,
    },

    /// A value (or the whole session) is over the configured size limit. Nothing was written.
    #[error("`{key}` would be {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// The key (or `"<session>"` for the whole session).
        key: String,
        /// The size it would have.
        size: usize,
        /// The configured limit.
        limit: usize,
    },

    /// A stored value could not be decoded into the requested type.
    #[error("stored value of `{key}` does not decode: {source}")]
    Decode {
        /// The key whose value is malformed.
        key: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },

    /// A value could not be encoded.
    #[error("value for `{key}` does not encode: {source}")]
    Encode {
        /// The key being written.
        key: String,
        /// The encoding error.
        #[source]
        source: serde_json::Error,
    },

    /// A key or name given to herd is not allowed (empty, too long, reserved prefix `$`, ...).
    #[error("invalid name `{name}`: {reason}")]
    InvalidName {
        /// The offending name (truncated to 64 characters).
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },

    /// `incr` on a value that is not an integer.
    #[error("`{key}` does not hold an integer")]
    NotAnInteger {
        /// The key.
        key: String,
    },
}

impl Error {
    /// Redis could not serve the request; nothing was applied; a retry later may succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }

    /// A write's reply never came: it may or may not have been applied.
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, Error::OutcomeUnknown { .. })
    }

    /// An optimistic update gave up after too many conflicts.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }

    /// The session ended while the request ran.
    pub fn is_session_gone(&self) -> bool {
        matches!(self, Error::SessionGone)
    }

    /// The HTTP status this error maps to (see the [module docs](self)).
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Unavailable { .. } | Error::OutcomeUnknown { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::SessionGone | Error::Conflict { .. } => StatusCode::CONFLICT,
            Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub(crate) fn invalid_name(name: &str, reason: &'static str) -> Self {
        let name: String = name.chars().take(64).collect();
        Error::InvalidName { name, reason }
    }

    /// Classifies a Redis error. `effect` says whether the command could have changed data, so that
    /// a lost reply becomes [`Error::OutcomeUnknown`] rather than [`Error::Unavailable`].
    pub(crate) fn from_redis(err: redis::RedisError, effect: Effect, timeout: Duration) -> Self {
        use redis::{ErrorKind, ServerErrorKind};
        if err.is_timeout() || (err.is_connection_dropped() && !err.is_connection_refusal()) {
            if effect == Effect::MayWrite {
                return Error::OutcomeUnknown { timeout };
            }
            return Error::Unavailable {
                reason: "no reply from Redis".into(),
                source: Some(err),
            };
        }
        if untrusted_certificate(&err) {
            return Error::Unavailable {
                reason:
                    "the Redis server's TLS certificate is not trusted (check HERD_REDIS_CA_FILE)"
                        .into(),
                source: Some(err),
            };
        }
        if err.is_io_error() || err.is_connection_refusal() {
            return Error::Unavailable {
                reason: "cannot connect to Redis".into(),
                source: Some(err),
            };
        }
        match err.kind() {
            // During a failover the sentinels may name no reachable master for a few seconds.
            ErrorKind::MasterNameNotFoundBySentinel | ErrorKind::NoValidReplicasFoundBySentinel => {
                Error::Unavailable {
                    reason: "Sentinel names no reachable Redis master right now (failover?)".into(),
                    source: Some(err),
                }
            }
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                | ServerErrorKind::ReadOnly
                | ServerErrorKind::MasterDown
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown,
            ) => Error::Unavailable {
                reason: "Redis cannot accept this command right now".into(),
                source: Some(err),
            },
            _ if refuses_writes(&err) => Error::Unavailable {
                reason: "Redis refuses writes (out of memory or persistence failure)".into(),
                source: Some(err),
            },
            _ => Error::Redis(err),
        }
    }

    fn public_message(&self) -> &'static str {
        match self {
            Error::Unavailable { .. } => "service temporarily unavailable, please retry",
            Error::OutcomeUnknown { .. } => {
                "the storage did not answer in time; the change may not have been saved"
            }
            Error::SessionGone => "the session ended while this request was in flight",
            Error::Conflict { .. } => "too many concurrent changes, please retry",
            Error::TooLarge { .. } => "value too large",
            _ => "internal server error",
        }
    }
}

/// `OOM` (over `maxmemory`) or `MISCONF` (persistence failing): Redis refuses writes for now.
///
/// redis-rs has no [`ErrorKind`](redis::ErrorKind) for these codes, and the error of a pipeline
/// carries its items' codes only through [`into_server_errors`](redis::RedisError::into_server_errors)
/// (`code()` answers for a single reply only), so every item's code is read there.
fn refuses_writes(err: &redis::RedisError) -> bool {
    let refuses = |code: &str| matches!(code, "OOM" | "MISCONF");
    if err.code().is_some_and(refuses) {
        return true;
    }
    err.clone()
        .into_server_errors()
        .is_some_and(|items| items.iter().any(|(_, e)| refuses(e.code())))
}

/// The server's TLS certificate did not verify against the trusted roots: rustls'
/// `InvalidCertificate`, inside the `std::io::Error` that redis-rs wraps a failed handshake in.
#[cfg(feature = "tls")]
fn untrusted_certificate(err: &redis::RedisError) -> bool {
    use std::error::Error as _;
    let Some(source) = err.source() else {
        return false;
    };
    // redis-rs keeps an I/O error as `Arc<dyn Error>`; look through it, or take it as it is.
    let io = match source.downcast_ref::<std::sync::Arc<dyn std::error::Error + Send + Sync>>() {
        Some(inner) => inner.downcast_ref::<std::io::Error>(),
        None => source.downcast_ref::<std::io::Error>(),
    };
    io.and_then(std::io::Error::get_ref)
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)))
}

/// Without the `tls` feature there is no TLS, so no certificate to distrust.
#[cfg(not(feature = "tls"))]
fn untrusted_certificate(_: &redis::RedisError) -> bool {
    false
}

/// Seconds sent in `Retry-After` with a 503.
pub(crate) const RETRY_AFTER_SECS: u64 = 1;

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "herd: request failed");
        } else {
            tracing::debug!(error = %self, "herd: request refused");
        }
        let body = serde_json::json!({ "error": self.public_message() }).to_string();
        let mut res = (status, body).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Error;
    use crate::client::Effect;

    fn classify(code: &str, detail: &str) -> Error {
        let err = redis::make_extension_error(code.to_owned(), Some(detail.to_owned()));
        Error::from_redis(err, Effect::MayWrite, Duration::from_millis(500))
    }

    #[test]
    fn out_of_memory_and_failing_persistence_are_unavailable() {
        assert!(
            classify("OOM", "command not allowed when used memory > 'maxmemory'").is_unavailable()
        );
        assert!(classify("MISCONF", "Redis is configured to save RDB snapshots").is_unavailable());
    }

    #[test]
    fn other_codes_are_command_errors() {
        assert!(matches!(
            classify("WRONGPASS", "invalid password"),
            Error::Redis(_)
        ));
        // A detail that mentions a code is not the code.
        assert!(matches!(
            classify("ERR", "OOM command not allowed"),
            Error::Redis(_)
        ));
    }

    #[test]
    fn unsupported_is_a_server_error_with_the_generic_body() {
        let err = Error::Unsupported("WATCH on a cluster".into());
        assert_eq!(err.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(err.public_message(), "internal server error");
    }
}
