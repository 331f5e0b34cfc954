//! The master's log output: every worker line forwarded with its `[worker N]` prefix (and a
//! timestamp when asked), kept in a ring buffer for `herd logs`, written to the master's stdout /
//! stderr or to a log file that `SIGUSR1` reopens (for logrotate without `copytruncate`).

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::broadcast;

use super::{Error, Result};

/// Lines kept per worker slot for `herd logs`.
pub(crate) const LINES_PER_WORKER: usize = 1000;
/// Lines a `herd logs --follow` client may fall behind before it is told it missed some.
const FOLLOW_BACKLOG: usize = 4096;

/// The log file of this process, when one is open: shared by the forwarded worker lines and the
/// master's own lines written through [`LogWriter`]. One per process, like its stderr.
static LOG_FILE: OnceLock<Mutex<Option<(PathBuf, File)>>> = OnceLock::new();

fn log_file() -> MutexGuard<'static, Option<(PathBuf, File)>> {
    LOG_FILE
        .get_or_init(|| Mutex::new(None))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn open_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

/// Open `path` (append, created with mode 0640) as this process's log file.
pub(crate) fn open(path: &Path) -> Result<()> {
    let file = open_append(path)
        .map_err(|e| Error::io(format!("cannot open the log file {}", path.display()), e))?;
    *log_file() = Some((path.to_owned(), file));
    Ok(())
}

/// Reopen the log file at its path (after logrotate moved it away); the old one stays open
/// until then, so a failure loses no line.
pub(crate) fn reopen() {
    let mut guard = log_file();
    let Some((path, file)) = guard.as_mut() else {
        return;
    };
    match open_append(path) {
        Ok(new) => *file = new,
        Err(e) => {
            let line = format!(
                "{} herd: cannot reopen the log file {}: {e}; still writing to the old one\n",
                log_timestamp(),
                path.display()
            );
            let _ = file.write_all(line.as_bytes());
        }
    }
}

/// Whether a log file is open: then nothing goes to the terminal, and colour is off.
pub(crate) fn to_file() -> bool {
    log_file().is_some()
}

/// Write one whole line to the log file, or else to stdout or stderr.
fn write_line(line: &[u8], stderr: bool) {
    if let Some((_, file)) = log_file().as_mut() {
        let _ = file.write_all(line);
        return;
    }
    // Whole lines in one write: lines of different workers never interleave.
    let _ = if stderr {
        std::io::stderr().lock().write_all(line)
    } else {
        std::io::stdout().lock().write_all(line)
    };
}

/// A writer for the master's own log lines (`tracing_subscriber::fmt().with_writer(LogWriter)`):
/// the master's [log file](super::Launcher::log_file) when one is open, else stderr. `herd run`
/// uses it; an app that is its own master can too.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some((_, file)) = log_file().as_mut() {
            return file.write(buf);
        }
        std::io::stderr().write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if let Some((_, file)) = log_file().as_mut() {
            return file.write_all(buf);
        }
        std::io::stderr().lock().write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The current time as herd writes it in log lines: UTC, RFC 3339, milliseconds
/// (`2026-12-05T22:10:00.123Z`).
pub fn log_timestamp() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// One forwarded line: its order of arrival, its worker slot, the text as written.
#[derive(Debug, Clone)]
pub(crate) struct Line {
    seq: u64,
    slot: usize,
    text: String,
}

#[derive(Default)]
struct Ring {
    next: u64,
    slots: BTreeMap<usize, VecDeque<Line>>,
}

/// The worker lines the master forwarded: the latest [`LINES_PER_WORKER`] of each slot, and a
/// feed of new ones for `herd logs --follow`.
pub(crate) struct LogBook {
    timestamps: bool,
    ring: Mutex<Ring>,
    feed: broadcast::Sender<Line>,
}

impl LogBook {
    pub(crate) fn new(timestamps: bool) -> Arc<LogBook> {
        Arc::new(LogBook {
            timestamps,
            ring: Mutex::new(Ring::default()),
            feed: broadcast::channel(FOLLOW_BACKLOG).0,
        })
    }

