//! One [`Config`] for everything herd does: where Redis is, the cookie signing key, the key prefix and
//! every timeout. Build it from the environment ([`Config::from_env`]) or in code ([`Config::builder`]).
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `REDIS_URL` | where Redis is: `redis://[user:pass@]host:port[/db]`, `rediss://...` (TLS), `redis+cluster://host:port[,host:port...]` (Redis Cluster), `redis+sentinel://host:port[,host:port...]/<master name>[/db]` (Sentinel); `rediss+cluster://`, `rediss+sentinel://` for TLS. Cluster, Sentinel and TLS need the `cluster`, `sentinel` and `tls` features | `redis://127.0.0.1:6379` |
//! | `HERD_REDIS_MODE` | `cluster`: read a comma-separated `REDIS_URL` of plain URLs as cluster seed nodes; `single` (default) | `single` |
//! | `HERD_REDIS_CA_FILE` | PEM file of the CA(s) that signed the Redis server certificates (`rediss`); without it the system roots are used | system roots |
//! | `HERD_SECRET` | cookie signing key: base64 of at least 64 random bytes (`openssl rand -base64 64`) | a random key per process, with a warning |
//! | `HERD_OLD_SECRETS` | comma-separated earlier secrets still accepted when verifying cookies (key rotation) | none |
//! | `HERD_PREFIX` | prefix of every Redis key herd writes | `herd` |
//! | `HERD_REDIS_TIMEOUT_MS` | longest wait for one Redis round trip (connecting included) | `1000` |
//! | `HERD_REQUEST_TIMEOUT_MS` | longest time all the Redis calls of one request may take together, pool waits included (the request deadline; see [`client`](crate::client#deadlines-and-fail-fast-what-redis-trouble-costs-a-request)) | `2000` |
//! | `HERD_CONNECT_TIMEOUT_MS` | longest wait to open a connection | `1000` |
//! | `HERD_POOL_SIZE` | connections in the pool of dedicated connections (used for `WATCH`) | `16` |
//! | `HERD_POOL_WAIT_MS` | longest wait for a free pooled connection | `1000` |
//!
//! When `HERD_SECRET` is missing, a random key is made and a loud warning is logged: cookies then only
//! verify in this one process and until it restarts ([`Config::key_is_ephemeral`] says so). Under the
//! launcher the master makes one key and hands it to every worker, so cookies verify in all of them.
//!
//! A variable that is set but malformed (a secret that is not base64 or too short, a URL herd cannot
//! use, a number that does not parse or is zero, a prefix with characters outside `[A-Za-z0-9_.:-]`)
//! is an [`Error::Config`] whose message names the variable: herd refuses to start rather than guess.
//! A variable set to an empty or blank value counts as unset.

use std::fmt;
use std::sync::Once;
use std::time::Duration;

use base64::Engine as _;
use cookie::Key;

use crate::error::{Error, Result};

const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
const DEFAULT_PREFIX: &str = "herd";

/// Configuration shared by sessions, globals and the Redis client. See the [module docs](self).
#[derive(Clone)]
pub struct Config {
    pub(crate) redis_url: String,
    pub(crate) key: Key,
    pub(crate) old_keys: Vec<Key>,
    pub(crate) key_is_ephemeral: bool,
    pub(crate) prefix: String,
    pub(crate) command_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) pool_size: usize,
    pub(crate) pool_wait_timeout: Duration,
    pub(crate) cluster_mode: bool,
    /// PEM of the CA file (`HERD_REDIS_CA_FILE`), read when the config is built.
    pub(crate) ca_pem: Option<Vec<u8>>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("redis_url", &redact_url(&self.redis_url))
            .field("key", &"<secret>")
            .field("old_keys", &self.old_keys.len())
            .field("key_is_ephemeral", &self.key_is_ephemeral)
            .field("prefix", &self.prefix)
            .field("command_timeout", &self.command_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("pool_size", &self.pool_size)
            .field("pool_wait_timeout", &self.pool_wait_timeout)
            .field("cluster_mode", &self.cluster_mode)
            .field("ca_file", &self.ca_pem.is_some())
            .finish()
    }
}

impl Config {
    /// Reads the configuration from the environment (see the [module docs](self) for the variables).
    ///
    /// # Errors
    /// [`Error::Config`] naming the variable when a value is malformed (a secret that is not base64 or
    /// shorter than 64 bytes, an unparsable `REDIS_URL`, a timeout that is not a number).
    pub fn from_env() -> Result<Config> {
        ConfigBuilder::from_env()?.build()
    }

