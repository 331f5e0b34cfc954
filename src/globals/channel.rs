//! Broadcast across workers: typed messages over Redis pub/sub.

use std::fmt;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use rand::Rng as _;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

use super::Globals;
use crate::client::Effect;
use crate::error::{Error, Result};

/// How often an idle subscription checks its connection with a `PING`, so that a connection that
/// died silently (a frozen server, a dropped network path) is noticed and replaced.
const HEARTBEAT: Duration = Duration::from_secs(5);
const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// Messages buffered for a slow consumer before the subscription stops reading from Redis (Redis
/// then buffers, and disconnects the subscriber past its `client-output-buffer-limit pubsub`).
const BUFFER: usize = 1024;

/// A typed broadcast channel: every [`Subscription`] connected when a message is
/// [`publish`](Self::publish)ed receives it, in every process. Made by [`Globals::channel`].
///
/// The Redis channel is `<prefix>:chan:<name>` ([`Globals::prefix`]). Messages are JSON. Delivery
/// is Redis pub/sub's: at most once, only to subscribers connected at that moment, in publication
/// order per publisher.
///
/// ```no_run
/// use futures_util::StreamExt as _;
/// use herd::globals::Received;
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// enum Invalidate { User(u64), All }
///
/// # async fn run(globals: herd::Globals) -> herd::Result<()> {
/// let channel = globals.channel::<Invalidate>("cache")?;
/// let mut subscription = channel.subscribe().await?;   // in every worker
/// tokio::spawn(async move {
///     while let Some(event) = subscription.next().await {
///         match event {
///             Received::Message(Invalidate::User(id)) => { /* drop user `id` from the cache */ }
///             Received::Message(Invalidate::All) | Received::Reconnected => { /* drop everything */ }
///         }
///     }
/// });
/// channel.publish(&Invalidate::User(42)).await?;        // from any worker
/// # Ok(()) }
/// ```
pub struct Channel<T> {
    globals: Globals,
    channel: Arc<str>,
    _message: PhantomData<fn(T) -> T>,
}

