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
//! the same way. For the same host and prefix, the config's route wins
//! over a learned one.
//!
//! The table is persistent ([`imbl`]): a clone shares everything, and a
//! learned route added or removed costs what it touches, so each change
//! from NATS is a new immutable table without copying the others.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;

use crate::config::Config;
use crate::upstream::Pool;

/// What a request was routed to.
#[derive(Debug, Clone)]
pub struct RouteTarget {
    pub pool: Arc<Pool>,
    /// `host` + path prefix as written in the config (or the URI as
    /// learned), for logs and metrics.
    pub name: Arc<str>,
    pub route_service: Option<Arc<str>>,
}

/// Where a route came from: the config's routes win over learned ones
/// for the same host and prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    File,
    Learned,
}

#[derive(Debug, Clone)]
struct Entry {
    /// Normalised, without a trailing `/`; "" is the catch-all.
    prefix: Box<str>,
    source: Source,
    target: RouteTarget,
}

impl Entry {
    /// Where it sorts among its host's routes ([`Entries`]).
    fn order(&self) -> (Reverse<usize>, &str, Source) {
        (Reverse(self.prefix.len()), &self.prefix, self.source)
    }
}

/// One host's routes, longest prefix first; for the same prefix the
/// config's first, then the earlier one. Only the first of equal
/// prefixes is ever chosen; the others are shadowed.
#[derive(Debug, Clone, Default)]
struct Entries(Vec<Entry>);

impl Entries {
    fn lookup(&self, path: &str) -> Option<&RouteTarget> {
        self.0.iter().find(|e| prefix_matches(&e.prefix, path)).map(|e| &e.target)
    }

    /// Routes no lookup can reach (an earlier one has the same prefix).
    fn shadowed(&self) -> usize {
        self.0.windows(2).filter(|w| w[0].prefix == w[1].prefix).count()
    }

    fn insert(&mut self, entry: Entry) {
        // Longest prefix first; equal prefixes side by side (so the
        // shadowed ones are counted), the config's first; after every
        // entry that sorts before it or equal (a stable order: the first
        // route written for a host and prefix wins).
        let at = self.0.partition_point(|e| e.order() <= entry.order());
        self.0.insert(at, entry);
    }

    /// Removes the learned route called `name`, if there is one.
    fn forget(&mut self, name: &str) {
        self.0.retain(|e| !(e.source == Source::Learned && *e.target.name == *name));
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Exact,
    Wildcard,
}

/// Which map, under which key, the routes of `host` (as written) go: a
/// wildcard's under its suffix with the dot (`*.Example.com` → `.example.com`).
fn place(host: &str) -> (Kind, String) {
    let host = crate::host::normalize(host);
    match host.strip_prefix('*') {
        Some(suffix) => (Kind::Wildcard, suffix.to_string()),
        None => (Kind::Exact, host),
    }
}

/// A route's path prefix as matched: normalised, without a trailing `/`.
fn prefix(path: Option<&str>) -> Box<str> {
    crate::path::normalize_prefix(path).into_boxed_str()
}

/// Host (normalised) → its routes, exact hosts and wildcards apart.
type Hosts = imbl::HashMap<Box<str>, Entries>;

/// An immutable routing table, rebuilt on reload and changed route by
/// route ([`Router::learn`]) when the routes learned from NATS change.
#[derive(Debug, Clone, Default)]
pub struct Router {
    exact: Hosts,
    /// Wildcard suffixes including the leading dot, e.g. ".example.com".
    wildcard: Hosts,
    /// Routes left out because another has the same host and prefix.
    shadowed: usize,
}

impl Router {
    /// The table of the config's routes; `pools` are the config's, in
    /// its order.
    pub fn new(config: &Config, pools: &[Arc<Pool>]) -> Router {
        Router::build(file_routes(config, pools))
    }

    /// Builds the table from `(host, path prefix, target)` routes (the
    /// config's), hosts and prefixes as written. When two routes have the
    /// same host and prefix, the first one wins ([`Router::shadowed`]
    /// counts the others).
    pub fn build<'a>(routes: impl IntoIterator<Item = (&'a str, Option<&'a str>, RouteTarget)>) -> Router {
        let mut router = Router::default();
        for (host, path, target) in routes {
            let (kind, key) = place(host);
            router.change(kind, &key, |e| e.insert(Entry { prefix: prefix(path), source: Source::File, target }));
        }
        router
    }