    /// A builder starting from the defaults (not from the environment).
    ///
    /// ```
    /// use std::time::Duration;
    /// let config = herd::Config::builder()
    ///     .redis_url("redis://127.0.0.1:6379/0")
    ///     .prefix("myapp")
    ///     .command_timeout(Duration::from_millis(500))
    ///     .build()?;
    /// # Ok::<(), herd::Error>(())
    /// ```
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder::default()
    }

    /// The Redis URL (with any password).
    pub fn redis_url(&self) -> &str {
        &self.redis_url
    }

    /// The prefix of every key herd writes.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The longest wait for one Redis round trip.
    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
    }

    /// The request deadline: the longest time all the Redis calls made for one request may take
    /// together (see the [client module docs](crate::client)).
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// True when no secret was configured and a random per-process key is in use.
    pub fn key_is_ephemeral(&self) -> bool {
        self.key_is_ephemeral
    }
}

/// Builds a [`Config`]; every setter is optional.
#[derive(Clone, Default)]
pub struct ConfigBuilder {
    redis_url: Option<String>,
    secret: Option<Secret>,
    old_secrets: Vec<Secret>,
    prefix: Option<String>,
    command_timeout: Option<Duration>,
    request_timeout: Option<Duration>,
    connect_timeout: Option<Duration>,
    pool_size: Option<usize>,
    pool_wait_timeout: Option<Duration>,
    cluster_mode: bool,
    ca_file: Option<std::path::PathBuf>,
}

#[derive(Clone)]
enum Secret {
    /// `source` names where the text came from, for error messages (`HERD_SECRET`, ...).
    Base64 {
        source: String,
        text: String,
    },
    Key(Key),
}

