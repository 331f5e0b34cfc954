//! One [`Config`] for herd's Redis client: where Redis is, the key prefix and every timeout. Build it
//! from the environment ([`Config::from_env`]) or in code ([`Config::builder`]). The cookie signing
//! keys (`HERD_SECRET`, `HERD_OLD_SECRETS`) belong to the session layer: see
//! [`SessionLayer::from_env`](crate::SessionLayer::from_env).
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `REDIS_URL` | where Redis is: `redis://[user:pass@]host:port[/db]`, `rediss://...` (TLS), `redis+cluster://host:port[,host:port...]` (Redis Cluster), `redis+sentinel://host:port[,host:port...]/<master name>[/db]` (Sentinel); `rediss+cluster://`, `rediss+sentinel://` for TLS. Cluster, Sentinel and TLS need the `cluster`, `sentinel` and `tls` features | `redis://127.0.0.1:6379` |
//! | `HERD_REDIS_MODE` | `cluster`: read a comma-separated `REDIS_URL` of plain URLs as cluster seed nodes; `single` (default) | `single` |
//! | `HERD_REDIS_CA_FILE` | PEM file of the CA(s) that signed the Redis server certificates (`rediss`); without it the system roots are used | system roots |
//! | `HERD_PREFIX` | prefix of every Redis key herd writes | `herd` |
//! | `HERD_REDIS_TIMEOUT_MS` | longest wait for one Redis round trip (connecting included) | `1000` |
//! | `HERD_REQUEST_TIMEOUT_MS` | longest time all the Redis calls of one request may take together, pool waits included (the request deadline; see [`client`](crate::client#deadlines-and-fail-fast-what-redis-trouble-costs-a-request)) | `2000` |
//! | `HERD_CONNECT_TIMEOUT_MS` | longest wait to open a connection | `1000` |
//! | `HERD_POOL_SIZE` | connections in the pool of dedicated connections (used for `WATCH`) | `16` |
//! | `HERD_POOL_WAIT_MS` | longest wait for a free pooled connection | `1000` |
//!
//! A variable that is set but malformed (a URL herd cannot use, a number that does not parse or is zero, a prefix with characters outside `[A-Za-z0-9_.:-]`)
//! is an [`Error::Config`] whose message names the variable: herd refuses to start rather than guess.
//! A variable set to an empty or blank value counts as unset.

use std::fmt;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::topology::{redact_url, Topology};

const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
const DEFAULT_PREFIX: &str = "herd";

/// How herd's Redis client reaches Redis and how long it waits. See the [module docs](self).
#[derive(Clone)]
pub struct Config {
    pub(crate) redis_url: String,
    /// `redis_url` parsed (with `HERD_REDIS_MODE`), checked when the config is built.
    pub(crate) topology: Topology,
    pub(crate) prefix: String,
    pub(crate) command_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) pool_size: usize,
    pub(crate) pool_wait_timeout: Duration,
    /// PEM of the CA file (`HERD_REDIS_CA_FILE`), read when the config is built.
    pub(crate) ca_pem: Option<Vec<u8>>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("redis_url", &redact_url(&self.redis_url))
            .field("prefix", &self.prefix)
            .field("command_timeout", &self.command_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("pool_size", &self.pool_size)
            .field("pool_wait_timeout", &self.pool_wait_timeout)
            .field("ca_file", &self.ca_pem.is_some())
            .finish()
    }
}

impl Config {
    /// Reads the configuration from the environment (see the [module docs](self) for the variables).
    ///
    /// # Errors
    /// [`Error::Config`] naming the variable when a value is malformed (an unparsable `REDIS_URL`, a
    /// timeout that is not a number).
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
}

/// Builds a [`Config`]; every setter is optional.
#[derive(Clone, Default)]
pub struct ConfigBuilder {
    redis_url: Option<String>,
    prefix: Option<String>,
    command_timeout: Option<Duration>,
    request_timeout: Option<Duration>,
    connect_timeout: Option<Duration>,
    pool_size: Option<usize>,
    pool_wait_timeout: Option<Duration>,
    cluster_mode: bool,
    ca_file: Option<std::path::PathBuf>,
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
    /// `HERD_PREFIX` outside the allowed alphabet.
    pub fn from_env() -> Result<ConfigBuilder> {
        ConfigBuilder::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) over any source of variables: `lookup` answers the value of a
    /// variable, `None` when it is not set. A pure function of `lookup` (the process environment is
    /// global, which makes `from_env` itself awkward to test).
    pub(crate) fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<ConfigBuilder> {
        let var = |name: &str| non_blank(lookup(name));
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
            Topology::parse(&url, b.cluster_mode)?;
            b.redis_url = Some(url);
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
        let topology = Topology::parse(&redis_url, self.cluster_mode)?;
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
            topology,
            prefix,
            command_timeout: positive("the Redis timeout", self.command_timeout)?,
            request_timeout: positive(
                "the request timeout",
                self.request_timeout.or(Some(Duration::from_secs(2))),
            )?,
            connect_timeout: positive("the connect timeout", self.connect_timeout)?,
            pool_size,
            pool_wait_timeout: positive("the pool wait timeout", self.pool_wait_timeout)?,
            ca_pem,
        })
    }
}

/// A variable's value, trimmed; an empty or blank one counts as unset (`REDIS_URL= cargo run`
/// means "the default").
pub(crate) fn non_blank(value: Option<String>) -> Option<String> {
    value.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

/// The sentence inside an [`Error::Config`] (other errors as displayed).
fn config_message(e: Error) -> String {
    match e {
        Error::Config(m) => m,
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let config = from_vars(&[
            ("REDIS_URL", "redis://user:pw@10.0.0.7:6380/2"),
            ("HERD_PREFIX", "shop-1.prod:eu"),
            ("HERD_REDIS_TIMEOUT_MS", "250"),
            ("HERD_REQUEST_TIMEOUT_MS", "1500"),
            ("HERD_CONNECT_TIMEOUT_MS", " 750 "),
            ("HERD_POOL_SIZE", "3"),
            ("HERD_POOL_WAIT_MS", "1500"),
        ])
        .expect("config");
        assert_eq!(config.redis_url(), "redis://user:pw@10.0.0.7:6380/2");
        assert_eq!(
            config.topology,
            Topology::Single("redis://user:pw@10.0.0.7:6380/2".into())
        );
        assert_eq!(config.prefix(), "shop-1.prod:eu");
        assert_eq!(config.command_timeout(), Duration::from_millis(250));
        assert_eq!(config.request_timeout(), Duration::from_millis(1500));
        assert_eq!(config.connect_timeout, Duration::from_millis(750));
        assert_eq!(config.pool_size, 3);
        assert_eq!(config.pool_wait_timeout, Duration::from_millis(1500));
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
            assert_eq!(
                config.topology,
                Topology::Single("redis://127.0.0.1:6379".into())
            );
        }
    }

    #[test]
    fn malformed_variables_are_errors_that_name_the_variable() {
        let long_prefix = "p".repeat(65);
        // (variables, the variable the message must name, a detail it must give)
        type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a str);
        let cases: Vec<Case<'_>> = vec![
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
