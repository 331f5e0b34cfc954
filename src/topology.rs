//! Where Redis is: one server, a Redis Cluster, or a master watched by Sentinel — read from the URL.
//!
//! | URL | topology | cargo feature |
//! |---|---|---|
//! | `redis://[user:pass@]host:port[/db]` | one server | |
//! | `rediss://[user:pass@]host:port[/db]` | one server over TLS | `tls` |
//! | `redis+cluster://[user:pass@]host:port[,host:port...]` | Redis Cluster, seed nodes | `cluster` |
//! | `rediss+cluster://...` | Redis Cluster over TLS | `cluster`, `tls` |
//! | `redis+sentinel://[user:pass@]host:port[,host:port...]/<master name>[/db]` | the master Sentinel names | `sentinel` |
//! | `rediss+sentinel://...` | the same, TLS to the master and replicas (not to the sentinels) | `sentinel`, `tls` |
//!
//! With `HERD_REDIS_MODE=cluster` a plain comma-separated list works too
//! (`REDIS_URL=redis://10.0.0.1:7000,redis://10.0.0.2:7000`). Credentials in a cluster or sentinel
//! URL are those of the Redis servers (sentinels are reached without a password).

use crate::error::{Error, Result};

/// How herd reaches Redis, parsed from the URL (see the [module docs](self)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Topology {
    /// One server: the URL as redis-rs takes it.
    Single(String),
    /// A Redis Cluster: one `redis://` / `rediss://` URL per seed node.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    Cluster(Vec<String>),
    /// A master found through Sentinel.
    #[cfg_attr(not(feature = "sentinel"), allow(dead_code))]
    Sentinel {
        /// One `redis://host:port` URL per sentinel.
        sentinels: Vec<String>,
        /// The name the sentinels monitor the master under.
        master: String,
        /// TLS to the master and replicas.
        tls: bool,
        /// Credentials of the master and replicas.
        username: Option<String>,
        /// Credentials of the master and replicas.
        password: Option<String>,
        /// Database number.
        db: i64,
    },
}

impl Topology {
    /// Parses `url`; `cluster_mode` (`HERD_REDIS_MODE=cluster`) reads a comma-separated list of plain
    /// URLs as cluster seed nodes.
    pub(crate) fn parse(url: &str, cluster_mode: bool) -> Result<Topology> {
        let bad = |why: &str| {
            Error::Config(format!(
                "REDIS_URL `{}` is not a usable Redis URL: {why}",
                redact_url(url)
            ))
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            bad("no scheme (expected redis://, rediss://, redis+cluster:// or redis+sentinel://)")
        })?;
        let topology = match scheme {
            "redis+cluster" | "rediss+cluster" => {
                let tls = scheme.starts_with("rediss");
                let (creds, hosts, path) = split_authority(rest);
                if !path.is_empty() && path != "/" {
                    return Err(bad(
                        "a cluster URL has no database or path (clusters only have db 0)",
                    ));
                }
                let nodes = node_urls(if tls { "rediss" } else { "redis" }, creds, hosts);
                if nodes.is_empty() {
                    return Err(bad("no cluster node"));
                }
                Topology::Cluster(nodes)
            }
            "redis+sentinel" | "rediss+sentinel" => {
                let (creds, hosts, path) = split_authority(rest);
                let mut parts = path.trim_start_matches('/').split('/');
                let master = parts.next().unwrap_or("").to_owned();
                if master.is_empty() {
                    return Err(bad(
                        "a sentinel URL names the master: redis+sentinel://host:port/<master name>",
                    ));
                }
                let db = match parts.next() {
                    None | Some("") => 0,
                    Some(db) => db
                        .parse()
                        .map_err(|_| bad("the database is not a number"))?,
                };
                let sentinels = node_urls("redis", None, hosts);
                if sentinels.is_empty() {
                    return Err(bad("no sentinel"));
                }
                let (username, password) = match creds {
                    None => (None, None),
                    Some(c) => {
                        let (u, p) = c.split_once(':').unwrap_or((c, ""));
                        let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
                        (some(u), some(p))
                    }
                };
                Topology::Sentinel {
                    sentinels,
                    master,
                    tls: scheme.starts_with("rediss"),
                    username,
                    password,
                    db,
                }
            }
            _ if cluster_mode => Topology::Cluster(
                url.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        if s.contains("://") {
                            s.to_owned()
                        } else {
                            format!("redis://{s}")
                        }
                    })
                    .collect(),
            ),
            _ => Topology::Single(url.to_owned()),
        };
        // Let redis-rs check every node URL (scheme, port, TLS support compiled in).
        let check = |u: &str| {
            redis::Client::open(u)
                .map(drop)
                .map_err(|e| bad(&e.to_string()))
        };
        match &topology {
            Topology::Single(u) => check(u)?,
            Topology::Cluster(nodes) => {
                if !cfg!(feature = "cluster") {
                    return Err(bad("Redis Cluster support needs herd's `cluster` feature"));
                }
                nodes.iter().try_for_each(|u| check(u))?;
            }
            Topology::Sentinel { sentinels, tls, .. } => {
                if !cfg!(feature = "sentinel") {
                    return Err(bad("Sentinel support needs herd's `sentinel` feature"));
                }
                if *tls && !cfg!(feature = "tls") {
                    return Err(bad("TLS (rediss) needs herd's `tls` feature"));
                }
                sentinels.iter().try_for_each(|u| check(u))?;
            }
        }
        Ok(topology)
    }
}

/// Splits `[creds@]host:port[,host:port...][/path]` into its parts.
fn split_authority(rest: &str) -> (Option<&str>, &str, &str) {
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((creds, hosts)) => (Some(creds), hosts, path),
        None => (None, authority, path),
    }
}

fn node_urls(scheme: &str, creds: Option<&str>, hosts: &str) -> Vec<String> {
    hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| match creds {
            Some(c) => format!("{scheme}://{c}@{h}"),
            None => format!("{scheme}://{h}"),
        })
        .collect()
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
    fn single_urls_pass_through() {
        assert_eq!(
            Topology::parse("redis://h:1/2", false).ok(),
            Some(Topology::Single("redis://h:1/2".into()))
        );
        assert!(Topology::parse("http://h", false).is_err());
    }

    #[cfg(feature = "cluster")]
    #[test]
    fn cluster_urls() {
        assert_eq!(
            Topology::parse("redis+cluster://u:p@a:1,b:2", false).ok(),
            Some(Topology::Cluster(vec![
                "redis://u:p@a:1".into(),
                "redis://u:p@b:2".into()
            ]))
        );
        assert_eq!(
            Topology::parse("redis://a:1, b:2", true).ok(),
            Some(Topology::Cluster(vec![
                "redis://a:1".into(),
                "redis://b:2".into()
            ]))
        );
        assert!(Topology::parse("redis+cluster://a:1/3", false).is_err());
    }

    #[cfg(feature = "sentinel")]
    #[test]
    fn sentinel_urls() {
        assert_eq!(
            Topology::parse("redis+sentinel://:pw@a:1,b:2/main/3", false).ok(),
            Some(Topology::Sentinel {
                sentinels: vec!["redis://a:1".into(), "redis://b:2".into()],
                master: "main".into(),
                tls: false,
                username: None,
                password: Some("pw".into()),
                db: 3,
            })
        );
        assert!(Topology::parse("redis+sentinel://a:1", false).is_err());
    }
}