impl fmt::Debug for ConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigBuilder")
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl ConfigBuilder {
    /// A builder filled from the environment; later setters override it.
    ///
    /// # Errors
    /// [`Error::Config`] naming the variable when a value is malformed: a number that does not
    /// parse or is zero, an unknown `HERD_REDIS_MODE`, a `REDIS_URL` herd cannot use, a
    /// `HERD_PREFIX` outside the allowed alphabet. The secrets are checked by
    /// [`build`](Self::build), also with the variable's name in the message.
    pub fn from_env() -> Result<ConfigBuilder> {
        ConfigBuilder::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) over any source of variables: `lookup` answers the value of a
    /// variable, `None` when it is not set. A pure function of `lookup` (the process environment is
    /// global, which makes `from_env` itself awkward to test).
    pub(crate) fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<ConfigBuilder> {
        // Empty or blank counts as unset (`REDIS_URL= cargo run` means "the default").
        let var = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let millis = |name: &str| -> Result<Option<Duration>> {
            var(name)
                .map(|v| match v.parse::<u64>() {
                    Ok(0) => Err(Error::Config(format!("{name} must be above zero, got `0`"))),
                    Ok(ms) => Ok(Duration::from_millis(ms)),
                    Err(_) => Err(Error::Config(format!(
                        "{name} must be a whole number of milliseconds, got `{v}`"
                    ))),
                })
                .transpose()
        };
        let mut b = ConfigBuilder::default();
        if let Some(mode) = var("HERD_REDIS_MODE") {
            b.cluster_mode = match mode.as_str() {
                "cluster" => true,
                "single" => false,
                other => {
                    return Err(Error::Config(format!(
                        "HERD_REDIS_MODE must be `single` or `cluster`, got `{other}`"
                    )))
                }
            };
        }
        if let Some(url) = var("REDIS_URL") {
            // Checked here too, so that a bad URL is reported even if a setter replaces it later.
            crate::topology::Topology::parse(&url, b.cluster_mode)?;
            b.redis_url = Some(url);
        }
        if let Some(secret) = var("HERD_SECRET") {
            b.secret = Some(Secret::Base64 {
                source: "HERD_SECRET".into(),
                text: secret,
            });
        }
        if let Some(old) = var("HERD_OLD_SECRETS") {
            let entries: Vec<&str> = old
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            let n = entries.len();
            b.old_secrets = entries
                .into_iter()
                .enumerate()
                .map(|(i, s)| Secret::Base64 {
                    source: if n == 1 {
                        "HERD_OLD_SECRETS".into()
                    } else {
                        format!("HERD_OLD_SECRETS (entry {} of {n})", i + 1)
                    },
                    text: s.to_owned(),
                })
                .collect();
        }
        if let Some(prefix) = var("HERD_PREFIX") {
            crate::keys::validate_prefix(&prefix)
                .map_err(|e| Error::Config(format!("HERD_PREFIX: {}", config_message(e))))?;
            b.prefix = Some(prefix);
        }
        if let Some(path) = var("HERD_REDIS_CA_FILE") {
            b.ca_file = Some(path.into());
        }
        b.command_timeout = millis("HERD_REDIS_TIMEOUT_MS")?;
        b.request_timeout = millis("HERD_REQUEST_TIMEOUT_MS")?;
        b.connect_timeout = millis("HERD_CONNECT_TIMEOUT_MS")?;
        b.pool_wait_timeout = millis("HERD_POOL_WAIT_MS")?;
        if let Some(size) = var("HERD_POOL_SIZE") {
            b.pool_size = Some(match size.parse::<usize>() {
                Ok(0) => {
                    return Err(Error::Config(
                        "HERD_POOL_SIZE must be at least 1, got `0`".into(),
                    ))
                }
                Ok(n) => n,
                Err(_) => {
                    return Err(Error::Config(format!(
                        "HERD_POOL_SIZE must be a whole number, got `{size}`"
                    )))
                }
            });
        }
        Ok(b)
    }

    /// Where Redis is. Default `redis://127.0.0.1:6379`.
    pub fn redis_url(mut self, url: impl Into<String>) -> Self {
        self.redis_url = Some(url.into());
        self
    }

    /// Reads a comma-separated [`redis_url`](Self::redis_url) of plain `redis://` URLs as the seed nodes
    /// of a Redis Cluster (the same as a `redis+cluster://` URL). Default off.
    pub fn cluster_mode(mut self, on: bool) -> Self {
        self.cluster_mode = on;
        self
    }

    /// A PEM file with the CA certificate(s) that signed the Redis servers' certificates, for
    /// `rediss://` URLs (needs the `tls` feature). Without it the system's roots are trusted. There is
    /// no switch that turns certificate checks off.
    ///
    /// ```no_run
    /// let config = herd::Config::builder()
    ///     .redis_url("rediss://redis.internal:6380")
    ///     .ca_file("/etc/redis/ca.pem")
    ///     .build()?;
    /// # Ok::<(), herd::Error>(())
    /// ```
    pub fn ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// The cookie signing secret, base64 of at least 64 bytes (checked by [`build`](Self::build)).
    pub fn secret_base64(mut self, secret: impl Into<String>) -> Self {
        self.secret = Some(Secret::Base64 {
            source: "the secret".into(),
            text: secret.into(),
        });
        self
    }

    /// The cookie signing key.
    pub fn key(mut self, key: Key) -> Self {
        self.secret = Some(Secret::Key(key));
        self
    }

    /// An earlier key still accepted when verifying cookies (new cookies are signed with the current
    /// key). Call several times for several keys.
    pub fn old_key(mut self, key: Key) -> Self {
        self.old_secrets.push(Secret::Key(key));
        self
    }

    /// An earlier secret (base64) still accepted when verifying cookies.
    pub fn old_secret_base64(mut self, secret: impl Into<String>) -> Self {
        self.old_secrets.push(Secret::Base64 {
            source: "an old secret".into(),
            text: secret.into(),
        });
        self
    }

    /// Prefix of every Redis key herd writes. Default `herd`. Letters, digits and `-_.:` only.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// The longest wait for one Redis round trip. Default 1 s.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = Some(timeout);
        self
    }

    /// The request deadline: the longest time all the Redis calls of one request may take
    /// together, pool waits included. Default 2 s. See the [client module docs](crate::client).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// The longest wait to open a connection. Default 1 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// Size of the pool of dedicated connections (used for `WATCH`). Default 16.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = Some(size);
        self
    }

    /// The longest wait for a free pooled connection. Default 1 s.
    pub fn pool_wait_timeout(mut self, timeout: Duration) -> Self {
        self.pool_wait_timeout = Some(timeout);
        self
    }

    /// Checks every value and builds the [`Config`].
    ///
    /// # Errors
    /// [`Error::Config`] with a sentence naming the bad value.
    pub fn build(self) -> Result<Config> {
        let redis_url = self
            .redis_url
            .unwrap_or_else(|| DEFAULT_REDIS_URL.to_owned());
        crate::topology::Topology::parse(&redis_url, self.cluster_mode)?;
        let ca_pem = match &self.ca_file {
            None => None,
            Some(_) if !cfg!(feature = "tls") => {
                return Err(Error::Config(
                    "HERD_REDIS_CA_FILE needs herd's `tls` feature".into(),
                ))
            }
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                Error::Config(format!(
                    "cannot read the Redis CA file `{}` (HERD_REDIS_CA_FILE): {e}",
                    path.display()
                ))
            })?),
        };
        let (key, key_is_ephemeral) = match self.secret {
            Some(secret) => (secret.into_key()?, false),
            None => {
                warn_ephemeral_key();
                (Key::generate(), true)
            }
        };
        let old_keys = self
            .old_secrets
            .into_iter()
            .map(Secret::into_key)
            .collect::<Result<Vec<_>>>()?;
        let prefix = self.prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
        crate::keys::validate_prefix(&prefix)?;
        let pool_size = self.pool_size.unwrap_or(16);
        if pool_size == 0 {
            return Err(Error::Config("the pool size must be at least 1".into()));
        }
        let positive = |name: &str, d: Option<Duration>| -> Result<Duration> {
            let d = d.unwrap_or(Duration::from_secs(1));
            if d.is_zero() {
                return Err(Error::Config(format!("{name} must be above zero")));
            }
            Ok(d)
        };
        Ok(Config {
            redis_url,
            key,
            old_keys,
            key_is_ephemeral,
            prefix,
            command_timeout: positive("the Redis timeout", self.command_timeout)?,
            request_timeout: positive(
                "the request timeout",
                self.request_timeout.or(Some(Duration::from_secs(2))),
            )?,
            connect_timeout: positive("the connect timeout", self.connect_timeout)?,
            pool_size,
            pool_wait_timeout: positive("the pool wait timeout", self.pool_wait_timeout)?,
            cluster_mode: self.cluster_mode,
            ca_pem,
        })
    }
}

