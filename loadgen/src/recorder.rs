//! Per-thread recording: latency histograms (never a list of samples), error
//! counters by kind, and one corrected histogram per second for the interval log.

use crate::timeline::Timeline;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Highest trackable value: one hour in microseconds.
pub const MAX_US: u64 = 3_600_000_000;

/// Significant figures kept by every histogram.
pub const SIGFIG: u8 = 3;

/// A latency histogram in microseconds, 1 µs .. 1 h, 3 significant figures.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, SIGFIG).expect("static histogram bounds are valid")
}

/// Records nanoseconds into a µs histogram, clamping into its range.
pub fn record_ns(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record((ns / 1000).clamp(1, MAX_US));
}

/// Why a connection or a message failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// TCP connect refused or failed.
    Connect,
    /// TCP connect or handshake exceeded the connect timeout.
    ConnectTimeout,
    /// The TLS handshake failed (certificate not trusted, wrong name, no common version...).
    Tls,
    /// The HTTP upgrade was answered with something other than 101.
    UpgradeRefused,
    /// The 101 answer carried a wrong or missing Sec-WebSocket-Accept.
    BadAccept,
    /// The handshake answer was malformed or cut short.
    Handshake,
    /// Framing or HTTP protocol violation by the target, or a reply that matches no request.
    Protocol,
    /// The target closed the connection (FIN or close frame) while the run was going on.
    ClosedByPeer,
    /// A read or write failed mid-run.
    Io,
    /// A request that was sent but never answered before the drain deadline.
    Unanswered,
    /// An HTTP response with status >= 400.
    HttpStatus,
    /// Our close (close frame, then FIN) was not answered with EOF in time (`churn`).
    CloseTimeout,
}

impl ErrorKind {
    /// All kinds, for stable reporting order.
    pub const ALL: [ErrorKind; 12] = [
        ErrorKind::Connect,
        ErrorKind::ConnectTimeout,
        ErrorKind::Tls,
        ErrorKind::UpgradeRefused,
        ErrorKind::BadAccept,
        ErrorKind::Handshake,
        ErrorKind::Protocol,
        ErrorKind::ClosedByPeer,
        ErrorKind::Io,
        ErrorKind::Unanswered,
        ErrorKind::HttpStatus,
        ErrorKind::CloseTimeout,
    ];

    /// The snake_case name used in summaries and JSON.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::ConnectTimeout => "connect_timeout",
            ErrorKind::Tls => "tls",
            ErrorKind::UpgradeRefused => "upgrade_refused",
            ErrorKind::BadAccept => "bad_accept",
            ErrorKind::Handshake => "handshake",
            ErrorKind::Protocol => "protocol",
            ErrorKind::ClosedByPeer => "closed_by_peer",
            ErrorKind::Io => "io",
            ErrorKind::Unanswered => "unanswered",
            ErrorKind::HttpStatus => "http_status",
            ErrorKind::CloseTimeout => "close_timeout",
        }
    }
}

/// Everything one generator thread measured.
#[derive(Debug, Clone)]
pub struct Recorder {
    /// Round trip from the intended send time.
    pub corrected: Histogram<u64>,
    /// Round trip from the actual write.
    pub uncorrected: Histogram<u64>,
    /// Generator lateness: actual write minus intended send time.
    pub send_lag: Histogram<u64>,
    /// TCP connect time.
    pub connect: Histogram<u64>,
    /// Full TLS handshakes' times.
    pub tls: Histogram<u64>,
    /// Resumed TLS handshakes' times (`--resume`).
    pub tls_resumed: Histogram<u64>,
    /// WebSocket upgrade (request written to 101 parsed).
    pub upgrade: Histogram<u64>,
    /// Whole WebSocket handshake: connect started to 101 parsed.
    pub handshake: Histogram<u64>,
    /// Corrected latencies by second of the measured window (index 0 = first second).
    pub intervals: Vec<Histogram<u64>>,
    /// Whether to keep `intervals`.
    pub keep_intervals: bool,
    /// Messages whose intended time lies in the measured window and that were written.
    pub sent: u64,
    /// Of `sent`, those actually written before the measured window ended.
    pub sent_in_window: u64,
    /// Messages due in the measured window that were never written (the
    /// generator fell too far behind to send them before the drain deadline).
    pub unsent: u64,
    /// Messages due in the measured window before their connection was ready
    /// (ramp-up, slow connect): never sent, by design.
    pub skipped: u64,
    /// Replies recorded (to messages sent in the measured window).
    pub received: u64,
    /// Connections whose handshake completed.
    pub connections_ok: u64,
    /// New connections opened after the target closed a keep-alive connection (`http`).
    pub reconnects: u64,
    /// Bytes written / read by raw TCP throughput runs.
    pub bytes_out: u64,
    /// Bytes read by raw TCP throughput runs.
    pub bytes_in: u64,
    /// Errors by kind.
    pub errors: BTreeMap<ErrorKind, u64>,
    /// Why the first failed TLS handshake failed.
    pub tls_error: Option<String>,
    /// Progress and owed messages over the run's time, for finding stalls.
    pub timeline: Timeline,
}