    /// This table with the config's routes replaced by `file`'s and the
    /// learned routes kept (a reload).
    pub fn with_file_routes(&self, file: Router) -> Router {
        let mut router = file;
        for (kind, hosts) in [(Kind::Exact, &self.exact), (Kind::Wildcard, &self.wildcard)] {
            for (key, entries) in hosts {
                let learned: Vec<Entry> = entries.0.iter().filter(|e| e.source == Source::Learned).cloned().collect();
                if !learned.is_empty() {
                    router.change(kind, key, |es| learned.into_iter().for_each(|e| es.insert(e)));
                }
            }
        }
        router
    }

    /// Adds (Some) or removes (None) the learned route `uri` (`host` or
    /// `host/path`, as NATS registered it), in place of the one it had.
    pub fn learn(&mut self, uri: &str, target: Option<RouteTarget>) {
        let (host, path) = split_uri(uri);
        let (kind, key) = place(host);
        self.change(kind, &key, |e| {
            e.forget(uri);
            if let Some(target) = target {
                e.insert(Entry { prefix: prefix(path), source: Source::Learned, target });
            }
        });
    }

    /// Applies `edit` to the routes under `key` (a normalised host, or a
    /// wildcard's suffix), keeping the shadowed count and dropping a key
    /// left without routes.
    fn change(&mut self, kind: Kind, key: &str, edit: impl FnOnce(&mut Entries)) {
        let hosts = match kind {
            Kind::Exact => &mut self.exact,
            Kind::Wildcard => &mut self.wildcard,
        };
        let mut entries = hosts.remove(key).unwrap_or_default();
        self.shadowed -= entries.shadowed();
        edit(&mut entries);
        self.shadowed += entries.shadowed();
        if !entries.0.is_empty() {
            hosts.insert(key.into(), entries);
        }
    }

    /// Routes left out because an earlier one (the config's first) has
    /// the same host and prefix.
    pub fn shadowed(&self) -> usize {
        self.shadowed
    }

    /// Finds the route for `host` (as sent, maybe with a port) and the
    /// normalised request path `path` ([`crate::path::normalize`]). An exact host that has no matching path prefix
    /// falls through to the wildcards, the longest suffix first.
    pub fn lookup(&self, host: &str, path: &str) -> Option<&RouteTarget> {
        let host = crate::host::normalize(host);
        if let Some(t) = self.exact.get(host.as_str()).and_then(|e| e.lookup(path)) {
            return Some(t);
        }
        if self.wildcard.is_empty() {
            return None;
        }
        // Each suffix that starts at a dot, with at least one character
        // before it: `a.b.example.com` tries `.b.example.com`, `.example.com`, `.com`.
        host.match_indices('.')
            .filter(|&(i, _)| i > 0)
            .find_map(|(i, _)| self.wildcard.get(&host[i..]).and_then(|e| e.lookup(path)))
    }
}

