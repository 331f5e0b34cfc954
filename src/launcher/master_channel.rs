//! The worker's channel to its master (fd 4): one line at a time out (`READY`, `RECYCLE`, the
//! `ALIVE` heartbeat, `METRICS`), `DRAINING` in, and end-of-file when the master dies.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::lame_duck::start_draining;

/// The line the master writes on the channel when its lame-duck period begins.
pub(crate) const DRAINING_LINE: &str = "DRAINING\n";
/// The heartbeat line a worker writes on the channel when the master judges hung workers.
pub(crate) const ALIVE_LINE: &str = "ALIVE\n";

/// fd of the channel to the master.
pub(crate) const MASTER_FD: i32 = 4;

/// The way back to whoever started us.
///
/// The socket stays in blocking mode for its whole life: its end-of-file is watched by a thread
/// with blocking reads ([`master_eof`]), because `O_NONBLOCK` belongs to the open file
/// description, shared by every dup of the fd, and a non-blocking writer could cut a line short
/// when the buffer is full (and a following `READY` would be lost in the garbage).
#[derive(Debug)]
pub(crate) struct Channel {
    pub(super) master: Option<UnixStream>,
    pub(super) ready_sent: AtomicBool,
    recycle_sent: AtomicBool,
    /// One line at a time: lines written from several threads never interleave.
    writing: std::sync::Mutex<()>,
}

impl Channel {
    pub(super) fn new(master: Option<UnixStream>) -> Channel {
        Channel {
            master,
            ready_sent: AtomicBool::new(false),
            recycle_sent: AtomicBool::new(false),
            writing: std::sync::Mutex::new(()),
        }
    }

    /// Write one whole line (blocking until the master has room for it); `false` when the master
    /// is gone (or there is none).
    pub(super) fn send(&self, line: &str) -> bool {
        let Some(mut stream) = self.master.as_ref() else {
            return false;
        };
        let _whole_line = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        match stream.write_all(line.as_bytes()) {
            Ok(()) => true,
            // The master is gone, and with it the reader of our stderr (see `orphaned`).
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => false,
            Err(e) => {
                tracing::warn!("herd worker: cannot write to the master: {e}");
                false
            }
        }
    }
}

/// Resolves when the master channel reaches end-of-file (the master died); on the way, a
/// `DRAINING` line from the master marks the host as [draining](is_draining). A plain thread
/// blocks in `read`, so the socket never has to be made non-blocking (see [`Channel`]). `None`
/// if the thread cannot be started.
pub(super) fn master_eof(mut stream: UnixStream) -> Option<tokio::sync::oneshot::Receiver<()>> {
    use std::io::Read;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let started = std::thread::Builder::new()
        .name("herd-master-eof".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            // The master writes only whole `DRAINING` lines; a partial one waits in `line`.
            let mut line = Vec::with_capacity(DRAINING_LINE.len());
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        for &b in &buf[..n] {
                            line.push(b);
                            if b == b'\n' {
                                if line == DRAINING_LINE.as_bytes() {
                                    start_draining();
                                }
                                line.clear();
                            } else if line.len() > DRAINING_LINE.len() {
                                // Not a line this side knows: skip it up to its end.
                                line.clear();
                                line.push(b'?');
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    // End-of-file or an error: the master is gone.
                    Err(_) => break,
                }
            }
            let _ = tx.send(());
        });
    match started {
        Ok(_) => Some(rx),
        Err(e) => {
            tracing::warn!("herd worker: cannot watch the master channel: {e}");
            None
        }
    }
}

impl Channel {
    pub(crate) fn recycle(&self) {
        if self.master.is_some() && !self.recycle_sent.swap(true, Ordering::SeqCst) {
            let _ = self.send("RECYCLE\n");
        }
    }
}

/// Tell the master that this worker's runtime runs: an `ALIVE` line four times per hang timeout
/// (at most once a second, at least every 50 ms).
///
/// A task on the app's runtime, not a thread of its own: when every thread of the runtime is
/// blocked (a deadlock, a blocking call, a CPU loop), the heartbeat stops, and the master replaces
/// the worker after its hang timeout. The blocking write goes through `spawn_blocking` (see
/// [`Channel`]), started by the task, so it too stops with the runtime.
pub(super) async fn heartbeat(channel: Arc<Channel>, hang_timeout: Duration) {
    if channel.master.is_none() {
        return;
    }
    let every = (hang_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let channel = channel.clone();
        let sent = tokio::task::spawn_blocking(move || channel.send(ALIVE_LINE)).await;
        if !matches!(sent, Ok(true)) {
            return;
        }
    }
}

