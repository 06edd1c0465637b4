//! The access record's request strings (method, target, headers as
//! forwarded), packed into one buffer.
//!
//! A tunnel keeps its record for hours: as nine `Option<String>`s they
//! were 216 bytes of pointers and up to nine allocations per tunnel
//! (heaptrack: 103 B of strings in four to six allocations for a plain
//! WebSocket upgrade), where one buffer and its offsets take 96 bytes and
//! one allocation, shrunk to its content once the tunnel starts.

/// A string the record keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Text {
    Method,
    /// The request target as received (path and query).
    Target,
    Host,
    UserAgent,
    Referer,
    /// `X-Forwarded-For` and `X-Forwarded-Proto` as sent to the backend.
    XForwardedFor,
    XForwardedProto,
    /// `X-Vcap-Request-Id` as sent to the backend.
    RequestId,
    /// The route service the request was sent to (its URL).
    RouteService,
}

impl Text {
    const COUNT: usize = 9;
}

/// Start and end of a text in the buffer; [`UNSET`] when it has none.
type Span = (u32, u32);
const UNSET: Span = (u32::MAX, u32::MAX);

/// The record's texts: each one a span of one buffer.
#[derive(Debug, Clone)]
pub struct Texts {
    buf: String,
    spans: [Span; Text::COUNT],
}

impl Default for Texts {
    fn default() -> Texts {
        Texts { buf: String::new(), spans: [UNSET; Text::COUNT] }
    }
}

impl Texts {
    pub fn get(&self, t: Text) -> Option<&str> {
        match self.spans[t as usize] {
            UNSET => None,
            (start, end) => Some(&self.buf[start as usize..end as usize]),
        }
    }

    /// Sets `t` to `value`, replacing what it held (a request on a
    /// kept-alive connection sets them all again: the buffer does not grow
    /// with the requests).
    pub fn set(&mut self, t: Text, value: &str) {
        self.clear(t);
        let start = self.buf.len();
        // Offsets are u32: a head is far smaller (`max_header_bytes`).
        let (Ok(s), Ok(e)) = (u32::try_from(start), u32::try_from(start + value.len())) else {
            return;
        };
        self.buf.push_str(value);
        self.spans[t as usize] = (s, e);
    }

    /// Sets `t` to `value`, or to none.
    pub fn set_opt(&mut self, t: Text, value: Option<&str>) {
        match value {
            Some(v) => self.set(t, v),
            None => self.clear(t),
        }
    }

    /// `t` holds none; its bytes leave the buffer.
    pub fn clear(&mut self, t: Text) {
        let (start, end) = std::mem::replace(&mut self.spans[t as usize], UNSET);
        if (start, end) == UNSET {
            return;
        }
        self.buf.replace_range(start as usize..end as usize, "");
        let len = end - start;
        for span in self.spans.iter_mut().filter(|s| **s != UNSET && s.0 >= end) {
            *span = (span.0 - len, span.1 - len);
        }
    }

    /// Gives back what the buffer holds beyond its texts: called once the
    /// record is kept for a tunnel's life.
    pub fn shrink(&mut self) {
        self.buf.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Text; Text::COUNT] = [
        Text::Method,
        Text::Target,
        Text::Host,
        Text::UserAgent,
        Text::Referer,
        Text::XForwardedFor,
        Text::XForwardedProto,
        Text::RequestId,
        Text::RouteService,
    ];

    #[test]
    fn each_text_reads_back_what_was_set_last_and_none_until_set() {
        let mut t = Texts::default();
        assert!(ALL.iter().all(|&k| t.get(k).is_none()));
        t.set(Text::Host, "chat.example.com");
        t.set(Text::Method, "GET");
        t.set(Text::Target, "/chat?room=1");
        t.set(Text::Referer, "");
        assert_eq!(t.get(Text::Host), Some("chat.example.com"));
        assert_eq!(t.get(Text::Method), Some("GET"));
        assert_eq!(t.get(Text::Target), Some("/chat?room=1"));
        assert_eq!(t.get(Text::Referer), Some(""), "empty is not none");
        assert_eq!(t.get(Text::UserAgent), None);
        // Replacing one in the middle moves the ones after it.
        t.set(Text::Method, "OPTIONS");
        assert_eq!(t.get(Text::Host), Some("chat.example.com"));
        assert_eq!(t.get(Text::Method), Some("OPTIONS"));
        assert_eq!(t.get(Text::Target), Some("/chat?room=1"));
        t.set_opt(Text::Host, None);
        assert_eq!(t.get(Text::Host), None);
        assert_eq!(t.get(Text::Target), Some("/chat?room=1"));
        assert_eq!(t.get(Text::Method), Some("OPTIONS"));
    }

    /// A kept-alive connection sets every text again for each request: the
    /// buffer holds the last request's texts, not all of them.
    #[test]
    fn setting_again_does_not_grow_the_buffer() {
        let mut t = Texts::default();
        for i in 0..1000 {
            for (n, &k) in ALL.iter().enumerate() {
                t.set(k, &format!("{k:?}-{i}-{}", "x".repeat(n)));
            }
        }
        let want: usize = ALL.iter().enumerate().map(|(n, k)| format!("{k:?}-999-{}", "x".repeat(n)).len()).sum();
        assert_eq!(t.buf.len(), want);
        for (n, &k) in ALL.iter().enumerate() {
            assert_eq!(t.get(k), Some(&*format!("{k:?}-999-{}", "x".repeat(n))));
        }
        t.shrink();
        assert_eq!(t.buf.capacity(), want);
    }

    proptest::proptest! {
        /// Any order of sets and clears leaves each text as a map would.
        #[test]
        fn behaves_as_a_map(ops in proptest::collection::vec((0..Text::COUNT, proptest::option::of("[a-z/é]{0,12}")), 0..60)) {
            let mut t = Texts::default();
            let mut model: [Option<String>; Text::COUNT] = Default::default();
            for (k, v) in ops {
                t.set_opt(ALL[k], v.as_deref());
                model[k] = v;
            }
            for k in 0..Text::COUNT {
                proptest::prop_assert_eq!(t.get(ALL[k]), model[k].as_deref());
            }
            let live: usize = model.iter().flatten().map(String::len).sum();
            proptest::prop_assert_eq!(t.buf.len(), live);
        }
    }
}