impl Secret {
    fn into_key(self) -> Result<Key> {
        match self {
            Secret::Key(key) => Ok(key),
            Secret::Base64 { source, text } => key_from_base64(&source, &text),
        }
    }
}

/// Decodes a base64 secret (standard or URL-safe alphabet, padding optional) of at least 64 bytes.
pub(crate) fn key_from_base64(source: &str, text: &str) -> Result<Key> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    // `openssl rand -base64 64` wraps its output at 64 columns: line breaks are not part of it.
    let text: String = text.split_ascii_whitespace().collect();
    let bytes = [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(&text).ok())
        .ok_or_else(|| {
            Error::Config(format!(
                "{source} is not base64; make one with `openssl rand -base64 64`"
            ))
        })?;
    Key::try_from(bytes.as_slice()).map_err(|_| {
        Error::Config(format!(
            "{source} decodes to {} bytes but needs at least 64; make one with `openssl rand -base64 64`",
            bytes.len()
        ))
    })
}

fn warn_ephemeral_key() {
    static WARNED: Once = Once::new();
    WARNED.call_once(|| {
        let msg = "HERD_SECRET is not set: using a random cookie key for this process only. \
                   Sessions will not survive a restart and cookies will not verify in other \
                   processes. Set HERD_SECRET (e.g. `openssl rand -base64 64`) in production.";
        if tracing::dispatcher::has_been_set() {
            tracing::warn!("{msg}");
        } else {
            eprintln!("herd: WARNING: {msg}");
        }
    });
}

/// The sentence inside an [`Error::Config`] (other errors as displayed).
fn config_message(e: Error) -> String {
    match e {
        Error::Config(m) => m,
        other => other.to_string(),
    }
}

