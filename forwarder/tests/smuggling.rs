//! Request smuggling (issue 12), through the real binary on loopback: raw
//! client sockets send hostile framing to a router in front of two
//! recording backends that keep their connections open whatever
//! `Connection` says and record every byte they receive.
//!
//! Every case checks one invariant:
//! * every request a backend receives is one the router parsed, routed and
//!   rewrote: its Host is the routed host of that backend, and it carries
//!   exactly one `X-Forwarded-For: 127.0.0.1` (the client is untrusted: its
//!   spoofed value is gone) and one `X-Forwarded-Proto: https` (the
//!   listener's);
//! * a backend never receives bytes the router did not frame: its
//!   connection parses, strictly, as whole requests with unambiguous
//!   framing (one Transfer-Encoding line, never with Content-Length, CRLF
//!   line ends), the last one possibly cut short in its body when the
//!   router gave up on it;
//! * the client gets a clear answer: 400 and a close for ambiguous framing
//!   (RFC 9112 §6.3), its own answer for a valid request, and never bytes a
//!   backend sent past the end of its response.
//!
//! Without client keep-alive (as before 32459cc, or with
//! `max_requests_per_connection = 1`) the router answers one request per
//! connection and drops what follows; with it, a valid pipelined request
//! gets its own answer. The security property is the same: where the
//! expected answer differs, the assertions accept both, and say so
//! ([`Pipelined`]).
//! request_security.rs covers the pipelined-request bypass with bodies,
//! route services, forwarded headers and paths; framing.rs's unit tests
//! cover the chunked parser byte by byte.

mod common;

use std::time::Duration;

use common::recorder::Recorder;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use upsplice::handshake::framing::ChunkedEnd;

const KA: &str = "ka.example.com";
const OTHER: &str = "internal.other-app.example.com";

/// A valid second request for another app, with spoofed forwarded headers
/// (the listener's `forwarded_proto` is https).
const SECOND: &str = "GET /admin HTTP/1.1\r\nHost: internal.other-app.example.com\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: http\r\n\r\n";

/// A router with `ka.example.com` → the ka recorder and
/// `internal.other-app.example.com` → the other recorder.
struct Fixture {
    router: Router,
    ka: Recorder,
    other: Recorder,
}

async fn fixture() -> Fixture {
    fixture_with(Recorder::start("ka").await).await
}

async fn fixture_with(ka: Recorder) -> Fixture {
    let other = Recorder::start("other").await;
    let router = router_for(ka.addr, &other);
    Fixture { router, ka, other }
}

const LIMITS: &str = "handshake_timeout = \"2s\"\nconnect_timeout = \"1s\"\nidle_timeout = \"5s\"";

/// A router with `ka.example.com` → `ka` and `internal.other-app.example.com` → `other`.
fn router_for(ka: std::net::SocketAddr, other: &Recorder) -> Router {
    let routing = format!(
        "{}[[pool]]\nname = \"other\"\nbackends = [\"{}\"]\n[[route]]\nhost = \"{OTHER}\"\npool = \"other\"\n",
        main_pool(&[ka], KA),
        other.addr
    );
    Router::start(Setup { mode: "copy", limits: LIMITS, routing, extra: "" })
}

/// One response as the client parsed it.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn body(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What the client got: whole responses, then whether the router closed,
/// and any bytes that are no whole response.
#[derive(Debug)]
struct Got {
    answers: Vec<Answer>,
    closed: bool,
    trailing: String,
}

/// Sends `writes` as separate TCP writes 100 ms apart (a write the router
/// refuses by closing is not an error: the answer says what happened), and
/// reads responses until the router closes, or at least `want` came and
/// nothing more for a second (a keep-alive router keeps the connection
/// open). Bounded: 10 s for the first `want`.
async fn send(router: &Router, writes: &[&[u8]], want: usize) -> Got {
    let mut s = TcpStream::connect(router.http).await.unwrap();
    for (i, w) in writes.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if s.write_all(w).await.is_err() {
            break;
        }
    }
    read_answers(&mut s, want).await
}