/// The config's `[[route]]`s as [`Router::build`] takes them; `pools`
/// are the config's, in its order.
pub fn file_routes<'a>(
    config: &'a Config,
    pools: &[Arc<Pool>],
) -> impl Iterator<Item = (&'a str, Option<&'a str>, RouteTarget)> {
    let pool_index: HashMap<&str, Arc<Pool>> =
        config.pools.iter().zip(pools).map(|(p, pool)| (p.name.as_str(), pool.clone())).collect();
    config.routes.iter().map(move |r| {
        let target = RouteTarget {
            pool: pool_index[r.pool.as_str()].clone(),
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
    use crate::upstream::Registry;
    use std::path::Path;

    fn router(routes: &str) -> Router {
        let text = format!(
            "[[listener]]\nname=\"w\"\nbind=\"127.0.0.1:1\"\nprotocol=\"http\"\n[[pool]]\nname=\"a\"\n[[pool]]\nname=\"b\"\n[[pool]]\nname=\"c\"\n{routes}"
        );
        let config = Config::parse(Path::new("t"), &text).unwrap();
        let registry = Registry::new();
        let pools: Vec<_> =
            config.pools.iter().map(|p| Arc::new(Pool::new(p, &config.backends, &registry, None))).collect();
        Router::new(&config, &pools)
    }

    /// A target whose pool is named by `i` (0: "a", 1: "b", …).
    fn target(i: u8, name: &str) -> RouteTarget {
        let pool = Pool::learned(
            &char::from(b'a' + i).to_string(),
            [],
            Default::default(),
            &Default::default(),
            &Registry::new(),
            crate::upstream::Learned::Nats,
        );
        RouteTarget { pool: Arc::new(pool), name: name.into(), route_service: None }
    }

    /// The index of the pool `host` and `path` are routed to ("a" is 0).
    fn pool(r: &Router, host: &str, path: &str) -> Option<usize> {
        r.lookup(host, path).map(|t| usize::from(t.pool.name.as_bytes()[0] - b'a'))
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
        let mut r = Router::build([("h.e.com", Some("/api"), target(0, "file"))]);
        r.learn("H.E.com/api/", Some(target(1, "H.E.com/api/")));
        r.learn("h.e.com", Some(target(2, "h.e.com")));
        assert_eq!(r.shadowed(), 1);
        assert_eq!(pool(&r, "h.e.com", "/api/x"), Some(0));
        assert_eq!(pool(&r, "h.e.com", "/"), Some(2));
        assert_eq!(split_uri("a.e.com/x/y"), ("a.e.com", Some("/x/y")));
        assert_eq!(split_uri("a.e.com"), ("a.e.com", None));
    }

    #[test]
    fn learned_routes_change_one_at_a_time_and_survive_a_reload() {
        let file = || Router::build([("f.org", None, target(0, "f.org"))]);
        let mut r = file();
        r.learn("a.e.com/x", Some(target(1, "a.e.com/x")));
        r.learn("*.e.com", Some(target(2, "*.e.com")));
        let before = r.clone();
        // Re-learned: the new target replaces the old one, not beside it.
        r.learn("a.e.com/x", Some(target(3, "a.e.com/x")));
        assert_eq!((pool(&r, "a.e.com", "/x/1"), r.shadowed()), (Some(3), 0));
        assert_eq!(pool(&r, "a.e.com", "/y"), Some(2), "an exact host without the prefix falls to the wildcard");
        // The clone taken before is untouched (a snapshot in use).
        assert_eq!(pool(&before, "a.e.com", "/x"), Some(1));
        // A reload keeps the learned routes; a file route now shadows one.
        let reloaded = r.with_file_routes(Router::build([("A.e.com", Some("/x/"), target(0, "a.e.com/x/"))]));
        assert_eq!((pool(&reloaded, "a.e.com", "/x"), reloaded.shadowed()), (Some(0), 1));
        assert_eq!(pool(&reloaded, "f.org", "/"), None, "the old file route is gone");
        assert_eq!(pool(&reloaded, "z.e.com", "/"), Some(2));
        // Forgotten: the host goes once its last route does; others stay.
        r.learn("a.e.com/x", None);
        r.learn("*.e.com", None);
        assert_eq!((pool(&r, "a.e.com", "/x"), pool(&r, "f.org", "/")), (None, Some(0)));
        assert!(r.exact.get("a.e.com").is_none() && r.wildcard.is_empty());
        // Forgetting what is not there changes nothing.
        r.learn("nope.e.com", None);
        assert_eq!((r.exact.len(), r.shadowed()), (1, 0));
    }

    #[test]
    fn a_shadowed_route_is_counted_whatever_else_has_its_prefix_length() {
        let mut r =
            Router::build([("h.e.com", Some("/ab"), target(0, "ab")), ("h.e.com", Some("/cd"), target(1, "cd"))]);
        r.learn("h.e.com/ab", Some(target(2, "h.e.com/ab")));
        r.learn("h.e.com/aa", Some(target(2, "h.e.com/aa")));
        assert_eq!(r.shadowed(), 1);
        assert_eq!(
            (pool(&r, "h.e.com", "/ab"), pool(&r, "h.e.com", "/cd"), pool(&r, "h.e.com", "/aa")),
            (Some(0), Some(1), Some(2))
        );
        r.learn("h.e.com/ab", None);
        assert_eq!(r.shadowed(), 0);
    }

    #[test]
    fn two_uris_for_one_host_and_prefix_the_first_wins_until_it_goes() {
        let mut r = Router::default();
        r.learn("a.e.com/x", Some(target(0, "a.e.com/x")));
        r.learn("A.e.com/x/", Some(target(1, "A.e.com/x/")));
        assert_eq!((pool(&r, "a.e.com", "/x"), r.shadowed()), (Some(0), 1));
        r.learn("a.e.com/x", None);
        assert_eq!((pool(&r, "a.e.com", "/x"), r.shadowed()), (Some(1), 0));
    }

    #[test]
    fn the_longest_wildcard_suffix_wins_and_falls_through_by_path() {
        let mut r = Router::default();
        r.learn("*.e.com", Some(target(0, "*.e.com")));
        r.learn("*.b.e.com/only", Some(target(1, "*.b.e.com/only")));
        assert_eq!(pool(&r, "a.b.e.com", "/only/x"), Some(1));
        assert_eq!(pool(&r, "a.b.e.com", "/other"), Some(0));
        assert_eq!(pool(&r, "b.e.com", "/only"), Some(0));
        assert_eq!(pool(&r, "e.com", "/"), None);
        assert_eq!(pool(&r, ".e.com", "/"), None);
    }
}
