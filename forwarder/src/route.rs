//! The routing table: Host (exact or `*.suffix`) and optional path prefix → pool.
//!
//! Rules (README, "Routing"): hosts compare in one normal form
//! ([`crate::host::normalize`]: case-insensitive, port and trailing dot
//! ignored, `[::1]` as `::1`); `*.example.com` matches any subdomain at any depth but not
//! `example.com` itself; an exact host always beats a wildcard, and among
//! wildcards the longest suffix wins; then the longest path prefix wins, and
//! prefixes match whole segments (`/api` matches `/api`, `/api/x`, `/api?q`,
//! not `/apix`). Paths are matched normalised ([`crate::path::normalize`]:
//! `/x/../api` and `/%61pi` are `/api`); configured prefixes are normalised
//! the same way.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::Config;

/// What a request was routed to.
#[derive(Debug, Clone)]
pub struct RouteTarget {
    /// Index of the pool in the config's pool list.
    pub pool: usize,
    /// `host` + path prefix as written in the config, for logs and metrics.
    pub name: Arc<str>,
    pub route_service: Option<Arc<str>>,
}

#[derive(Debug, Default)]
struct Entries {
    /// Sorted longest prefix first; "" is the catch-all.
    by_prefix: Vec<(String, RouteTarget)>,
}

impl Entries {
    fn lookup(&self, path: &str) -> Option<&RouteTarget> {
        self.by_prefix.iter().find(|(p, _)| prefix_matches(p, path)).map(|(_, t)| t)
    }
}

/// An immutable routing table, rebuilt on reload and when the routes
/// learned from NATS change.
#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<String, Entries>,
    /// Wildcard suffixes including the leading dot, e.g. ".example.com",
    /// sorted longest first so the most specific wildcard wins.
    wildcard: Vec<(String, Entries)>,
}

impl Router {
    /// Builds the table from a validated config.
    pub fn new(config: &Config) -> Router {
        Router::build(file_routes(config)).0
    }

    /// Builds the table from `(host, path prefix, target)` routes, hosts
    /// and prefixes as written. When two routes have the same host and
    /// prefix, the first one wins (the file's routes come first); returns
    /// the table and how many routes were left out that way.
    pub fn build<'a>(routes: impl IntoIterator<Item = (&'a str, Option<&'a str>, RouteTarget)>) -> (Router, usize) {
        let mut exact: HashMap<String, Entries> = HashMap::new();
        let mut wildcard: HashMap<String, Entries> = HashMap::new();
        let mut shadowed = 0;
        for (host, path, target) in routes {
            let host = crate::host::normalize(host);
            let prefix = crate::path::normalize_prefix(path);
            let entries = match host.strip_prefix('*') {
                Some(suffix) => wildcard.entry(suffix.to_string()).or_default(),
                None => exact.entry(host).or_default(),
            };
            if entries.by_prefix.iter().any(|(p, _)| *p == prefix) {
                shadowed += 1;
                continue;
            }
            entries.by_prefix.push((prefix, target));
        }
        for e in exact.values_mut().chain(wildcard.values_mut()) {
            e.by_prefix.sort_by_key(|e| std::cmp::Reverse(e.0.len()));
        }
        let mut wildcard: Vec<_> = wildcard.into_iter().collect();
        wildcard.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
        (Router { exact, wildcard }, shadowed)
    }

    /// Finds the route for `host` (as sent, maybe with a port) and the
    /// normalised request path `path` ([`crate::path::normalize`]). An exact host that has no matching path prefix
    /// falls through to the wildcards.
    pub fn lookup(&self, host: &str, path: &str) -> Option<&RouteTarget> {
        let host = crate::host::normalize(host);
        if let Some(t) = self.exact.get(&host).and_then(|e| e.lookup(path)) {
            return Some(t);
        }
        self.wildcard
            .iter()
            .filter(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix.as_str()))
            .find_map(|(_, e)| e.lookup(path))
    }
}

/// The config's `[[route]]`s as [`Router::build`] takes them; pools are
/// indexed in the config's pool list.
pub fn file_routes(config: &Config) -> impl Iterator<Item = (&str, Option<&str>, RouteTarget)> {
    let pool_index: HashMap<&str, usize> = config.pools.iter().enumerate().map(|(i, p)| (p.name.as_str(), i)).collect();
    config.routes.iter().map(move |r| {
        let target = RouteTarget {
            pool: pool_index[r.pool.as_str()],
            name: format!("{}{}", crate::host::normalize(&r.host), r.path.as_deref().unwrap_or("")).into(),
            route_service: r.route_service.as_deref().map(Arc::from),
        };
        (r.host.as_str(), r.path.as_deref(), target)
    })
}

/// A NATS route's URI (`host` or `host/path`) as its host and path.
pub fn split_uri(uri: &str) -> (&str, Option<&str>) {
    match uri.find('/') {
        Some(i) => (&uri[..i], Some(&uri[i..])),
        None => (uri, None),
    }
}