async fn read_answers(s: &mut TcpStream, want: usize) -> Got {
    let mut buf = Vec::new();
    let mut answers = Vec::new();
    let mut chunk = [0u8; 4096];
    let started = tokio::time::Instant::now();
    let closed = loop {
        while let Some((answer, len)) = parse_answer(&buf) {
            answers.push(answer);
            buf.drain(..len);
        }
        let wait = if answers.len() < want {
            Duration::from_secs(10).saturating_sub(started.elapsed())
        } else {
            Duration::from_secs(1)
        };
        match tokio::time::timeout(wait, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break false,
        }
    };
    Got { answers, closed, trailing: String::from_utf8_lossy(&buf).into_owned() }
}

/// The first whole response in `buf` and its length (framed by its
/// Content-Length or chunks; a response without either is not framed
/// here, and stays in `trailing`).
fn parse_answer(buf: &[u8]) -> Option<(Answer, usize)> {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut slots);
    let httparse::Status::Complete(head_len) = resp.parse(buf).ok()? else { return None };
    let value = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let body_len = if value("transfer-encoding").is_some_and(|te| te.ends_with("chunked")) {
        ChunkedEnd::default().feed(&buf[head_len..]).ok()??
    } else {
        value("content-length")?.parse::<usize>().ok()?
    };
    let end = head_len + body_len;
    (buf.len() >= end).then(|| {
        let answer = Answer {
            status: resp.code.unwrap_or(0),
            head: String::from_utf8_lossy(&buf[..head_len]).into_owned(),
            body: buf[head_len..end].to_vec(),
        };
        (answer, end)
    })
}

/// A request as a backend received it.
#[derive(Debug)]
struct Received {
    head: String,
    body: Vec<u8>,
    /// False for the last request of a connection when its body was cut
    /// short (the router gave up on it).
    complete: bool,
}

/// Frames one backend connection's bytes strictly, checking each head
/// (see the module's invariant); `host` is the only host routed to this
/// backend. Err says what the backend got that the router did not frame.
fn frame(bytes: &[u8], host: &str) -> Result<Vec<Received>, String> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut slots);
        let head_len = match req.parse(rest) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Err(format!("half a head: {:?}", lossy(rest))),
            Err(e) => return Err(format!("bytes that are no request ({e}): {:?}", lossy(rest))),
        };
        let head = lossy(&rest[..head_len]);
        check_head(&rest[..head_len], req.headers, host).map_err(|e| format!("{e}, in {head:?}"))?;
        let data = &rest[head_len..];
        let (body_len, complete) = match body_framing(req.headers).map_err(|e| format!("{e}, in {head:?}"))? {
            BodyLen::Length(n) if data.len() >= n => (n, true),
            BodyLen::Length(_) => (data.len(), false),
            BodyLen::Chunked => match ChunkedEnd::default().feed(data) {
                Ok(Some(n)) => (n, true),
                Ok(None) => (data.len(), false),
                Err(e) => return Err(format!("an invalid chunked body was relayed ({e}): {:?}", lossy(data))),
            },
        };
        out.push(Received { head, body: data[..body_len].to_vec(), complete });
        rest = &data[body_len..];
    }
    Ok(out)
}

enum BodyLen {
    Length(usize),
    Chunked,
}

