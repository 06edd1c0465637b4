//! Where access records go: without `[access_log] path`, the diagnostic
//! log (stderr, target `upsplice::access`, as key=value fields); with one,
//! that file in the configured format, written by a thread of its own
//! through a bounded queue, so a slow or full disk never blocks a
//! connection: lines that do not fit are dropped and counted
//! (`upsplice_access_log_dropped_total`). SIGHUP reopens the file (for
//! logrotate's postrotate); the queue is flushed before the process exits.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use crate::access::{AccessRecord, Format};

/// Lines the queue holds before it drops (about 20 MB of lines at most).
const QUEUE_LINES: usize = 65_536;
/// How often the writer flushes and looks for a reopen while idle.
const TICK: Duration = Duration::from_millis(200);

/// The access log of the process.
pub struct AccessLog {
    sink: Sink,
}

enum Sink {
    Trace,
    File { tx: SyncSender<Msg>, format: Format, reopen: Arc<AtomicBool> },
}

enum Msg {
    Line(String),
    /// Flush, then say so.
    Sync(mpsc::Sender<()>),
}

impl AccessLog {
    /// The diagnostic log (no `[access_log] path`).
    pub fn trace() -> AccessLog {
        AccessLog { sink: Sink::Trace }
    }

    /// Opens (creates, appends to) `path` and starts its writer thread.
    pub fn open(path: &Path, format: Format) -> io::Result<AccessLog> {
        let file = open(path)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
        let reopen = Arc::new(AtomicBool::new(false));
        let writer =
            Writer { path: path.to_path_buf(), out: BufWriter::new(file), reopen: reopen.clone(), failing: false };
        std::thread::Builder::new().name("access-log".into()).spawn(move || writer.run(rx))?;
        Ok(AccessLog { sink: Sink::File { tx, format, reopen } })
    }

    /// Logs `rec`; never waits for the disk.
    pub fn write(&self, rec: &AccessRecord) {
        match &self.sink {
            Sink::Trace => rec.trace(),
            Sink::File { tx, format, .. } => {
                let line = rec.line(*format, rec.started.elapsed());
                match tx.try_send(Msg::Line(line)) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                        crate::metrics::get().access_log_dropped.inc();
                    }
                }
            }
        }
    }

    /// Reopens the file at its path (SIGHUP), on the writer thread.
    pub fn reopen(&self) {
        if let Sink::File { reopen, .. } = &self.sink {
            reopen.store(true, Ordering::Relaxed);
        }
    }

    /// Waits until every line queued so far is written, `within` at most
    /// in all: a full queue behind a stuck disk must not hold the exit.
    pub fn sync(&self, within: Duration) {
        let Sink::File { tx, .. } = &self.sink else { return };
        let deadline = std::time::Instant::now() + within;
        let (done, wait) = mpsc::channel();
        let mut msg = Msg::Sync(done);
        loop {
            match tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if std::time::Instant::now() < deadline => {
                    msg = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return,
            }
        }
        let _ = wait.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
    }
}

/// Buffers one record with its newline in one piece, so that every
/// write(2) of the buffer holds whole lines. Another process appending to
/// the same file (the old router draining beside the new one after a
/// restart) then never lands between a line and its newline: a line and
/// `\n` buffered apart went out in two writes whenever the line filled
/// the buffer or was longer than it (a long URL).
fn put_line<W: Write>(out: &mut BufWriter<W>, mut line: String) -> io::Result<()> {
    line.push('\n');
    out.write_all(line.as_bytes())
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

struct Writer {
    path: PathBuf,
    out: BufWriter<File>,
    reopen: Arc<AtomicBool>,
    /// A write failed and was logged; the next failure is not.
    failing: bool,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            match rx.recv_timeout(TICK) {
                Ok(msg) => {
                    self.take(msg);
                    // Drain what queued meanwhile, then flush once.
                    while let Ok(msg) = rx.try_recv() {
                        self.take(msg);
                    }
                    self.flush();
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.flush();
                    return;
                }
            }
            if self.reopen.swap(false, Ordering::Relaxed) {
                self.flush();
                match open(&self.path) {
                    Ok(file) => {
                        self.out = BufWriter::new(file);
                        tracing::info!("access log: reopened {}", self.path.display());
                    }
                    Err(e) => tracing::error!("access log: cannot reopen {}: {e}; writing on", self.path.display()),
                }
            }
        }
    }

    fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Line(line) => {
                let written = put_line(&mut self.out, line);
                self.result(written);
            }
            Msg::Sync(done) => {
                self.flush();
                let _ = done.send(());
            }
        }
    }

    fn flush(&mut self) {
        let flushed = self.out.flush();
        self.result(flushed);
    }

    fn result(&mut self, r: io::Result<()>) {
        match r {
            Ok(()) => self.failing = false,
            Err(e) if !self.failing => {
                self.failing = true;
                tracing::error!("access log: writing {} failed: {e}", self.path.display());
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each write the buffer makes to it.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_write_holds_whole_lines() {
        let mut out = BufWriter::with_capacity(1024, Writes::default());
        // Short lines, one that fills the buffer to its last byte, one
        // longer than the buffer (written past it).
        let lines = ["short".repeat(30), "x".repeat(1024 - 3 * 151), "y".repeat(3000), "after".to_string()];
        for line in &lines {
            put_line(&mut out, line.clone()).unwrap();
        }
        out.flush().unwrap();
        let writes = out.into_inner().map_err(|e| e.into_error()).unwrap().0;
        assert!(writes.len() >= 2, "the test should make the buffer write more than once");
        for w in &writes {
            assert_eq!(w.last(), Some(&b'\n'), "a write ended inside a line");
        }
        let all: Vec<u8> = writes.concat();
        let expected: String = lines.iter().map(|l| format!("{l}\n")).collect();
        assert_eq!(String::from_utf8(all).unwrap(), expected);
    }
}