/// Does `prefix` (normalized) match `path` on a segment boundary?
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with(['/', '?', '#']),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn router(routes: &str) -> Router {
        let text = format!(
            "[[listener]]\nname=\"w\"\nbind=\"127.0.0.1:1\"\nprotocol=\"http\"\n[[pool]]\nname=\"a\"\n[[pool]]\nname=\"b\"\n[[pool]]\nname=\"c\"\n{routes}"
        );
        Router::new(&Config::parse(Path::new("t"), &text).unwrap())
    }

    fn pool(r: &Router, host: &str, path: &str) -> Option<usize> {
        r.lookup(host, path).map(|t| t.pool)
    }

    #[test]
    fn exact_beats_wildcard_and_port_is_ignored() {
        let r =
            router("[[route]]\nhost=\"*.example.com\"\npool=\"a\"\n[[route]]\nhost=\"Chat.Example.com\"\npool=\"b\"\n");
        assert_eq!(pool(&r, "chat.example.com:8080", "/"), Some(1));
        assert_eq!(pool(&r, "CHAT.EXAMPLE.COM", "/"), Some(1));
        assert_eq!(pool(&r, "x.y.example.com", "/"), Some(0));
        assert_eq!(pool(&r, "example.com", "/"), None);
        assert_eq!(pool(&r, "badexample.com", "/"), None);
    }

    #[test]
    fn longest_whole_segment_prefix_wins() {
        let r = router(
            "[[route]]\nhost=\"h\"\npool=\"a\"\n[[route]]\nhost=\"h\"\npath=\"/api\"\npool=\"b\"\n[[route]]\nhost=\"h\"\npath=\"/api/v2/\"\npool=\"c\"\n",
        );
        assert_eq!(pool(&r, "h", "/"), Some(0));
        assert_eq!(pool(&r, "h", "/apix"), Some(0));
        assert_eq!(pool(&r, "h", "/api"), Some(1));
        assert_eq!(pool(&r, "h", "/api?x=1"), Some(1));
        assert_eq!(pool(&r, "h", "/api/v1"), Some(1));
        assert_eq!(pool(&r, "h", "/api/v2"), Some(2));
        assert_eq!(pool(&r, "h", "/api/v2/socket"), Some(2));
    }

    #[test]
    fn configured_prefixes_are_normalised() {
        let r =
            router("[[route]]\nhost=\"h\"\npool=\"a\"\n[[route]]\nhost=\"h\"\npath=\"/%7Euser/./x/\"\npool=\"b\"\n");
        assert_eq!(pool(&r, "h", "/~user/x/y"), Some(1));
        assert_eq!(pool(&r, "h", "/~user/xy"), Some(0));
    }

    #[test]
    fn exact_host_without_matching_prefix_falls_through_to_wildcard() {
        let r = router(
            "[[route]]\nhost=\"*.e.com\"\npool=\"a\"\n[[route]]\nhost=\"x.e.com\"\npath=\"/only\"\npool=\"b\"\n",
        );
        assert_eq!(pool(&r, "x.e.com", "/only/1"), Some(1));
        assert_eq!(pool(&r, "x.e.com", "/other"), Some(0));
    }

    #[test]
    fn ipv6_host_and_trailing_dot() {
        let r = router(
            "[[route]]\nhost=\"h.e.com\"\npool=\"a\"\n[[route]]\nhost=\"[::1]\"\npool=\"b\"\n\
             [[route]]\nhost=\"Dot.E.com.\"\npool=\"c\"\n",
        );
        assert_eq!(pool(&r, "h.e.com.", "/"), Some(0));
        assert_eq!(pool(&r, "[::1]:8080", "/"), Some(1));
        assert_eq!(pool(&r, "[::1]", "/"), Some(1));
        assert_eq!(pool(&r, "dot.e.com", "/"), Some(2));
        assert_eq!(pool(&r, "dot.e.com.:80", "/"), Some(2));
    }

    #[test]
    fn the_first_route_for_a_host_and_path_wins_and_others_are_counted() {
        let target = |pool, name: &str| RouteTarget { pool, name: name.into(), route_service: None };
        let (r, shadowed) = Router::build([
            ("h.e.com", Some("/api"), target(0, "file")),
            ("H.E.com", Some("/api/"), target(1, "nats")),
            ("h.e.com", None, target(2, "nats")),
        ]);
        assert_eq!(shadowed, 1);
        assert_eq!(pool(&r, "h.e.com", "/api/x"), Some(0));
        assert_eq!(pool(&r, "h.e.com", "/"), Some(2));
        assert_eq!(split_uri("a.e.com/x/y"), ("a.e.com", Some("/x/y")));
        assert_eq!(split_uri("a.e.com"), ("a.e.com", None));
    }
}