/// The framing a strict backend reads from `headers`, or why it is
/// ambiguous (a lenient backend may read it otherwise than the router).
fn body_framing(headers: &[httparse::Header<'_>]) -> Result<BodyLen, String> {
    let values = |name: &str| -> Vec<String> {
        headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).map(|h| lossy(h.value)).collect()
    };
    let te = values("transfer-encoding");
    let cl = values("content-length");
    if te.len() > 1 {
        return Err(format!(
            "{} Transfer-Encoding lines ({te:?}): a backend that reads the first frames another body",
            te.len()
        ));
    }
    if let Some(te) = te.first() {
        if !cl.is_empty() {
            return Err("both Transfer-Encoding and Content-Length".into());
        }
        let codings: Vec<String> = te.split(',').map(|t| t.trim().to_ascii_lowercase()).collect();
        if codings.last().map(String::as_str) != Some("chunked")
            || codings.iter().filter(|c| *c == "chunked").count() != 1
        {
            return Err(format!("Transfer-Encoding {te:?} does not end in one chunked"));
        }
        return Ok(BodyLen::Chunked);
    }
    let lengths: Vec<&str> = cl.iter().flat_map(|v| v.split(',')).map(str::trim).collect();
    match lengths.first() {
        None => Ok(BodyLen::Length(0)),
        Some(n) if n.bytes().all(|b| b.is_ascii_digit()) && !n.is_empty() && lengths.iter().all(|l| l == n) => {
            Ok(BodyLen::Length(n.parse().map_err(|e| format!("Content-Length {n}: {e}"))?))
        }
        Some(_) => Err(format!("Content-Length {cl:?} is not one decimal length")),
    }
}

/// A head the router wrote: CRLF line ends, routed Host, the router's own
/// forwarded headers.
fn check_head(raw: &[u8], headers: &[httparse::Header<'_>], host: &str) -> Result<(), String> {
    if raw.iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || raw[i - 1] != b'\r')) {
        return Err("a bare LF".into());
    }
    let one = |name: &str, want: Option<&str>| -> Result<(), String> {
        let got: Vec<String> =
            headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).map(|h| lossy(h.value)).collect();
        match (got.as_slice(), want) {
            ([v], Some(w)) if v == w => Ok(()),
            ([_], None) => Ok(()),
            _ => Err(format!("{name}: {got:?}, expected one{}", want.map(|w| format!(" {w:?}")).unwrap_or_default())),
        }
    };
    one("Host", Some(host))?;
    one("X-Forwarded-For", Some("127.0.0.1"))?;
    one("X-Forwarded-Proto", Some("https"))?;
    // Set by the router on every request it rewrites.
    one("X-Request-Start", None)?;
    one("X-Vcap-Request-Id", None)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Everything `backend` received, framed, after the router and the
/// backend settled; panics on bytes the router did not frame.
async fn received(backend: &Recorder, host: &str, case: &str) -> Vec<Received> {
    backend.settle().await;
    let conns = backend.conns.lock().unwrap().clone();
    let mut all = Vec::new();
    for (i, bytes) in conns.iter().enumerate() {
        match frame(bytes, host) {
            Ok(requests) => all.extend(requests),
            Err(e) => panic!("{case}: backend {} connection {i} got what the router did not frame: {e}", backend.name),
        }
    }
    all
}

/// Ambiguous or invalid framing: the client gets 400 and the connection
/// closes; no whole request reaches a backend (the head of a chunked
/// request may have gone before its body turned out invalid: then its body
/// is cut short), and nothing that followed does.
async fn refused(case: &str, request: &str) {
    refused_writes(case, &[request.as_bytes(), SECOND.as_bytes()]).await
}

async fn refused_writes(case: &str, writes: &[&[u8]]) {
    let f = fixture().await;
    let got = send(&f.router, writes, 1).await;
    check_refused(case, &f, &got).await;
}

async fn check_refused(case: &str, f: &Fixture, got: &Got) {
    let first = got.answers.first().unwrap_or_else(|| panic!("{case}: no answer: {got:?}"));
    assert_eq!(first.status, 400, "{case}: {got:?}");
    assert!(first.head.contains("\r\nConnection: close\r\n"), "{case}: {}", first.head);
    assert!(
        got.answers.len() == 1 && got.closed && got.trailing.is_empty(),
        "{case}: one answer, then the close: {got:?}"
    );
    for r in received(&f.ka, KA, case).await {
        assert!(!r.complete, "{case}: a whole request reached the backend: {r:?}");
    }
    let other = received(&f.other, OTHER, case).await;
    assert!(other.is_empty(), "{case}: the request after it reached a backend: {other:?}");
}