/// When the master asks for metrics (`HERD_METRICS=1`): install the Prometheus recorder and send
/// the rendered series every second as one `METRICS "<text as a JSON string>"` line. Masters that
/// do not know the line ignore it. Returns whether metrics are collected.
#[cfg(feature = "metrics")]
pub(super) fn send_metrics(channel: &Arc<Channel>, index: Option<usize>) -> bool {
    if channel.master.is_none() || std::env::var(super::ENV_METRICS).as_deref() != Ok("1") {
        return false;
    }
    // Every series carries `worker="N"` (the exporter's global label): the master serves the
    // workers' series side by side without touching them.
    let labels: Vec<(&str, String)> = index
        .map(|i| ("worker", i.to_string()))
        .into_iter()
        .collect();
    let handle = match crate::observe::install_prometheus_labelled(&labels) {
        Ok(handle) => handle,
        Err(e) => {
            tracing::warn!("herd worker: metrics disabled: {e}");
            return false;
        }
    };
    let channel = channel.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            handle.run_upkeep();
            if let Ok(text) = serde_json::to_string(&handle.render()) {
                // A blocking write (see `Channel`), off the runtime's threads.
                let channel = channel.clone();
                let line = format!("METRICS {text}\n");
                let sent = tokio::task::spawn_blocking(move || channel.send(&line)).await;
                if !matches!(sent, Ok(true)) {
                    return;
                }
            }
        }
    });
    true
}

#[cfg(not(feature = "metrics"))]
pub(super) fn send_metrics(_channel: &Arc<Channel>, _index: Option<usize>) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::lame_duck::{is_draining, DRAINING};
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::io::Read;

    #[test]
    fn watching_the_master_keeps_the_writer_blocking_and_lines_whole() {
        let (ours, mut master) = UnixStream::pair().unwrap();
        let eof = master_eof(ours.try_clone().unwrap()).expect("watcher thread");
        let channel = Arc::new(Channel::new(Some(ours)));
        let flags = fcntl(channel.master.as_ref().unwrap(), FcntlArg::F_GETFL).unwrap();
        assert!(
            !OFlag::from_bits_truncate(flags).contains(OFlag::O_NONBLOCK),
            "the channel must stay blocking while its end-of-file is watched"
        );
        // A line far larger than the socket buffer, then READY: both arrive whole.
        let big = format!("METRICS \"{}\"\n", "x".repeat(4 << 20));
        let writer = {
            let (channel, big) = (channel.clone(), big.clone());
            std::thread::spawn(move || {
                assert!(channel.send(&big));
                assert!(channel.send("READY\n"));
            })
        };
        let expected = format!("{big}READY\n");
        let mut got = Vec::with_capacity(expected.len());
        let mut buf = vec![0u8; 1 << 16];
        while got.len() < expected.len() {
            let n = master.read(&mut buf).unwrap();
            assert!(n > 0, "the worker side closed early");
            got.extend_from_slice(&buf[..n]);
        }
        writer.join().unwrap();
        assert!(got == expected.as_bytes(), "a line was cut or lost");
        // The master goes away: the watcher sees it.
        drop(master);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(runtime.block_on(eof).is_ok());
    }

    #[test]
    fn a_draining_line_from_the_master_makes_the_host_a_lame_duck() {
        let (ours, mut master) = UnixStream::pair().unwrap();
        let eof = master_eof(ours).expect("watcher thread");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let draining = DRAINING.subscribe();
        assert!(!*draining.borrow(), "a worker starts healthy");
        // An unknown long line first, then the draining line cut in two writes.
        master
            .write_all(b"SOMETHING ELSE ENTIRELY DRAINING\nDRAI")
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!is_draining(), "only a whole DRAINING line counts");
        master.write_all(b"NING\n").unwrap();
        let res = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), async {
                let mut rx = draining;
                let _ = rx.wait_for(|d| *d).await;
            })
            .await
        });
        assert!(res.is_ok(), "the DRAINING line was not seen");
        let response = runtime.block_on(crate::launcher::healthz());
        assert_eq!(
            response.status(),
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        );
        drop(master);
        assert!(runtime.block_on(eof).is_ok());
    }
}