impl Recorder {
    /// Empty recorder; `keep_intervals` enables the per-second histograms.
    pub fn new(keep_intervals: bool) -> Self {
        Recorder {
            corrected: new_histogram(),
            uncorrected: new_histogram(),
            send_lag: new_histogram(),
            connect: new_histogram(),
            tls: new_histogram(),
            tls_resumed: new_histogram(),
            upgrade: new_histogram(),
            handshake: new_histogram(),
            intervals: Vec::new(),
            keep_intervals,
            sent: 0,
            sent_in_window: 0,
            unsent: 0,
            skipped: 0,
            received: 0,
            connections_ok: 0,
            reconnects: 0,
            bytes_out: 0,
            bytes_in: 0,
            errors: BTreeMap::new(),
            tls_error: None,
            timeline: Timeline::default(),
        }
    }

    /// Counts one error.
    pub fn error(&mut self, kind: ErrorKind) {
        self.error_n(kind, 1);
    }

    /// Counts `n` errors of one kind.
    pub fn error_n(&mut self, kind: ErrorKind, n: u64) {
        if n > 0 {
            *self.errors.entry(kind).or_insert(0) += n;
        }
    }

    /// Counts `n` measured messages written; `in_window` when the write
    /// happened before the measured window ended.
    pub fn count_sent(&mut self, n: u64, in_window: bool) {
        self.sent += n;
        if in_window {
            self.sent_in_window += n;
        }
    }

    /// Records one reply: corrected and uncorrected latency in ns, and the
    /// second of the measured window in which it arrived.
    pub fn reply(&mut self, corrected_ns: u64, uncorrected_ns: u64, second: usize) {
        self.received += 1;
        record_ns(&mut self.corrected, corrected_ns);
        record_ns(&mut self.uncorrected, uncorrected_ns);
        record_ns(&mut self.send_lag, corrected_ns.saturating_sub(uncorrected_ns));
        if self.keep_intervals {
            while self.intervals.len() <= second {
                self.intervals.push(new_histogram());
            }
            record_ns(&mut self.intervals[second], corrected_ns);
        }
    }

    /// Total errors of all kinds.
    pub fn total_errors(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Adds another thread's measurements into this one.
    pub fn merge(&mut self, other: &Recorder) {
        self.corrected.add(&other.corrected).expect("same bounds");
        self.uncorrected.add(&other.uncorrected).expect("same bounds");
        self.send_lag.add(&other.send_lag).expect("same bounds");
        self.connect.add(&other.connect).expect("same bounds");
        self.tls.add(&other.tls).expect("same bounds");
        self.tls_resumed.add(&other.tls_resumed).expect("same bounds");
        self.upgrade.add(&other.upgrade).expect("same bounds");
        self.handshake.add(&other.handshake).expect("same bounds");
        while self.intervals.len() < other.intervals.len() {
            self.intervals.push(new_histogram());
        }
        for (a, b) in self.intervals.iter_mut().zip(&other.intervals) {
            a.add(b).expect("same bounds");
        }
        self.sent += other.sent;
        self.sent_in_window += other.sent_in_window;
        self.unsent += other.unsent;
        self.skipped += other.skipped;
        self.received += other.received;
        self.connections_ok += other.connections_ok;
        self.reconnects += other.reconnects;
        self.bytes_out += other.bytes_out;
        self.bytes_in += other.bytes_in;
        for (k, v) in &other.errors {
            *self.errors.entry(*k).or_insert(0) += v;
        }
        if self.tls_error.is_none() {
            self.tls_error.clone_from(&other.tls_error);
        }
        self.timeline.merge(&other.timeline);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_everything() {
        let mut a = Recorder::new(true);
        let mut b = Recorder::new(true);
        a.reply(2_000_000, 1_000_000, 0);
        b.reply(5_000_000, 5_000_000, 2);
        b.error(ErrorKind::Io);
        a.merge(&b);
        assert_eq!(a.received, 2);
        assert_eq!(a.corrected.len(), 2);
        assert_eq!(a.intervals.len(), 3);
        assert_eq!(a.intervals[2].len(), 1);
        assert_eq!(a.errors[&ErrorKind::Io], 1);
        assert!(a.corrected.equivalent(a.corrected.max(), 5000));
    }

    #[test]
    fn out_of_range_values_are_clamped_not_lost() {
        let mut a = Recorder::new(false);
        a.reply(0, 10 * 3_600_000_000_000, 0);
        assert_eq!(a.corrected.len(), 1);
        assert_eq!(a.uncorrected.len(), 1);
        assert!(a.uncorrected.max() >= MAX_US / 2);
    }
}