/// Either refused as [`refused`] says, or served as [`served`] says: for
/// forms the RFCs let a recipient accept or reject (a bare LF as a line
/// end, a list of identical Content-Lengths, whitespace that is OWS).
async fn refused_or_served(case: &str, request: &str, body: &str) {
    let f = fixture().await;
    let got = send(&f.router, &[request.as_bytes(), SECOND.as_bytes()], 1).await;
    match got.answers.first() {
        Some(a) if a.status == 400 => check_refused(case, &f, &got).await,
        _ => check_served(case, &f, &got, &[body]).await,
    }
}

/// Valid requests (`bodies`: what the ka backend must receive, one per
/// request for ka, in order) followed by [`SECOND`] in the last write.
async fn served(case: &str, writes: &[&[u8]], bodies: &[&str]) {
    let f = fixture().await;
    let got = send(&f.router, writes, bodies.len()).await;
    check_served(case, &f, &got, bodies).await;
}

/// What may follow the answers to the requests for ka: [`SECOND`] was
/// pipelined after them.
///
/// Without client keep-alive (one request per connection) it is read and
/// dropped: no answer, and the other backend gets nothing. With client keep-alive it is
/// parsed, routed to the other backend, rewritten, and answered in order.
/// Both are accepted; anything else fails.
enum Pipelined {
    Dropped,
    Answered,
}

async fn check_served(case: &str, f: &Fixture, got: &Got, bodies: &[&str]) {
    let n = bodies.len();
    assert!(got.answers.len() >= n, "{case}: {n} answers expected: {got:?}");
    for (i, a) in got.answers[..n].iter().enumerate() {
        assert_eq!((a.status, a.body().as_str()), (200, "ka"), "{case}: answer {i}: {got:?}");
    }
    let pipelined = match &got.answers[n..] {
        [] => Pipelined::Dropped,
        [a] if a.status == 200 && a.body() == "other" => Pipelined::Answered,
        more => panic!("{case}: after the answers for ka, only the other app's own answer may come: {more:?}"),
    };
    assert!(got.trailing.is_empty(), "{case}: bytes that are no whole response reached the client: {got:?}");
    let ka = received(&f.ka, KA, case).await;
    let ka_bodies: Vec<String> = ka.iter().map(|r| lossy(&r.body)).collect();
    assert_eq!(ka_bodies, bodies, "{case}: the ka backend's requests: {ka:?}");
    assert!(ka.iter().all(|r| r.complete), "{case}: {ka:?}");
    let other = received(&f.other, OTHER, case).await;
    match pipelined {
        Pipelined::Dropped => assert!(other.is_empty(), "{case}: reached the other backend, unanswered: {other:?}"),
        Pipelined::Answered => {
            assert_eq!(other.len(), 1, "{case}: {other:?}");
            assert!(other[0].head.starts_with("GET /admin HTTP/1.1\r\n"), "{case}: {other:?}");
        }
    }
}

fn post(extra_headers: &str, body: &str) -> String {
    format!("POST /a HTTP/1.1\r\nHost: {KA}\r\n{extra_headers}\r\n{body}")
}

// ---- Content-Length and Transfer-Encoding together ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cl_te_is_refused() {
    // A front end that reads Content-Length passes the whole body; a
    // backend that reads chunked ends it at "0" and reads SECOND as the
    // next request.
    let body = format!("0\r\n\r\n{SECOND}");
    let request = post(&format!("Content-Length: {}\r\nTransfer-Encoding: chunked\r\n", body.len()), &body);
    refused("CL.TE", &request).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_cl_is_refused() {
    // The reverse: chunked holds SECOND as chunk data, a Content-Length
    // reader stops after "NN\r\n" and reads the rest as a request.
    let body = format!("{:x}\r\n{SECOND}\r\n0\r\n\r\n", SECOND.len());
    let request = post("Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", &body);
    refused("TE.CL", &request).await;
}

