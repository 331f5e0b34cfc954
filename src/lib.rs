//! Shared state for web apps that run as many processes: Redis-backed sessions for axum, shared
//! globals with atomic grouped writes, and a pre-fork launcher, so that any worker process — on one
//! machine or several — can serve any request of any visitor.
//!
//! | module | what it gives | start with |
//! |---|---|---|
//! | [`session`] | a tower layer and an extractor: lazy, one round trip per read or write, only changed fields written, never resurrecting a destroyed session, signed cookies | [`SessionLayer`], [`Session`] |
//! | [`globals`] | process-global variables in Redis: typed `get`/`set`/`incr`, `MULTI`/`EXEC` groups, optimistic read-modify-write, broadcast channels; leases with fencing tokens for run-once jobs | [`Globals`], [`Lease`] |
//! | [`rate_limit`] | a rate limit shared by every worker and host: one script per request, `429` with `Retry-After` and `RateLimit` headers | [`RateLimitLayer`], [`RateLimiter`] |
//! | [`launcher`] | N worker processes on one socket: restarts, rolling reload, scaling, systemd (Unix) | [`launcher::Launcher`] |
//! | [`client`], [`config`] | the Redis connection sessions and globals share, on one server, Redis Cluster or Sentinel, with TLS | [`RedisClient`], [`Config`] |
//! | [`error`] | one error type, and how each error becomes an HTTP response | [`Error`] |
//! | [`observe`] | the per-request `tracing` span and Prometheus metrics | [`observe`] |
//!
//! ```no_run
//! use axum::{extract::State, routing::get, Router};
//! use herd::{Config, Globals, RedisClient, Session, SessionLayer};
//!
//! async fn visit(session: Session, State(globals): State<Globals>) -> herd::Result<String> {
//!     let mine = session.incr("visits", 1).await?;             // this visitor: 1 round trip
//!     let all = globals.group("stats")?.incr("hits", 1).await?; // every worker: 1 round trip
//!     Ok(format!("your visit {mine}, visit {all} of all"))
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let redis = RedisClient::connect(Config::from_env()?).await?;
//! let app: Router = Router::new()
//!     .route("/", get(visit))
//!     .with_state(Globals::new(redis.clone()))
//!     .layer(SessionLayer::from_env(redis)?); // HERD_SECRET signs the cookies
//! # Ok(()) }
//! ```
//!
//! Guides (the two commands, a comparison with tower-sessions, express-session and PM2, failure
//! modes, scaling out, configuration) are the repository's `README.md` and `docs/` folder.
//!
//! # Cargo features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `launcher` | yes | [`launcher`] (Unix only: on other platforms the feature compiles to nothing) |
//! | `cli` | no | the `herd` command |
//! | `cluster` | no | Redis Cluster (`redis+cluster://`) |
//! | `sentinel` | no | Redis Sentinel (`redis+sentinel://`) |
//! | `tls` | no | TLS (`rediss://`) with rustls |
//! | `metrics` | no | Prometheus metrics in [`observe`] |
//! | `testing` | no | the `testing` module: real Redis for your own tests and examples, a private `redis-server` on a free port or a small Redis Cluster |
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod client;
pub mod config;
pub mod error;
pub mod globals;
pub(crate) mod keys;
#[cfg(all(unix, feature = "launcher"))]
#[cfg_attr(docsrs, doc(cfg(all(unix, feature = "launcher"))))]
pub mod launcher;
pub mod observe;
pub mod rate_limit;
pub mod session;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
pub(crate) mod topology;

pub use crate::client::RedisClient;
pub use crate::config::{Config, ConfigBuilder};
pub use crate::error::{Error, Result};
pub use crate::globals::{FencingToken, Globals, Lease};
pub use crate::rate_limit::{RateLimitLayer, RateLimiter};
pub use crate::session::{Session, SessionLayer, SessionStore};

/// Re-exported so users name the same versions herd uses.
pub use cookie;
/// Re-exported so users name the same versions herd uses.
pub use redis;

/// The README's and the guides' Rust examples, compiled and run as doctests.
#[cfg(doctest)]
mod guides {
    #[doc = include_str!("../README.md")]
    struct Readme;
    #[doc = include_str!("../docs/sessions.md")]
    struct Sessions;
    #[doc = include_str!("../docs/globals.md")]
    struct Globals;
    #[cfg(unix)]
    #[doc = include_str!("../docs/launcher.md")]
    struct Launcher;
    #[doc = include_str!("../docs/coordination.md")]
    struct Coordination;
    #[cfg(unix)]
    #[doc = include_str!("../docs/several-machines.md")]
    struct SeveralMachines;
}