/// The URL with any password replaced by `***`, for logs and errors.
pub(crate) fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let creds = &url[scheme_end + 3..at];
            match creds.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &creds[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("redis://user:hunter2@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact_url("redis://:pw@host"), "redis://:***@host");
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
    }

    #[test]
    fn short_or_garbage_secrets_are_clear_errors() {
        let short = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let err = key_from_base64("HERD_SECRET", &short)
            .err()
            .map(|e| e.to_string());
        assert!(err
            .as_deref()
            .unwrap_or("")
            .contains("32 bytes but needs at least 64"));
        let err = key_from_base64("HERD_SECRET", "not base64 at all!").err();
        assert!(err
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("not base64"));
        let good = base64::engine::general_purpose::STANDARD.encode([7u8; 64]);
        assert!(key_from_base64("HERD_SECRET", &good).is_ok());
        // As `openssl rand -base64 64` prints it: wrapped at 64 columns.
        let (head, tail) = good.split_at(64);
        assert!(key_from_base64("HERD_SECRET", &format!("{head}\n{tail}\n")).is_ok());
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// `from_env`'s logic over a fixed set of variables.
    fn from_vars(vars: &[(&str, &str)]) -> Result<Config> {
        let vars: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        ConfigBuilder::from_lookup(|name| vars.get(name).cloned())?.build()
    }

    fn config_error(vars: &[(&str, &str)]) -> String {
        match from_vars(vars) {
            Err(Error::Config(m)) => m,
            other => panic!("{vars:?}: expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn every_variable_is_read() {
        let secret = b64(&[1u8; 64]);
        let old1 = b64(&[2u8; 64]);
        let old2 = b64(&[3u8; 80]);
        let old_list = format!(" {old1} ,, {old2},");
        let config = from_vars(&[
            ("REDIS_URL", "redis://user:pw@10.0.0.7:6380/2"),
            ("HERD_SECRET", &secret),
            ("HERD_OLD_SECRETS", &old_list),
            ("HERD_PREFIX", "shop-1.prod:eu"),
            ("HERD_REDIS_TIMEOUT_MS", "250"),
            ("HERD_REQUEST_TIMEOUT_MS", "1500"),
            ("HERD_CONNECT_TIMEOUT_MS", " 750 "),
            ("HERD_POOL_SIZE", "3"),
            ("HERD_POOL_WAIT_MS", "1500"),
        ])
        .expect("config");
        assert_eq!(config.redis_url(), "redis://user:pw@10.0.0.7:6380/2");
        assert!(!config.key_is_ephemeral());
        assert_eq!(config.key.master(), Key::from(&[1u8; 64]).master());
        let old: Vec<&[u8]> = config.old_keys.iter().map(Key::master).collect();
        assert_eq!(
            old,
            [
                Key::from(&[2u8; 64]).master(),
                Key::from(&[3u8; 80]).master()
            ],
            "old secrets in order, blanks between commas skipped"
        );
        assert_eq!(config.prefix(), "shop-1.prod:eu");
        assert_eq!(config.command_timeout(), Duration::from_millis(250));
        assert_eq!(config.request_timeout(), Duration::from_millis(1500));
        assert_eq!(config.connect_timeout, Duration::from_millis(750));
        assert_eq!(config.pool_size, 3);
        assert_eq!(config.pool_wait_timeout, Duration::from_millis(1500));
        assert!(!config.cluster_mode);
        assert!(config.ca_pem.is_none());
        // The password never shows in Debug output.
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("pw@") && debug.contains("user:***@"),
            "{debug}"
        );
    }

    #[test]
    fn unset_and_blank_variables_give_the_defaults() {
        for vars in [
            &[][..],
            &[
                ("REDIS_URL", ""),
                ("HERD_PREFIX", "  "),
                ("HERD_REDIS_TIMEOUT_MS", ""),
                ("HERD_POOL_SIZE", " "),
                ("HERD_OLD_SECRETS", ""),
            ][..],
        ] {
            let config = from_vars(vars).expect("defaults");
            assert_eq!(config.redis_url(), "redis://127.0.0.1:6379");
            assert_eq!(config.prefix(), "herd");
            assert_eq!(config.command_timeout(), Duration::from_secs(1));
            assert_eq!(config.request_timeout(), Duration::from_secs(2));
            assert_eq!(config.connect_timeout, Duration::from_secs(1));
            assert_eq!(config.pool_wait_timeout, Duration::from_secs(1));
            assert_eq!(config.pool_size, 16);
            assert!(config.old_keys.is_empty());
            assert!(!config.cluster_mode);
        }
    }

    /// No secret: a random key per process, flagged, never the same twice.
    #[test]
    fn a_missing_secret_gives_an_ephemeral_random_key() {
        let a = from_vars(&[]).expect("config");
        let b = from_vars(&[("HERD_SECRET", " ")]).expect("config");
        assert!(a.key_is_ephemeral() && b.key_is_ephemeral());
        assert_ne!(a.key.master(), b.key.master());
        assert_eq!(a.key.master().len(), 64);
        let built = Config::builder().build().expect("config");
        assert!(built.key_is_ephemeral());
        let keyed = Config::builder()
            .key(Key::generate())
            .build()
            .expect("config");
        assert!(!keyed.key_is_ephemeral());
    }

    #[test]
    fn malformed_variables_are_errors_that_name_the_variable() {
        let good = b64(&[1u8; 64]);
        let short = b64(&[1u8; 40]);
        let long_prefix = "p".repeat(65);
        let good_then_short = format!("{good},{short}");
        // (variables, the variable the message must name, a detail it must give)
        type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a str);
        let cases: Vec<Case<'_>> = vec![
            (
                vec![("HERD_SECRET", "not base64!")],
                "HERD_SECRET",
                "not base64",
            ),
            (vec![("HERD_SECRET", &short)], "HERD_SECRET", "40 bytes"),
            (
                vec![("HERD_SECRET", &good), ("HERD_OLD_SECRETS", "%%%")],
                "HERD_OLD_SECRETS",
                "not base64",
            ),
            (
                vec![
                    ("HERD_SECRET", &good),
                    ("HERD_OLD_SECRETS", &good_then_short),
                ],
                "HERD_OLD_SECRETS (entry 2 of 2)",
                "40 bytes",
            ),
            (vec![("REDIS_URL", "http://example.com")], "REDIS_URL", ""),
            (vec![("REDIS_URL", "not a url")], "REDIS_URL", ""),
            (vec![("REDIS_URL", "redis://:6379")], "REDIS_URL", ""),
            (
                vec![("HERD_REDIS_MODE", "sharded")],
                "HERD_REDIS_MODE",
                "sharded",
            ),
            (vec![("HERD_PREFIX", "a{b}")], "HERD_PREFIX", "a{b}"),
            (
                vec![("HERD_PREFIX", &long_prefix)],
                "HERD_PREFIX",
                "1 to 64",
            ),
            (
                vec![("HERD_REDIS_TIMEOUT_MS", "1s")],
                "HERD_REDIS_TIMEOUT_MS",
                "`1s`",
            ),
            (
                vec![("HERD_REDIS_TIMEOUT_MS", "0")],
                "HERD_REDIS_TIMEOUT_MS",
                "above zero",
            ),
            (
                vec![("HERD_REQUEST_TIMEOUT_MS", "2s")],
                "HERD_REQUEST_TIMEOUT_MS",
                "`2s`",
            ),
            (
                vec![("HERD_CONNECT_TIMEOUT_MS", "-5")],
                "HERD_CONNECT_TIMEOUT_MS",
                "`-5`",
            ),
            (
                vec![("HERD_POOL_WAIT_MS", "1.5")],
                "HERD_POOL_WAIT_MS",
                "`1.5`",
            ),
            (
                vec![("HERD_POOL_WAIT_MS", "99999999999999999999999")],
                "HERD_POOL_WAIT_MS",
                "whole number",
            ),
            (vec![("HERD_POOL_SIZE", "many")], "HERD_POOL_SIZE", "`many`"),
            (
                vec![("HERD_POOL_SIZE", "0")],
                "HERD_POOL_SIZE",
                "at least 1",
            ),
        ];
        for (vars, variable, detail) in cases {
            let message = config_error(&vars);
            assert!(
                message.contains(variable) && message.contains(detail),
                "{vars:?}: `{message}` should name {variable} and say {detail:?}"
            );
        }
        // A URL's password never appears in the error about it.
        let message = config_error(&[("REDIS_URL", "ftp://u:hunter2@host")]);
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn setters_override_the_environment() {
        let vars = [("HERD_PREFIX", "from-env"), ("HERD_POOL_SIZE", "4")];
        let config = ConfigBuilder::from_lookup(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        })
        .expect("builder")
        .prefix("from-code")
        .build()
        .expect("config");
        assert_eq!(config.prefix(), "from-code");
        assert_eq!(config.pool_size, 4);
    }

    #[test]
    fn malformed_url_is_a_startup_error() {
        let err = Config::builder().redis_url("http://nope").build().err();
        assert!(matches!(err, Some(Error::Config(m)) if m.contains("REDIS_URL")));
        let err = Config::builder().prefix("a{b}").build().err();
        assert!(matches!(err, Some(Error::Config(_))));
    }
}
