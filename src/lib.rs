#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

pub mod client;
pub mod config;
pub mod error;
pub mod globals;
pub(crate) mod keys;
#[cfg(feature = "launcher")]
pub mod launcher;
pub mod observe;
pub mod session;
#[cfg(feature = "testing")]
pub mod testing;
pub(crate) mod topology;

pub use crate::client::RedisClient;
pub use crate::config::{Config, ConfigBuilder};
pub use crate::error::{Error, Result};
pub use crate::globals::Globals;
pub use crate::session::{Session, SessionLayer, SessionStore};

/// Re-exported so users name the same versions herd uses.
pub use cookie;
pub use redis;
