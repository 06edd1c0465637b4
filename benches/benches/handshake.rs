//! The control plane's per-connection work on a realistic ~500-byte
//! WebSocket upgrade request: parse the head, rewrite it, route it.
//! `cargo bench -p upsplice-benches --bench handshake` — throughput is in
//! bytes of request head.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use upsplice::config::Config;
use upsplice::handshake::head::parse_request;
use upsplice::handshake::rewrite::{rewrite, ClientInfo};
use upsplice::route::RouteTarget;
use upsplice::state::Snapshot;
use upsplice::upstream::{Learned, Pool, Registry};

const REQUEST: &[u8] = b"GET /v2/firehose/stream?filter=logs HTTP/1.1\r\n\
Host: doppler.system.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Accept-Language: en-US,en;q=0.9\r\n\
Cache-Control: no-cache\r\n\
Connection: Upgrade\r\n\
Upgrade: websocket\r\n\
Origin: https://apps.example.com\r\n\
Sec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
Authorization: bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyIn0.c2lnbmF0dXJl\r\n\
X-Forwarded-For: 203.0.113.9\r\n\r\n";

fn config() -> Config {
    let mut text = String::from("[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:8080\"\nprotocol = \"http\"\n[[pool]]\nname = \"p\"\nbackends = [\"127.0.0.1:9001\"]\n");
    // A routing table of realistic size: 1,000 exact hosts and 100 wildcards.
    for i in 0..1000 {
        text.push_str(&format!("[[route]]\nhost = \"app{i}.apps.example.com\"\npool = \"p\"\n"));
    }
    for i in 0..100 {
        text.push_str(&format!("[[route]]\nhost = \"*.tenant{i}.example.com\"\npool = \"p\"\n"));
    }
    text.push_str("[[route]]\nhost = \"doppler.system.example.com\"\npath = \"/v2\"\npool = \"p\"\n");
    Config::parse(Path::new("bench.toml"), &text).unwrap()
}

fn bench(c: &mut Criterion) {
    // The routing table as a running router builds it (its snapshot).
    let router = Snapshot::new(config(), &Registry::new()).unwrap().router;
    let client = ClientInfo {
        peer: "192.0.2.10".parse().unwrap(),
        trusted: false,
        forwarded_proto: "https",
        now_ms: 1_700_000_000_000,
        request_id: "6f1c1c3e-0000-4000-8000-000000000001",
        forwarded_client_cert: Default::default(),
        client_cert: None,
    };
    let mut g = c.benchmark_group("upgrade_request");
    g.throughput(Throughput::Bytes(REQUEST.len() as u64));
    g.bench_function("parse", |b| b.iter(|| parse_request(black_box(REQUEST), 16384).unwrap().unwrap()));
    let req = parse_request(REQUEST, 16384).unwrap().unwrap();
    g.bench_function("rewrite", |b| b.iter(|| rewrite(black_box(&req), &client, true).unwrap()));
    g.bench_function("route", |b| {
        b.iter(|| {
            &router.lookup(black_box("doppler.system.example.com"), black_box("/v2/firehose/stream")).unwrap().pool
        })
    });
    g.bench_function("parse_rewrite_route", |b| {
        b.iter(|| {
            let req = parse_request(black_box(REQUEST), 16384).unwrap().unwrap();
            let fwd = rewrite(&req, &client, true).unwrap();
            &router.lookup(&fwd.host, &fwd.path).unwrap().pool
        })
    });
    g.finish();

    // The same lookups once 100,000 endpoints over 50,000 URIs were learned
    // from NATS (as `scripts/bench --only nats` registers them), one route
    // at a time into the persistent table: what a request pays for a big table.
    let mut learned = router.clone();
    let registry = Registry::new();
    for i in 0..50_000u32 {
        let uri = format!("app-{i}.nats.bench");
        let endpoints =
            (0..2u32).map(|j| (format!("10.{}.{}.{}:61000", j, i >> 8 & 255, i & 255).parse().unwrap(), None));
        let pool = Pool::learned(&uri, endpoints, Default::default(), &Default::default(), &registry, Learned::Nats);
        let target = RouteTarget { pool: Arc::new(pool), name: uri.as_str().into(), route_service: None };
        learned.learn(&uri, Some(target));
    }
    let mut g = c.benchmark_group("route_lookup");
    for (name, table) in [("file_1100", &router), ("with_50000_learned", &learned)] {
        g.bench_function(format!("{name}/file_route"), |b| {
            b.iter(|| &table.lookup(black_box("app731.apps.example.com"), black_box("/ws")).unwrap().pool)
        });
        g.bench_function(format!("{name}/wildcard"), |b| {
            b.iter(|| &table.lookup(black_box("a.b.tenant42.example.com"), black_box("/")).unwrap().pool)
        });
    }
    g.bench_function("with_50000_learned/learned_route", |b| {
        b.iter(|| &learned.lookup(black_box("app-31337.nats.bench"), black_box("/")).unwrap().pool)
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