// ---- Obfuscated and duplicate Transfer-Encoding ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_chunked_then_identity_is_refused() {
    refused("chunked, identity", &post("Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_with_space_before_the_colon_is_refused() {
    // A front end that does not see this Transfer-Encoding frames by Content-Length.
    let body = format!("0\r\n\r\n{SECOND}");
    let request = post(&format!("Content-Length: {}\r\nTransfer-Encoding : chunked\r\n", body.len()), &body);
    refused("Transfer-Encoding : chunked", &request).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_after_a_tab_with_content_length_is_refused() {
    // HTAB is optional whitespace: this is chunked, so with a length it is ambiguous.
    let body = format!("0\r\n\r\n{SECOND}");
    let request = post(&format!("Content-Length: {}\r\nTransfer-Encoding:\tchunked\r\n", body.len()), &body);
    refused("Transfer-Encoding:\\tchunked with Content-Length", &request).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_after_a_tab_alone_is_chunked() {
    let body = "5\r\nhello\r\n0\r\n\r\n";
    refused_or_served("Transfer-Encoding:\\tchunked", &post("Transfer-Encoding:\tchunked\r\n", body), body).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_after_a_vertical_tab_is_refused() {
    refused(
        "Transfer-Encoding:\\x0bchunked",
        &post("Transfer-Encoding:\x0bchunked\r\nContent-Length: 5\r\n", "0\r\n\r\n"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_xchunked_is_refused() {
    refused("xchunked", &post("Transfer-Encoding: xchunked\r\n", "0\r\n\r\n")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_te_lines_ending_in_another_coding_are_refused() {
    refused(
        "chunked / identity lines",
        &post("Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", "0\r\n\r\n"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_te_lines_ending_in_chunked_never_reach_a_backend_as_two() {
    // Combined, the lines say "identity, chunked"; a backend that reads
    // only the first line sees no body and takes the chunks for a request.
    let body = "5\r\nhello\r\n0\r\n\r\n";
    let request = post("Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n", body);
    refused_or_served("identity / chunked lines", &request, body).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_in_http10_is_refused() {
    let request = format!("POST /a HTTP/1.0\r\nHost: {KA}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    refused("Transfer-Encoding in HTTP/1.0", &request).await;
}

// ---- Content-Length ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_content_lengths_are_refused() {
    for (case, headers) in [
        ("two lines", "Content-Length: 5\r\nContent-Length: 6\r\n"),
        ("a list", "Content-Length: 5, 6\r\n"),
        ("a sign", "Content-Length: +5\r\n"),
        ("a negative", "Content-Length: -1\r\n"),
        ("hex", "Content-Length: 0x5\r\n"),
        ("two numbers", "Content-Length: 5 6\r\n"),
        ("past u64", "Content-Length: 18446744073709551616\r\n"),
    ] {
        refused(&format!("Content-Length, {case}"), &post(headers, "hello!")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_content_lengths_frame_one_body() {
    // RFC 9110 §8.6: a recipient may reject the list or use the one value.
    refused_or_served(
        "identical Content-Length lines",
        &post("Content-Length: 5\r\nContent-Length: 5\r\n", "hello"),
        "hello",
    )
    .await;
    refused_or_served("identical Content-Length list", &post("Content-Length: 5, 5\r\n", "hello"), "hello").await;
}

// ---- Chunk lines ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_size_overflow_is_refused() {
    // 2^64 (17 digits) and 2^64 + 5: a backend that wraps reads a 0 or 5.
    for size in ["10000000000000000", "10000000000000005", "0000000000000000005"] {
        let request = post("Transfer-Encoding: chunked\r\n", &format!("{size}\r\nhello\r\n0\r\n\r\n"));
        refused(&format!("chunk size {size}"), &request).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_in_chunk_lines_is_refused() {
    for (case, body) in [
        ("after the last chunk", "0\n\n"),
        ("after chunk data", "5\r\nhello\n0\r\n\r\n"),
        ("after a trailer", "0\r\nX-T: 1\n\r\n"),
        ("after an extension", "5;a=b\nhello\r\n0\r\n\r\n"),
    ] {
        refused(&format!("bare LF {case}"), &post("Transfer-Encoding: chunked\r\n", body)).await;
    }
}

// ---- Heads ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_in_the_head_is_refused_or_normalised() {
    // RFC 9112 §2.2: a recipient may take a bare LF for a line end; the
    // backend then gets CRLF (checked by `frame`), never the bare LF.
    let request = format!("POST /a HTTP/1.1\nHost: {KA}\nContent-Length: 5\n\nhello");
    refused_or_served("bare LF line ends", &request, "hello").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_hiding_transfer_encoding_is_refused() {
    // Read by LF, this has both framings; read by CRLF only, one odd header.
    let body = format!("0\r\n\r\n{SECOND}");
    let request = post(&format!("X-A: 1\nTransfer-Encoding: chunked\r\nContent-Length: {}\r\n", body.len()), &body);
    refused("bare LF before Transfer-Encoding", &request).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whitespace_before_the_colon_is_refused() {
    for (case, headers) in [
        ("Content-Length", "Content-Length : 5\r\n"),
        ("Host", "Content-Length: 5\r\nHost : internal.other-app.example.com\r\n"),
    ] {
        refused(&format!("whitespace before the colon of {case}"), &post(headers, "hello")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn obs_fold_is_refused() {
    // RFC 9112 §5.2: a server must reject obs-fold (or replace it by SP),
    // here hiding a framing header in a folded line.
    for (case, headers) in [
        ("a folded Transfer-Encoding", "Content-Length: 5\r\nX-Folded: a\r\n Transfer-Encoding: chunked\r\n"),
        ("Transfer-Encoding's value folded", "Transfer-Encoding:\r\n chunked\r\n"),
        ("Content-Length's value folded", "Content-Length: 5\r\n\t6\r\n"),
    ] {
        refused(&format!("obs-fold, {case}"), &post(headers, "0\r\n\r\n")).await;
    }
}

// ---- Requests split across writes ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_body_split_across_writes() {
    let writes: [&[u8]; 5] = [
        b"POST /a HTTP/1.1\r\nHo",
        b"st: ka.example.com\r\nContent-Le",
        b"ngth: 11\r\n\r",
        b"\nhello",
        format!(" world{SECOND}").leak().as_bytes(),
    ];
    served("Content-Length body across writes", &writes, &["hello world"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_split_across_writes() {
    let writes: [&[u8]; 6] = [
        b"POST /a HTTP/1.1\r\nHost: ka.example.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r",
        b"\nhello\r",
        b"\n6;ext=1\r\n wor",
        b"ld\r\n0\r\nX-T: 1\r\n",
        b"\r",
        format!("\n{SECOND}").leak().as_bytes(),
    ];
    served("chunked body across writes", &writes, &["5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-T: 1\r\n\r\n"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_chunk_after_valid_ones_is_cut_short() {
    // The head and the first chunk may be on their way before the bad size
    // arrives: the backend gets a body cut short, never the bytes after it.
    let writes: [&[u8]; 3] = [
        b"POST /a HTTP/1.1\r\nHost: ka.example.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"zz\r\n",
        SECOND.as_bytes(),
    ];
    refused_writes("an invalid chunk size in a later write", &writes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_request_split_across_writes() {
    let (start, end) = SECOND.split_at(30);
    let first = format!("GET /a HTTP/1.1\r\nHost: {KA}\r\n\r\n{start}");
    served("second request split across writes", &[first.as_bytes(), end.as_bytes()], &[""]).await;
}

// ---- Pipelining ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_request_for_another_host_is_routed_on_its_own_or_dropped() {
    let first = format!("GET /a HTTP/1.1\r\nHost: {KA}\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n{SECOND}");
    served("pipelined request for another host", &[first.as_bytes()], &[""]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_that_looks_like_a_request_stays_a_body() {
    let request = post(&format!("Content-Length: {}\r\n", SECOND.len()), SECOND);
    served("a body that is a request", &[request.as_bytes()], &[SECOND]).await;
}

// ---- Responses ----

/// What the ka backend sends past each answer's Content-Length.
const OVERRUN: &str = "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_longer_than_its_content_length_is_cut_pipelined() {
    let f = fixture_with(Recorder::start_overrunning("ka", OVERRUN).await).await;
    let request = format!("GET /a HTTP/1.1\r\nHost: {KA}\r\n\r\nGET /b HTTP/1.1\r\nHost: {KA}\r\n\r\n");
    let got = send(&f.router, &[request.as_bytes()], 1).await;
    assert!(
        got.answers.iter().all(|a| a.body() == "ka"),
        "the backend's extra bytes were taken for an answer: {got:?}"
    );
    assert!(!got.trailing.contains("SMUGGLED"), "{got:?}");
    // One request per connection: one answer and the close; with
    // keep-alive: an answer each.
    assert!(matches!(got.answers.len(), 1 | 2), "{got:?}");
    let ka = received(&f.ka, KA, "overrun, pipelined").await;
    assert_eq!(ka.len(), got.answers.len(), "every request the backend got was answered to the client: {ka:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_longer_than_its_content_length_is_cut_sequential() {
    let f = fixture_with(Recorder::start_overrunning("ka", OVERRUN).await).await;
    let mut s = TcpStream::connect(f.router.http).await.unwrap();
    s.write_all(format!("GET /a HTTP/1.1\r\nHost: {KA}\r\n\r\n").as_bytes()).await.unwrap();
    let first = read_one(&mut s).await;
    assert_eq!(first.as_ref().map(|a| (a.status, a.body())), Some((200, "ka".into())), "{first:?}");
    // The next request on the same connection, after the first answer:
    // without keep-alive the router has closed (the write may fail, the
    // read gets EOF); with keep-alive (and backend reuse) its answer must
    // be its own, never the backend's leftover.
    let _ = s.write_all(format!("GET /b HTTP/1.1\r\nHost: {KA}\r\n\r\n").as_bytes()).await;
    let got = read_answers(&mut s, 0).await;
    assert!(got.answers.iter().all(|a| a.body() == "ka") && got.answers.len() <= 1, "{got:?}");
    assert!(got.trailing.is_empty(), "{got:?}");
    let ka = received(&f.ka, KA, "overrun, sequential").await;
    assert_eq!(ka.len(), 1 + got.answers.len(), "{ka:?}");
}

/// Reads one whole response (bounded): None if the router closed first.
async fn read_one(s: &mut TcpStream) -> Option<Answer> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((answer, len)) = parse_answer(&buf) {
            assert_eq!(len, buf.len(), "more than one answer: {:?}", lossy(&buf));
            return Some(answer);
        }
        let n =
            tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await.expect("answer timed out").ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// What the client gets for one GET when the backend answers `response`
/// and keeps its connection open.
async fn relayed(response: &[u8]) -> Got {
    let mut backend = RawBackend::start().await;
    let router =
        Router::start(Setup { mode: "copy", limits: LIMITS, routing: main_pool(&[backend.addr], KA), extra: "" });
    let mut client = TcpStream::connect(router.http).await.unwrap();
    client.write_all(format!("GET /a HTTP/1.1\r\nHost: {KA}\r\n\r\n").as_bytes()).await.unwrap();
    let mut server = backend.accept().await;
    read_head(&mut server).await;
    server.write_all(response).await.unwrap();
    let got = read_answers(&mut client, 1).await;
    drop(server);
    got
}

/// The framing headers of a response head, for a client that reads either.
fn framing_headers(head: &str) -> (Vec<&str>, Vec<&str>) {
    let values = |name: &str| -> Vec<&str> {
        head.split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
            .collect()
    };
    (values("transfer-encoding"), values("content-length"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_with_both_framings_reaches_the_client_with_one() {
    // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and a
    // proxy must remove the Content-Length before forwarding; a client
    // that reads the length would take the rest for the next response.
    let got =
        relayed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nka\r\n0\r\n\r\n")
            .await;
    let answer = got.answers.first().unwrap_or_else(|| panic!("no answer: {got:?}"));
    let (te, cl) = framing_headers(&answer.head);
    assert!(
        answer.status == 502 || (te == ["chunked"] && cl.is_empty() && answer.body == b"2\r\nka\r\n0\r\n\r\n"),
        "the client got both framings: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_with_conflicting_content_lengths_is_a_502() {
    // RFC 9112 §6.3: a proxy that gets an invalid Content-Length from the
    // server answers 502; relaying it lets a client frame it otherwise.
    let mut wrong = Vec::new();
    for response in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 12\r\n\r\nkaHTTP/1.1 2"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 12\r\n\r\nkaHTTP/1.1 2",
    ] {
        let got = relayed(response).await;
        let ok = got.answers.first().is_some_and(|a| a.status == 502 && framing_headers(&a.head).1.len() == 1);
        if !ok {
            wrong.push(format!("{:?}: the client got {got:?}", lossy(response)));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_sent_with_a_head_response_is_never_relayed() {
    // The ka recorder answers HEAD with a body, as a broken backend does:
    // a response to HEAD ends with its head, whatever its Content-Length.
    let f = fixture().await;
    let mut s = TcpStream::connect(f.router.http).await.unwrap();
    s.write_all(format!("HEAD /a HTTP/1.1\r\nHost: {KA}\r\n\r\n{SECOND}").as_bytes()).await.unwrap();
    let got = lossy(&read_quiet(&mut s, Duration::from_secs(10), Duration::from_secs(1)).await);
    let (head, rest) = got.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head: {got:?}"));
    assert!(head.starts_with("HTTP/1.1 200 ") && head.contains("\r\nContent-Length: 2"), "{got:?}");
    // One request per connection: nothing follows; with keep-alive,
    // the other app's own answer to the pipelined request.
    assert!(
        rest.is_empty() || (rest.starts_with("HTTP/1.1 200 ") && rest.ends_with("\r\n\r\nother")),
        "the body sent with the HEAD response reached the client: {got:?}"
    );
    let ka = received(&f.ka, KA, "HEAD").await;
    assert!(ka.len() == 1 && ka[0].head.starts_with("HEAD /a HTTP/1.1\r\n"), "{ka:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_after_connection_close_is_never_answered() {
    let first = format!("GET /a HTTP/1.1\r\nHost: {KA}\r\nConnection: close\r\n\r\n{SECOND}");
    let f = fixture().await;
    let got = send(&f.router, &[first.as_bytes()], 1).await;
    assert!(got.answers.len() == 1 && got.answers[0].body() == "ka" && got.closed, "{got:?}");
    assert!(got.answers[0].head.contains("\r\nConnection: close\r\n"), "{got:?}");
    assert_eq!(received(&f.ka, KA, "after Connection: close").await.len(), 1);
    let other = received(&f.other, OTHER, "after Connection: close").await;
    assert!(other.is_empty(), "a request after the client's Connection: close reached a backend: {other:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_after_an_early_answer_is_never_read_as_a_request() {
    // The backend answers 401 after the head, before the body; the rest of
    // the body (which looks like a request) arrives after that answer. It
    // is body: relayed or discarded, never parsed, routed or answered.
    let mut ka = RawBackend::start().await;
    let other = Recorder::start("other").await;
    let router = router_for(ka.addr, &other);
    let mut s = TcpStream::connect(router.http).await.unwrap();
    let padding = "x".repeat(10);
    let head = format!("POST /a HTTP/1.1\r\nHost: {KA}\r\nContent-Length: {}\r\n\r\n", padding.len() + SECOND.len());
    s.write_all(format!("{head}{padding}").as_bytes()).await.unwrap();
    let mut server = ka.accept().await;
    read_head(&mut server).await;
    server.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\nauth").await.unwrap();
    let first = read_one(&mut s).await;
    assert_eq!(first.as_ref().map(|a| (a.status, a.body())), Some((401, "auth".into())), "{first:?}");
    // The router may have closed already: a failed write is fine.
    let _ = s.write_all(SECOND.as_bytes()).await;
    let got = read_answers(&mut s, 0).await;
    assert!(got.answers.is_empty() && got.trailing.is_empty(), "the body's bytes were answered as a request: {got:?}");
    let other = received(&other, OTHER, "early answer").await;
    assert!(other.is_empty(), "the body's bytes reached a backend as a request: {other:?}");
    drop(server);
}
