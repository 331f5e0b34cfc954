//! Clients for pub/sub connections: each subscription has a connection of its own.

use super::{single_client, RedisClient};
use crate::error::{Error, Result};
use crate::topology::{redact_url, Topology};

/// Pub/sub: connections of their own.
impl RedisClient {
    /// Clients for pub/sub connections (each subscription has its own connection): the server
    /// itself; on a cluster every node, tried in turn (a `PUBLISH` reaches subscribers on every node).
    ///
    /// # Errors
    /// [`Error::Config`] if a node's URL cannot be used.
    pub(crate) fn pubsub_clients(&self) -> Result<Vec<redis::Client>> {
        let config = &self.inner.config;
        let urls = match &config.topology {
            Topology::Single(url) => vec![url.clone()],
            Topology::Cluster(nodes) => nodes.clone(),
            // Through Sentinel the master is asked for at each (re)connection: see
            // `pubsub_master_client`.
            Topology::Sentinel { .. } => Vec::new(),
        };
        urls.iter()
            .map(|url| {
                single_client(config, url)
                    .map_err(|e| Error::Config(format!("REDIS_URL `{}`: {e}", redact_url(url))))
            })
            .collect()
    }

    /// Through Sentinel: a client for the current master (asked of the sentinels now), for a
    /// pub/sub connection. `None` for other topologies.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when no sentinel names a reachable master.
    pub(crate) async fn pubsub_master_client(&self) -> Result<Option<redis::Client>> {
        match &self.inner.shared {
            #[cfg(feature = "sentinel")]
            super::Shared::Sentinel(master) => {
                master
                    .client_now()
                    .await
                    .map(Some)
                    .map_err(|e| Error::Unavailable {
                        reason: "no master named by the sentinels".into(),
                        source: Some(e),
                    })
            }
            _ => Ok(None),
        }
    }
}