    fn ring(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Write a worker's line (without its newline) and keep it.
    fn record(&self, slot: usize, text: &[u8], stderr: bool) {
        let text = String::from_utf8_lossy(text);
        let text = if self.timestamps {
            format!("{} [worker {slot}] {text}", log_timestamp())
        } else {
            format!("[worker {slot}] {text}")
        };
        write_line(format!("{text}\n").as_bytes(), stderr);
        self.keep(slot, text);
    }

    /// Keep a line in the ring and hand it to the followers.
    fn keep(&self, slot: usize, text: String) {
        let line = {
            let mut ring = self.ring();
            let line = Line {
                seq: ring.next,
                slot,
                text,
            };
            ring.next += 1;
            let lines = ring.slots.entry(slot).or_default();
            if lines.len() == LINES_PER_WORKER {
                lines.pop_front();
            }
            lines.push_back(line.clone());
            line
        };
        let _ = self.feed.send(line);
    }

    /// The last `n` lines of each worker (of `worker` only, when given), oldest first.
    pub(crate) fn tail(&self, n: usize, worker: Option<usize>) -> Vec<String> {
        let ring = self.ring();
        let mut lines: Vec<&Line> = ring
            .slots
            .iter()
            .filter(|(slot, _)| worker.is_none_or(|w| w == **slot))
            .flat_map(|(_, lines)| lines.iter().skip(lines.len().saturating_sub(n)))
            .collect();
        lines.sort_by_key(|l| l.seq);
        lines.into_iter().map(|l| l.text.clone()).collect()
    }

    /// New lines from now on (of `worker` only, when given); a client that falls more than
    /// [`FOLLOW_BACKLOG`] lines behind is told how many it missed.
    pub(crate) fn follow(&self, worker: Option<usize>) -> Follow {
        Follow {
            rx: self.feed.subscribe(),
            worker,
        }
    }

    /// Copy a worker's output to the log, one prefixed line at a time.
    pub(crate) async fn forward(
        self: Arc<Self>,
        stream: impl tokio::io::AsyncRead + Unpin,
        slot: usize,
        stderr: bool,
    ) {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if line.last() == Some(&b'\n') {
                        line.pop();
                    }
                    self.record(slot, &line, stderr);
                }
            }
        }
    }
}

/// See [`LogBook::follow`].
pub(crate) struct Follow {
    rx: broadcast::Receiver<Line>,
    worker: Option<usize>,
}

impl Follow {
    /// The next line; `None` when the master is exiting.
    pub(crate) async fn next(&mut self) -> Option<String> {
        loop {
            match self.rx.recv().await {
                Ok(line) if self.worker.is_none_or(|w| w == line.slot) => return Some(line.text),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    return Some(format!(
                        "[herd: {n} lines skipped: this client fell behind]"
                    ))
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_latest_lines_of_every_worker_in_order() {
        let book = LogBook::new(false);
        let mut follow = book.follow(Some(1));
        // Worker 0 is chatty, worker 1 is not: worker 1's lines stay.
        book.keep(1, "[worker 1] a".into());
        for i in 0..(LINES_PER_WORKER * 2) {
            book.keep(0, format!("[worker 0] {i}"));
        }
        book.keep(1, "[worker 1] b".into());
        assert_eq!(book.ring().slots[&0].len(), LINES_PER_WORKER);
        let before_last = format!("[worker 0] {}", LINES_PER_WORKER * 2 - 2);
        let last = format!("[worker 0] {}", LINES_PER_WORKER * 2 - 1);
        assert_eq!(
            book.tail(2, None),
            ["[worker 1] a", &before_last, &last, "[worker 1] b"],
            "the last 2 of each worker, in the order they came"
        );
        assert_eq!(book.tail(5, Some(1)), ["[worker 1] a", "[worker 1] b"]);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(
            runtime.block_on(follow.next()).as_deref(),
            Some("[worker 1] a")
        );
        assert_eq!(
            runtime.block_on(follow.next()).as_deref(),
            Some("[worker 1] b"),
            "worker 0's lines are filtered out"
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        let t = log_timestamp();
        assert_eq!(t.len(), "2026-12-05T22:10:00.123Z".len(), "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
    }
}