impl<T> Clone for Channel<T> {
    fn clone(&self) -> Self {
        Channel {
            globals: self.globals.clone(),
            channel: self.channel.clone(),
            _message: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Channel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl<T> Channel<T> {
    pub(super) fn new(globals: Globals, name: &str) -> Channel<T> {
        let channel = globals.settings.keys.channel(name);
        Channel {
            globals,
            channel: Arc::from(channel),
            _message: PhantomData,
        }
    }

    /// The Redis channel name.
    pub fn redis_channel(&self) -> &str {
        &self.channel
    }
}

impl<T: Serialize> Channel<T> {
    /// Publishes `message` (one `PUBLISH`, one round trip on the shared connection). Returns how many
    /// subscriptions Redis delivered it to (on a cluster: on the node that took the command).
    ///
    /// # Errors
    /// [`Error::Encode`], [`Error::TooLarge`] (same limit as variables), [`Error::Unavailable`],
    /// [`Error::OutcomeUnknown`] (the message may or may not have been delivered).
    pub async fn publish(&self, message: &T) -> Result<usize> {
        let json = serde_json::to_string(message).map_err(|source| Error::Encode {
            key: self.channel.to_string(),
            source,
        })?;
        let limit = self.globals.settings.max_value_size;
        if json.len() > limit {
            return Err(Error::TooLarge {
                key: self.channel.to_string(),
                size: json.len(),
                limit,
            });
        }
        let channel = self.channel.clone();
        self.globals
            .client
            .run(Effect::MayWrite, |mut c| async move {
                redis::cmd("PUBLISH")
                    .arg(&*channel)
                    .arg(json)
                    .query_async(&mut c)
                    .await
            })
            .await
    }
}

impl<T: DeserializeOwned + Send + 'static> Channel<T> {
    /// Subscribes on a connection of its own (pub/sub needs one) and returns once Redis confirmed the
    /// subscription: every message published after this returns is received.
    ///
    /// The subscription then runs in a background task until it is dropped. When its connection is
    /// lost (Redis restarted, network cut, or a `PING` every 5 s unanswered), it reconnects with a
    /// jittered backoff (50 ms doubling to 2 s) and yields [`Received::Reconnected`] once subscribed
    /// again: messages published in between were missed. A message that does not decode as `T` is
    /// logged and skipped.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when the first connection or subscription does not succeed within the
    /// connect and command timeouts (later losses are handled by reconnecting).
    pub async fn subscribe(&self) -> Result<Subscription<T>> {
        let config = self.globals.client.config();
        let client = Nodes {
            clients: self.globals.client.pubsub_clients()?,
            next: AtomicUsize::new(0),
            redis: self.globals.client.clone(),
        };
        let timeouts = Timeouts {
            connect: config.connect_timeout,
            command: config.command_timeout,
        };
        let pubsub = connect(&client, &self.channel, timeouts).await?;
        let (tx, rx) = mpsc::channel(BUFFER);
        let task = tokio::spawn(listen(client, self.channel.clone(), pubsub, tx, timeouts));
        Ok(Subscription {
            rx,
            task,
            _message: PhantomData,
        })
    }
}

/// What a [`Subscription`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received<T> {
    /// A published message.
    Message(T),
    /// The connection was lost and is subscribed again: messages published meanwhile were missed
    /// (for a cache: drop what the missed messages might have invalidated).
    Reconnected,
}

/// A live subscription to a [`Channel`]: a [`Stream`] of [`Received`] items that never ends while
/// the subscription lives. Dropping it unsubscribes (closes its connection).
pub struct Subscription<T> {
    rx: mpsc::Receiver<Received<T>>,
    task: tokio::task::JoinHandle<()>,
    _message: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for Subscription<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl<T> Subscription<T> {
    /// The next message or reconnection notice (`None` only if the background task ended, which it
    /// does not while the subscription lives, unless the runtime shuts down).
    pub async fn recv(&mut self) -> Option<Received<T>> {
        self.rx.recv().await
    }
}

impl<T> Stream for Subscription<T> {
    type Item = Received<T>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

impl<T> Drop for Subscription<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone, Copy)]
struct Timeouts {
    connect: Duration,
    command: Duration,
}

/// Where subscriptions connect: one server, or the nodes of a cluster tried in turn.
/// Through Sentinel `clients` is empty and the current master is asked for at each connection.
struct Nodes {
    clients: Vec<redis::Client>,
    next: AtomicUsize,
    redis: crate::client::RedisClient,
}

async fn connect(nodes: &Nodes, channel: &str, timeouts: Timeouts) -> Result<redis::aio::PubSub> {
    if nodes.clients.is_empty() {
        let master = tokio::time::timeout(timeouts.connect, nodes.redis.pubsub_master_client())
            .await
            .map_err(|_| Error::Unavailable {
                reason: "pub/sub: the sentinels did not answer in time".into(),
                source: None,
            })??
            .ok_or_else(|| Error::Config("pub/sub: no Redis to connect to".into()))?;
        return connect_to(&master, channel, timeouts).await;
    }
    let i = nodes.next.load(Ordering::Relaxed) % nodes.clients.len();
    let result = connect_to(&nodes.clients[i], channel, timeouts).await;
    if result.is_err() {
        // Next time, the next node (a cluster node may be the one that is down).
        nodes.next.store(i + 1, Ordering::Relaxed);
    }
    result
}

async fn connect_to(
    client: &redis::Client,
    channel: &str,
    timeouts: Timeouts,
) -> Result<redis::aio::PubSub> {
    let unavailable = |reason: &str, source| Error::Unavailable {
        reason: format!("pub/sub: {reason}"),
        source,
    };
    let mut pubsub = match tokio::time::timeout(timeouts.connect, client.get_async_pubsub()).await {
        Ok(Ok(pubsub)) => pubsub,
        Ok(Err(e)) => return Err(unavailable("cannot connect to Redis", Some(e))),
        Err(_) => return Err(unavailable("connecting to Redis timed out", None)),
    };
    match tokio::time::timeout(timeouts.command, pubsub.subscribe(channel)).await {
        Ok(Ok(())) => Ok(pubsub),
        Ok(Err(e)) => Err(unavailable("SUBSCRIBE failed", Some(e))),
        Err(_) => Err(unavailable("SUBSCRIBE timed out", None)),
    }
}

/// The background task of one subscription.
async fn listen<T: DeserializeOwned>(
    client: Nodes,
    channel: Arc<str>,
    first: redis::aio::PubSub,
    tx: mpsc::Sender<Received<T>>,
    timeouts: Timeouts,
) {
    let mut next = Some(first);
    let mut delay = RECONNECT_MIN;
    loop {
        let pubsub = match next.take() {
            Some(pubsub) => pubsub,
            None => match connect(&client, &channel, timeouts).await {
                Ok(pubsub) => {
                    tracing::info!(channel = %channel, "herd: pub/sub subscription restored");
                    delay = RECONNECT_MIN;
                    if tx.send(Received::Reconnected).await.is_err() {
                        return;
                    }
                    pubsub
                }
                Err(e) => {
                    tracing::debug!(channel = %channel, error = %e, "herd: pub/sub reconnect failed");
                    let wait = jitter(delay);
                    delay = (delay * 2).min(RECONNECT_MAX);
                    tokio::select! {
                        () = tokio::time::sleep(wait) => continue,
                        () = tx.closed() => return,
                    }
                }
            },
        };
        let (mut sink, mut stream) = pubsub.split();
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await; // the first tick is immediate
        loop {
            tokio::select! {
                () = tx.closed() => return,
                msg = stream.next() => match msg {
                    Some(msg) => match serde_json::from_slice::<T>(msg.get_payload_bytes()) {
                        Ok(message) => {
                            if tx.send(Received::Message(message)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(channel = %channel, error = %e, "herd: undecodable message skipped");
                        }
                    },
                    None => break,
                },
                _ = heartbeat.tick() => {
                    let pong = tokio::time::timeout(timeouts.command, sink.ping::<redis::Value>()).await;
                    if !matches!(pong, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        }
        tracing::warn!(channel = %channel, "herd: pub/sub connection lost, reconnecting");
    }
}

fn jitter(delay: Duration) -> Duration {
    let micros = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
    Duration::from_micros(rand::rng().random_range(micros / 2..=micros))
}
