//! A real `nats-server` (Debian's package) and a NATS client that is not
//! the router's: the text protocol over a blocking TCP socket (INFO,
//! CONNECT, PUB, SUB, MSG, PING/PONG), as route emitters speak it.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::peer::wait_port;

/// A `nats-server` on 127.0.0.1:`port`; stopped when dropped.
pub struct NatsServer {
    child: Child,
    pub port: u16,
}

impl NatsServer {
    pub fn start(port: u16) -> NatsServer {
        let bin = if std::path::Path::new("/usr/sbin/nats-server").exists() {
            "/usr/sbin/nats-server"
        } else {
            "nats-server"
        };
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_port(([127, 0, 0, 1], port).into());
        NatsServer { child, port }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One message received: subject, reply subject, payload.
#[derive(Debug, Clone)]
pub struct Msg {
    pub subject: String,
    pub reply: Option<String>,
    pub payload: String,
}

pub struct NatsClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    queued: VecDeque<Msg>,
    next_sid: u32,
}

impl NatsClient {
    pub fn connect(port: u16) -> NatsClient {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let writer = stream.try_clone().unwrap();
        let mut c = NatsClient { reader: BufReader::new(stream), writer, queued: VecDeque::new(), next_sid: 1 };
        let info = c.line(Duration::from_secs(5)).expect("INFO from nats-server");
        assert!(info.starts_with("INFO "), "{info}");
        c.send("CONNECT {\"verbose\":false,\"pedantic\":false,\"name\":\"test\"}\r\n");
        c.flush();
        c
    }

    fn send(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).unwrap();
    }

    pub fn publish(&mut self, subject: &str, payload: &str) {
        self.send(&format!("PUB {subject} {}\r\n{payload}\r\n", payload.len()));
        self.flush();
    }

    pub fn request(&mut self, subject: &str, reply: &str, payload: &str) {
        self.send(&format!("PUB {subject} {reply} {}\r\n{payload}\r\n", payload.len()));
        self.flush();
    }

    pub fn subscribe(&mut self, subject: &str) {
        let sid = self.next_sid;
        self.next_sid += 1;
        self.send(&format!("SUB {subject} {sid}\r\n"));
        self.flush();
    }

    /// Waits until the server has processed everything sent so far.
    pub fn flush(&mut self) {
        self.send("PING\r\n");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_one(left) {
                Some(None) => return,
                Some(Some(msg)) => self.queued.push_back(msg),
                None => panic!("no PONG from nats-server"),
            }
        }
    }

    /// The next message on `subject` within `within` (others are dropped).
    pub fn next_on(&mut self, subject: &str, within: Duration) -> Option<Msg> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(msg) = self.queued.pop_front() {
                if msg.subject == subject {
                    return Some(msg);
                }
                continue;
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            if let Some(Some(msg)) = self.read_one(left) {
                self.queued.push_back(msg);
            }
        }
    }

    /// One protocol item: Some(Some(msg)) for a MSG, Some(None) for a
    /// PONG; None on timeout. PINGs are answered.
    fn read_one(&mut self, within: Duration) -> Option<Option<Msg>> {
        let deadline = Instant::now() + within;
        loop {
            let line = self.line(deadline.saturating_duration_since(Instant::now()))?;
            if line == "PONG" {
                return Some(None);
            }
            if line == "PING" {
                self.send("PONG\r\n");
                continue;
            }
            if let Some(rest) = line.strip_prefix("MSG ") {
                let parts: Vec<&str> = rest.split(' ').collect();
                let (subject, reply, len) = match parts.as_slice() {
                    [s, _sid, n] => (s.to_string(), None, n.parse::<usize>().unwrap()),
                    [s, _sid, r, n] => (s.to_string(), Some(r.to_string()), n.parse::<usize>().unwrap()),
                    _ => panic!("bad MSG line {line}"),
                };
                let mut payload = vec![0; len + 2];
                self.reader.read_exact(&mut payload).unwrap();
                payload.truncate(len);
                return Some(Some(Msg { subject, reply, payload: String::from_utf8(payload).unwrap() }));
            }
            assert!(!line.starts_with("-ERR"), "nats-server: {line}");
        }
    }

    fn line(&mut self, within: Duration) -> Option<String> {
        self.reader.get_ref().set_read_timeout(Some(within.max(Duration::from_millis(1)))).unwrap();
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => panic!("nats-server closed the connection"),
            Ok(_) => Some(line.trim_end().to_string()),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => None,
            Err(e) => panic!("reading from nats-server: {e}"),
        }
    }
}
