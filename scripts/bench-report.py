#!/usr/bin/env python3
"""Report writer for scripts/bench (Python 3.11 standard library only).

    bench-report.py line RUN.json RC          one progress line for a loadgen run
    bench-report.py report OUTDIR REPORT.md LOADGEN
                                              docs/benchmarks.md + SVGs next to it (REPORT's dir/bench/)
    bench-report.py http-ka-line OUTDIR/http-keepalive.jsonl
                                              the progress line of the http keep-alive section's last run
    bench-report.py fleet-line OUTDIR NAME    the progress line of one fleet run (out/fleet-NAME-*)
    bench-report.py section http-keepalive|tls|nats|fleet OUTDIR REPORT.md
                                              only that section, added to REPORT.md or replacing its own there

Every figure in the report comes from the files scripts/bench wrote into
OUTDIR: runs.jsonl (one line per generator run: router, workload, which
pids it watched), the loadgen JSON summaries (schema
upsplice-loadgen/summary/v1, whose `watch` object holds the router's and
the backends' CPU, RSS and fds and the machine's busy CPU over the run),
meta.env and check.txt.

The report is one function per section; the systems compared (direct, the
upsplice planes, HAProxy, nginx) are the TARGETS table.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

GIB = 1024 ** 3


@dataclass(frozen=True)
class Target:
    """One system the benchmark drives."""
    name: str
    kind: str    # "direct" (the baseline), "plane" (an upsplice data plane), "haproxy" (the reference), "nginx"
    color: str   # in the plots

    @property
    def is_plane(self) -> bool:
        return self.kind == "plane"

    @property
    def vs_direct(self) -> bool:
        """Ratios to direct are shown for everything but direct itself."""
        return self.kind != "direct"

    @property
    def vs_haproxy(self) -> bool:
        """Ratios to HAProxy are shown for the planes and nginx."""
        return self.kind in ("plane", "nginx")


TARGETS = [
    Target("direct", "direct", "#000000"),
    Target("upsplice-adaptive", "plane", "#e377c2"),
    Target("upsplice-sockmap", "plane", "#d62728"),
    Target("upsplice-uring", "plane", "#ff7f0e"),
    Target("upsplice-splice", "plane", "#2ca02c"),
    Target("upsplice-copy", "plane", "#1f77b4"),
    Target("haproxy", "haproxy", "#9467bd"),
    Target("nginx", "nginx", "#8c564b"),
]
BY_NAME = {t.name: t for t in TARGETS}
PLANES = [t.name for t in TARGETS if t.is_plane]


def vs_direct(r: str) -> bool:
    return BY_NAME[r].vs_direct


def vs_haproxy(r: str) -> bool:
    return BY_NAME[r].vs_haproxy

# ------------------------------------------------------------------ helpers
def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def ms(us) -> str:
    return "–" if us is None else f"{us / 1000:.3f}"


def num(v, digits=0) -> str:
    if v is None:
        return "–"
    if digits == 0:
        return f"{v:,.0f}".replace(",", " ")
    return f"{v:,.{digits}f}".replace(",", " ")


def ratio(a, b, digits=2) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.{digits}f}"


def pos_ratio(a, b, digits=2) -> str:
    """a / b for costs over a baseline: only when both are positive (noise can make either negative)."""
    if a is None or b is None or a <= 0 or b <= 0:
        return "–"
    return f"{a / b:.{digits}f}"


def flags(s, rc) -> str:
    """Marks for a run a reader must not take at face value."""
    if s is None:
        return "✗ no result"
    out = []
    if not s.get("valid", False) or rc != 0:
        errs = {k: v for k, v in s.get("errors", {}).items() if v}
        out.append("✗ invalid" + (f" ({', '.join(f'{k} {v}' for k, v in errs.items())})" if errs else "")
                   + (f", unsent {s['unsent']}" if s.get("unsent") else ""))
    if s.get("mode") != "tcp-bulk" and not s.get("rate_reached", True):
        out.append("⚠ rate not reached")
    return " ".join(out) if out else "ok"


def lat(s, kind="corrected"):
    return (s or {}).get("latency_us", {}).get(kind, {}) or {}


def line(path: str, rc: str) -> str:
    s = load(Path(path))
    if s is None:
        return f"no result (exit {rc})"
    cpu = s.get("cpu", {}).get("cores_busy", 0)
    if s["mode"] == "tcp-bulk":
        t = s.get("throughput") or {}
        return (f"{t.get('out_mbit_s', 0) + t.get('in_mbit_s', 0):10.0f} Mbit/s over {s['connections_ok']} conn | "
                f"gen {cpu:.2f} cores | {flags(s, int(rc))}")
    if s.get("search"):
        x = s["search"]
        return (f"sustained {x['answer_rate']:.0f}/s ({len(x['steps'])} steps, stopped: {x['stopped_by']}) | "
                + " ".join(f"{fmt_rate(t['rate'])}:{'✓' if t['pass'] else '✗'}" for t in x["steps"]) + f" | {flags(s, int(rc))}")
    c, cn, up = lat(s), lat(s, "connect"), lat(s, "upgrade")
    if s["mode"] == "hold":
        h, w = s.get("hold") or {}, s.get("watch") or {}
        procs = w.get("processes") or []
        rss = f"RSS {procs[0]['rss_kib_start']} -> peak {procs[0]['rss_kib_peak']} KiB, fds peak {procs[0]['fds_peak']} " if procs else ""
        return (f"{h.get('held', 0)} held of {s['connections']} | {rss}(first watched pid) | established peak "
                f"{(w.get('port') or {}).get('established_peak', '?')} | echoes {s['received']}/{s['sent']} | {flags(s, int(rc))}")
    return (f"{s['achieved_rate']:9.0f}/s of {s['target_rate']:.0f} | p50 {ms(c.get('p50'))} p99 {ms(c.get('p99'))} "
            f"p99.9 {ms(c.get('p999'))} ms | conn {s['connections_ok']}/{s['connections']} "
            f"connect+upgrade p99 {ms((cn.get('p99') or 0) + (up.get('p99') or 0))} ms | gen {cpu:.2f} cores | {flags(s, int(rc))}")


# ------------------------------------------------------------------ SVG
def svg_rate_vs_p99(series: dict[str, list[tuple[float, float, bool, str]]], limit_ms: float, title: str) -> str:
    """messages/s (log x) against corrected p99 in ms (log y); one line per router.
    A point whose run did not reach its rate or was invalid is drawn hollow."""
    W, H, L, R, T, B = 760, 460, 70, 170, 40, 50
    pts = [p for v in series.values() for p in v]
    if not pts:
        return "<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>"
    xmin = 10 ** math.floor(math.log10(min(p[0] for p in pts)))
    xmax = 10 ** math.ceil(math.log10(max(p[0] for p in pts)))
    ys = [p[1] for p in pts] + [limit_ms]
    ymin = 10 ** math.floor(math.log10(max(min(ys), 1e-3)))
    ymax = 10 ** math.ceil(math.log10(max(ys)))
    if ymax <= ymin:
        ymax = ymin * 10

    xlo, xhi = math.log10(xmin) - 0.05, math.log10(xmax) + 0.05   # a little room for points on a decade

    def X(v):
        return L + (math.log10(v) - xlo) / (xhi - xlo) * (W - L - R)

    def Y(v):
        v = max(v, ymin)
        return H - B - (math.log10(v) - math.log10(ymin)) / (math.log10(ymax) - math.log10(ymin)) * (H - T - B)

    o = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' font-family='sans-serif' font-size='12'>",
         f"<rect width='{W}' height='{H}' fill='white'/>",
         f"<text x='{W / 2 - R / 2}' y='22' text-anchor='middle' font-size='14'>{esc(title)}</text>"]
    d = xmin
    while d <= xmax * 1.0001:
        x = X(d)
        o.append(f"<line x1='{x:.1f}' y1='{T}' x2='{x:.1f}' y2='{H - B}' stroke='#ddd'/>"
                 f"<text x='{x:.1f}' y='{H - B + 16}' text-anchor='middle'>{fmt_rate(d)}</text>")
        d *= 10
    d = ymin
    while d <= ymax * 1.0001:
        y = Y(d)
        o.append(f"<line x1='{L}' y1='{y:.1f}' x2='{W - R}' y2='{y:.1f}' stroke='#ddd'/>"
                 f"<text x='{L - 6}' y='{y + 4:.1f}' text-anchor='end'>{d:g}</text>")
        d *= 10
    y = Y(limit_ms)
    o.append(f"<line x1='{L}' y1='{y:.1f}' x2='{W - R}' y2='{y:.1f}' stroke='#999' stroke-dasharray='6,4'/>"
             f"<text x='{W - R - 4}' y='{y - 4:.1f}' text-anchor='end' fill='#666'>p99 = {limit_ms:g} ms</text>")
    o.append(f"<text x='{(L + W - R) / 2}' y='{H - 12}' text-anchor='middle'>messages/s offered (1,000 tunnels, 64 B, log scale)</text>")
    o.append(f"<text x='16' y='{(T + H - B) / 2}' text-anchor='middle' transform='rotate(-90 16 {(T + H - B) / 2})'>corrected p99 (ms, log scale)</text>")
    ly = T + 10
    for name, p in series.items():
        if not p:
            continue
        col = BY_NAME[name].color if name in BY_NAME else "#333"
        p = sorted(p)
        line_pts = [q for q in p if q[3] == "step"]
        if len(line_pts) > 1:
            o.append("<polyline fill='none' stroke='{}' stroke-width='2' points='{}'/>".format(
                col, " ".join(f"{X(a):.1f},{Y(b):.1f}" for a, b, _, _ in line_pts)))
        for a, b, good, kind in p:
            fill = col if good else "white"
            if kind == "step":
                o.append(f"<circle cx='{X(a):.1f}' cy='{Y(b):.1f}' r='4' stroke='{col}' stroke-width='2' fill='{fill}'/>")
            else:
                o.append(f"<rect x='{X(a) - 4:.1f}' y='{Y(b) - 4:.1f}' width='8' height='8' stroke='{col}' stroke-width='2' fill='{fill}'/>")
        o.append(f"<line x1='{W - R + 12}' y1='{ly}' x2='{W - R + 36}' y2='{ly}' stroke='{col}' stroke-width='2'/>"
                 f"<text x='{W - R + 42}' y='{ly + 4}'>{esc(name)}</text>")
        ly += 18
    o.append(f"<text x='{W - R + 12}' y='{ly + 10}' fill='#666'>● search steps</text>"
             f"<text x='{W - R + 12}' y='{ly + 24}' fill='#666'>■ fixed-rate runs</text>"
             f"<text x='{W - R + 12}' y='{ly + 38}' fill='#666'>hollow: rate not</text>"
             f"<text x='{W - R + 12}' y='{ly + 52}' fill='#666'>reached or invalid</text>")
    o.append("</svg>")
    return "\n".join(o) + "\n"


def esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def fmt_rate(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"



# ------------------------------------------------------------------ the run's data
def watched(run) -> dict:
    """A run's CPU figures from the generator's `watch` (over its whole run): machine-wide busy seconds, the router's
    processes' CPU seconds (None without a router) and the backends'."""
    w = (run["s"] or {}).get("watch") or {}
    procs = {p["pid"]: p for p in w.get("processes") or []}

    def cpu_s(pids):
        got = [procs[p]["cpu_s"] for p in pids if p in procs]
        return sum(got) if got else None

    return dict(wall_s=w.get("window_s"), machine_cpu_s=(w.get("machine") or {}).get("busy_s"),
                router_cpu_s=cpu_s(run.get("router_pids") or []), echo_cpu_s=cpu_s(run.get("echo_pids") or []))


def idle_memory(run):
    """The router's memory in an idle-tunnel (`hold`) run: RSS and fds at the start (the fresh router) and at the peak
    (every tunnel open), summed over its processes (nginx: master + workers), and its established tunnels at the peak."""
    w = (run and run["s"] or {}).get("watch") or {}
    procs = [p for p in w.get("processes") or [] if p["pid"] in (run.get("router_pids") or [])]
    if not procs:
        return None
    return dict(tunnels_asked=run["param"], base_rss_kib=sum(p["rss_kib_start"] for p in procs),
                rss_kib=sum(p["rss_kib_peak"] for p in procs), base_fds=sum(p["fds_start"] for p in procs),
                fds=sum(p["fds_peak"] for p in procs), established=(w.get("port") or {}).get("established_peak", 0))


class Bench:
    """What scripts/bench wrote into OUTDIR, and the goals the sections judge."""

    def __init__(self, out: Path, dest: Path, loadgen: str):
        self.out, self.dest, self.loadgen = out, dest, loadgen
        self.meta = {}
        for ln in (out / "meta.env").read_text().splitlines():
            if "=" in ln:
                k, v = ln.split("=", 1)
                self.meta[k] = v
        self.runs = []
        for ln in (out / "runs.jsonl").read_text().splitlines():
            if ln.strip():
                r = json.loads(ln)
                r["s"] = load(out / r["json"])
                r.update(watched(r))
                self.runs.append(r)
        self.routers = [t.name for t in TARGETS if any(x["router"] == t.name for x in self.runs)]
        self.upsplices = [r for r in self.routers if BY_NAME[r].is_plane]
        check = (out / "check.txt").read_text() if (out / "check.txt").exists() else ""
        self.planes = [ln.strip() for ln in check.splitlines() if ln.startswith("  ") and ("available" in ln)]
        self.figdir = dest.parent / "bench"
        self.figdir.mkdir(parents=True, exist_ok=True)
        self.rel = os.path.relpath(self.figdir, dest.parent)
        self.fixed_rates = sorted({x["param"] for x in self.runs if x["workload"] == "fixed"})
        self.hs_limit = int(self.meta.get("hs_p99_limit_us", 10000))
        self.goals: list[tuple[str, str, str, str]] = []   # goal, measured, verdict, note

    def get(self, router, workload, param=None):
        for x in self.runs:
            if x["router"] == router and x["workload"] == workload and (param is None or x["param"] == param):
                return x
        return None

    def all_of(self, router, workload):
        return [x for x in self.runs if x["router"] == router and x["workload"] == workload]

    @staticmethod
    def section():
        """A section's lines and the function that appends one."""
        md: list[str] = []
        return md, md.append


# ------------------------------------------------------------------ sections
def header(b: Bench) -> list[str]:
    md, w = b.section()
    meta, routers, upsplices, get, all_of = b.meta, b.routers, b.upsplices, b.get, b.all_of

    quick = meta.get("quick") == "1"
    w("# Benchmarks: upsplice against direct, HAProxy and nginx")
    w("")
    w("<!-- Generated by scripts/bench (scripts/bench-report.py) from the run in out/bench/; do not edit by hand. -->")
    w("")
    if quick:
        w("> **Smoke run (`BENCH_QUICK=1`)**: short steps and few tunnels; the figures only show that the script works.")
        w("")
    w(f"Run of {meta.get('date_utc', '?')}, {int(meta.get('run_seconds', 0)) // 60} min {int(meta.get('run_seconds', 0)) % 60} s, "
      f"load average {meta.get('loadavg_start', '?')} at the start and {meta.get('loadavg_end', '?')} at the end "
      "(1/5/15 min; the machine has 2 cores, so anything above ~2 means other work was competing with this run).")
    w("")
    w("```")
    w(f"{meta.get('command', 'scripts/bench')}")
    w("```")
    w("")
    w("| | |")
    w("| --- | --- |")
    for k, label in [("nproc", "cores (nproc)"), ("cpu", "CPU"), ("mem", "memory"), ("kernel", "kernel"), ("rustc", "rustc"),
                     ("haproxy", "HAProxy"), ("nginx", "nginx"), ("commit", "upsplice commit"), ("nofile", "open files (soft/hard)"),
                     ("somaxconn", "net.core.somaxconn")]:
        w(f"| {label} | {meta.get(k, '?')} |")
    w("")
    return md


def how_to_run(b: Bench) -> list[str]:
    md, w = b.section()
    meta, routers, upsplices, get, all_of = b.meta, b.routers, b.upsplices, b.get, b.all_of
    w("## How to run")
    w("")
    w("```sh")
    w("scripts/bench                 # the full run (this report): about 21 minutes on this 2-core machine, bounded under 27 (a 25-min budget)")
    w("BENCH_QUICK=1 scripts/bench   # smoke run, about 3-4 minutes: short steps, 1,000 idle tunnels")
    w("scripts/bench --only http-keepalive   # that section alone, about 1.5 minutes; replaces only its part of this file")
    w("scripts/bench --only tls      # TLS termination against HAProxy, about 5 minutes (quick: 2); replaces only its section")
    w("scripts/bench --only nats     # routes from NATS at scale (a real nats-server, 100,000 endpoints), about 1 minute; replaces only its section")
    w("scripts/bench --only fleet    # handshake rate through a three-node fleet behind HAProxy against one node, about 2 minutes; replaces only its section")
    w("```")
    w("")
    w("It runs `scripts/setup` (haproxy, nginx, wrk from apt; the eBPF toolchain) and installs `libnginx-mod-stream` for "
      "nginx's tcp row, builds the release binaries, starts the echo and discard backends, then every router in turn, and "
      "writes this file, the plots in `docs/bench/` and the raw results in `out/bench/` (`runs.jsonl`: one line per "
      "generator run and the pids it watched; `*.json`: the generator's summaries, schema `upsplice-loadgen/summary/v1`, "
      "with the router's and the backends' CPU, RSS and fds and the machine's CPU in `watch`; `*.hlog`; `conf/`: every router configuration as run; the routers' logs). It needs 127.0.0.1 ports "
      "20101–20107 and 20111–20118 free (the fleet section: 20120–20126, and 20121–20122 on 127.0.0.11–13; "
      "`BENCH_PORT_BASE` moves them) and root or CAP_BPF + CAP_NET_ADMIN for the sockmap plane. Every "
      "process it starts is stopped by PID at the end, on Ctrl-C and on errors. Other knobs: `BENCH_ROUTERS` (a subset of "
      "`upsplice-adaptive upsplice-sockmap upsplice-uring upsplice-splice upsplice-copy haproxy nginx`), `BENCH_IDLE_TUNNELS`, "
      "`BENCH_OUT`, `BENCH_REPORT`, `BENCH_SKIP_SETUP=1`, `BENCH_TLS_KEY=ec|rsa` (see the head of `scripts/bench`).")
    w("")
    w("Contents: [how to run](#how-to-run) · [setup](#setup) · [data planes](#data-planes) · [targets](#targets) · [message latency](#message-latency-at-fixed-rates) · "
      "[sustained rate](#highest-rate-with-p99-under-1-ms) · [handshakes](#handshakes) · [churn](#connection-churn) · [bulk](#bulk-throughput) · [two-way bulk](#two-way-bulk-throughput) · "
      "[HTTP keep-alive](#http-keep-alive-small-gets) · [TLS](#tls-termination-upsplice-rustls-and-haproxy-openssl) · [NATS](#routes-from-nats-at-scale) · [fleet](#a-three-node-fleet-against-one-node) · [CPU](#cpu-per-million-messages-and-per-gib) · [idle tunnels](#idle-tunnels-memory-and-the-largest-count) · "
      "[drift](#drift-of-the-shared-machine) · [known problems](#known-problems)")
    w("")

    return md


def setup(b: Bench) -> list[str]:
    md, w = b.section()
    meta, routers, upsplices, get, all_of = b.meta, b.routers, b.upsplices, b.get, b.all_of
    w("## Setup")
    w("")
    w(f"Everything runs on one machine over loopback (127.0.0.0/8): the generator (`upsplice-loadgen`, one thread), the router and the "
      "bundled echo backend (`upsplice-loadgen echo --threads 1`, WebSocket echo; a second one in `--mode discard` for bulk) share "
      f"the {meta.get('nproc', '?')} cores. Nothing is pinned. Each router is started, runs all its workloads back to back, and is "
      "stopped before the next one starts; a short direct run before each router shows drift (last section).")
    w("")
    w("* **direct**: the generator talks to the echo backend itself — the physical limit; every ratio is against it.")
    w("* **upsplice-⟨plane⟩**: `upsplice run` with `data_plane.mode` set to that plane, an http listener routing `Host: bench.local` "
      "to the echo backend, and a tcp listener forwarding to the discard backend (bulk); `[runtime]` at its defaults "
      "(see the README: one worker thread per core with its own listening sockets since 2026-12-07, tokio's work-stealing "
      "scheduler on two threads before).")
    w("* **haproxy**: `nbthread 2` (one thread per core, also its default here), `mode http` with `option forwardfor` for "
      "WebSocket upgrades (`timeout tunnel 1h`), `mode tcp` for bulk; `maxconn 9800`.")
    w("* **nginx**: `worker_processes 2`, `proxy_http_version 1.1` with the `Upgrade`/`Connection` headers, listen backlog 4096"
      + ("; bulk through the `stream` module." if meta.get("nginx_stream") == "yes" else "; no bulk row (the stream module is not installed)."))
    w("")
    w("Configurations as run: `out/bench/conf/` (written by the script). Workloads (all open-loop, latency corrected for coordinated "
      "omission — see [loadgen/README.md](../loadgen/README.md)):")
    w("")
    w(f"1. **Handshakes**: at each offered rate H in {meta.get('hs_rates')} new connections/s, H WebSocket connections are opened on an "
      "open-loop schedule (`ws --ramp-rate H -c H`, over source addresses 127.0.0.1–4) and each does connect + HTTP upgrade; connect "
      f"and upgrade latency come from the generator's histograms. A step passes when every connection upgraded, no error occurred and "
      f"connect p99 + upgrade p99 < {int(meta.get('hs_p99_limit_us', 0)) / 1000:g} ms; the handshake rate is the highest passing step.")
    w(f"1b. **Churn**: whole tunnel lifecycles at each rate in {meta.get('churn_rates')} per second for {meta.get('churn_d')} "
      "(`churn -r R -c 512`: connect, upgrade, one echoed message, client-first close), so each data plane's teardown is in "
      "the cost too. A step passes when every cycle completed, no error occurred and the corrected cycle p99 < "
      f"{int(meta.get('hs_p99_limit_us', 0)) / 1000:g} ms.")
    w(f"2. **Fixed rates**: {meta.get('conns')} tunnels × {meta.get('size')}-byte messages at 20,000 and 100,000 messages/s total "
      f"({meta.get('fixed')}); corrected p50/p99/p99.9.")
    w(f"3. **Sustained rate**: `upsplice-loadgen search` ({meta.get('search')}), {meta.get('conns')} tunnels: the floor, the "
      "ceiling, then bisection at the geometric middle of the last passing and the first failing rate; a step passes when the run "
      f"is valid, reached its rate and the corrected p99 < {int(meta.get('p99_limit_us', 1000)) / 1000:g} ms, and a failing step "
      "is measured once more before it counts.")
    w(f"4. **Bulk**: raw TCP, one way (`tcp --mode bulk --direction up`, {int(meta.get('bulk_chunk', 0)) // 1024} KiB writes, "
      f"{meta.get('bulk_d')}) to the discard backend, through 1 and through 8 connections; routers through their tcp listener "
      "(upsplice `protocol = \"tcp\"`, HAProxy `mode tcp`, nginx `stream`). Upgraded WebSocket tunnels use the same data plane "
      "in upsplice; the tcp listener just skips the HTTP handshake.")
    w(f"4b. **Two-way bulk**: raw TCP through a raw TCP echo backend that stops reading while its write blocks, the client "
      f"writing and reading at once (`tcp --mode bulk --direction both`), through 1 and through 8 connections, same sizes and "
      f"durations as one-way bulk.")
    w("5. **CPU**: machine-wide busy time from `/proc/stat` (user+nice+system+irq+softirq+steal) over each generator run, minus "
      "the same workload run direct — sockmap and io_uring work runs in kernel threads and softirqs that are not charged to the "
      "router process — and the router's own utime+stime from `/proc/PID/stat` (nginx: master + workers); the generator "
      "measures both over its run (`--watch-pid`).")
    w(f"6. **Idle tunnels**: {meta.get('idle_n')} WebSocket tunnels opened at 3,000/s over 127.0.0.1–127.0.0.4 on the *fresh* "
      "router (its first workload) and held a period and a second once all are open (`upsplice-loadgen hold`); each "
      f"tunnel sends one 64-byte message every {meta.get('idle_period', '?')} s (i.e. {meta.get('idle_n')}/{meta.get('idle_period', '?')} "
      "messages/s in total), so the tunnels are nearly idle and every one is checked to still echo. The generator reads the "
      "router's RSS (`VmRSS`) and open fds every 100 ms (`--watch-pid`) and the established connections on its listener "
      "port (`--watch-port`, as `ss` counts them): at the start (the fresh router) and at the peak (all tunnels open).")
    w("")
    w(f"Generator ceiling: [benchmarks-loadgen.md](benchmarks-loadgen.md) (`scripts/bench-loadgen.sh`). Rows marked "
      "**⚠ rate not reached** or **✗ invalid** were limited by something — the generator, the router or the machine — and their "
      "latency must not be compared as if the rate had been driven; the `gen` column is the generator's own CPU (cores busy over "
      "its run) so a reader can tell who ran out of CPU.")
    w("")

    return md


def data_planes(b: Bench) -> list[str]:
    md, w = b.section()
    meta, routers, upsplices, get, all_of = b.meta, b.routers, b.upsplices, b.get, b.all_of
    w("## Data planes")
    w("")
    w("`upsplice check` on this machine (every available plane is measured):")
    w("")
    w("```")
    for p in b.planes:
        w(p)
    w("```")
    w("")
    # The router's own count of which plane carried the tunnels (GET /metrics at the end of its runs).
    mrows = []
    for r in upsplices:
        f = b.out / f"{r}.metrics"
        if not f.exists():
            continue
        tun, fb, mv = {}, {}, {}
        for ln in f.read_text().splitlines():
            if ln.startswith("upsplice_dataplane_moves_total{"):
                kind = ln.split('kind="')[1].split('"')[0]
                mv[kind] = mv.get(kind, 0) + int(float(ln.split()[-1]))
            if ln.startswith("upsplice_tunnels_total{"):
                plane = ln.split('data_plane="')[1].split('"')[0]
                tun[plane] = tun.get(plane, 0) + int(float(ln.split()[-1]))
            elif ln.startswith("upsplice_dataplane_fallbacks_total{"):
                plane = ln.split('data_plane="')[1].split('"')[0]
                fb[plane] = fb.get(plane, 0) + int(float(ln.split()[-1]))
        mrows.append(f"| {r} | {', '.join(f'{k} {num(v)}' for k, v in sorted(tun.items())) or '–'} | "
                     f"{', '.join(f'{k} {num(v)}' for k, v in sorted(fb.items()) if v) or 'none'} | "
                     f"{', '.join(f'{k} {num(v)}' for k, v in sorted(mv.items()) if v) or 'none'} |")
    if mrows:
        w("Which plane carried the tunnels to their end, by the router's own `/metrics` at the end of its runs "
          "(`upsplice_tunnels_total`, `upsplice_dataplane_fallbacks_total`, and `upsplice_dataplane_moves_total` by kind: "
          "`upsplice-adaptive` promotes chatty tunnels from splice to sockmap and demotes saturating ones back):")
        w("")
        w("| router | tunnels by data plane | fallbacks | moves |")
        w("| --- | --- | --- | --- |")
        md.extend(mrows)
        w("")

    return md


def fixed_latency(b: Bench) -> list[str]:
    md, w = b.section()
    meta, routers, upsplices, get, all_of = b.meta, b.routers, b.upsplices, b.get, b.all_of
    fixed_tables = []
    baselines = {}
    for rate in b.fixed_rates:
        d = get("direct", "fixed", rate)
        # Baseline: the median p99 of every direct run at this rate (the fixed
        # run and the drift probes before each router), so that one hiccup
        # of the shared machine in one direct run does not decide every ratio.
        dps = sorted(lat(x["s"])["p99"] for x in b.runs if x["router"] == "direct" and x["workload"] in ("fixed", "probe")
                     and x["s"] and x["s"].get("valid") and x["s"]["target_rate"] == rate and lat(x["s"]).get("p99") is not None)
        dp99 = dps[len(dps) // 2] if len(dps) % 2 else (dps[len(dps) // 2 - 1] + dps[len(dps) // 2]) / 2 if dps else None
        baselines[rate] = (dp99, len(dps))
        hp = get("haproxy", "fixed", rate)
        hp_added = (lat(hp["s"]).get("p99") - dp99) if hp and hp["s"] and dp99 is not None else None
        rows = []
        for r in routers:
            x = get(r, "fixed", rate)
            if not x:
                continue
            s = x["s"]
            c = lat(s)
            added = (c.get("p99") - dp99) if c.get("p99") is not None and dp99 is not None and vs_direct(r) else None
            rows.append((r, x, s, c, added))
        fixed_tables.append((rate, d, dp99, hp_added, rows))
        # target: best upsplice plane's added p99 <= half of HAProxy's added p99
        cands = [(added, r) for r, x, s, c, added in rows
                 if BY_NAME[r].is_plane and added is not None and s and s.get("valid") and s.get("rate_reached")]
        if cands and hp_added is not None:
            best_added, best = min(cands)
            rr = best_added / hp_added if hp_added > 0 else float("inf")
            verdict = ("met" if rr <= 0.5 else "not met") if hp_added > 0 else "could not be measured"
            note = f"{best}: {best_added / 1000:+.3f} ms p99 over direct; HAProxy: {hp_added / 1000:+.3f} ms"
            if hp_added <= 0:
                note += " (HAProxy's p99 is not above direct's in this run: the noise of the machine is larger than what HAProxy adds, so there is no ratio)"
            hs = hp["s"] if hp else None
            if hs and not (hs.get("valid") and hs.get("rate_reached")):
                note += " (HAProxy's run did not reach the rate or was invalid)"
            shown = ("–" if hp_added <= 0 else f"{rr:.2f} × HAProxy's added p99" if best_added > 0
                     else "upsplice's p99 is not above direct's (adds nothing measurable)")
            b.goals.append((f"Message latency at {num(rate)}/s: upsplice adds ≤ ½ of HAProxy's added p99", shown, verdict, note))
        else:
            b.goals.append((f"Message latency at {num(rate)}/s: upsplice adds ≤ ½ of HAProxy's added p99", "–",
                            "could not be measured", "no valid upsplice or HAProxy run at this rate reached its rate"))

    w("## Message latency at fixed rates")
    w("")
    w(f"{meta.get('conns')} WebSocket tunnels, {meta.get('size')}-byte messages, open loop, latency corrected from the intended send time "
      "(uncorrected: from the actual write). *added p99* = the router's corrected p99 minus direct's at the same rate — "
      "direct's being the **median p99 of all direct runs at that rate** (the fixed run and, at 20,000/s, the drift probes "
      "before each router; see the drift table), so one hiccup of the shared machine does not decide every ratio; "
      "*vs HAProxy* = added p99 / HAProxy's added p99. `send lag p99` is the generator's own lateness.")
    w("")
    for rate, d, dp99, hp_added, rows in fixed_tables:
        w(f"### {num(rate)} messages/s")
        w("")
        w(f"Direct baseline p99: {ms(dp99)} ms (median of {baselines[rate][1]} direct run{'s' if baselines[rate][1] != 1 else ''}).")
        w("")
        w("| router | achieved/s | p50 (ms) | p99 (ms) | p99.9 (ms) | uncorr. p99 (ms) | added p99 (ms) | vs HAProxy | send lag p99 (ms) | gen (cores) | router CPU (cores) | run |")
        w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for r, x, s, c, added in rows:
            u = lat(s, "uncorrected")
            lag = lat(s, "send_lag")
            rcpu = x["router_cpu_s"] / x["wall_s"] if x.get("router_cpu_s") is not None and x["wall_s"] else None
            w(f"| {r} | {num(s and s.get('achieved_rate'))} | {ms(c.get('p50'))} | {ms(c.get('p99'))} | {ms(c.get('p999'))} | "
              f"{ms(u.get('p99'))} | {'–' if added is None else ms(added)} | "
              f"{pos_ratio(added, hp_added) if vs_haproxy(r) else '–'} | {ms(lag.get('p99'))} | "
              f"{num(s and s['cpu']['cores_busy'], 2)} | {num(rcpu, 2)} | {flags(s, x['rc'])} |")
        w("")
        svg = b.figdir / f"latency-{rate}.svg"
        # The interval logs hold the corrected histograms only (one curve per router).
        files = [str(b.out / x["json"].replace(".json", ".hlog")) for r, x, s, c, added in rows
                 if s and (b.out / x["json"].replace(".json", ".hlog")).exists()]
        if files:
            try:
                subprocess.run([b.loadgen, "plot", *files, "-o", str(svg)], check=True, capture_output=True, timeout=60)
                w(f"![latency by percentile at {num(rate)}/s]({b.rel}/{svg.name})")
                w("")
                w("Corrected latency by percentile, one curve per router (`upsplice-loadgen plot` over the runs' interval logs, "
                  "`out/bench/*-fixed-*.hlog`; the `.json` files have the uncorrected histograms too).")
                w("")
            except (subprocess.SubprocessError, OSError) as e:
                w(f"(plot failed: {e})")
                w("")

    return md


def sustained_rate(b: Bench) -> list[str]:
    md, w = b.section()
    meta, routers, upsplices, get, all_of = b.meta, b.routers, b.upsplices, b.get, b.all_of
    limit = int(meta.get("p99_limit_us", 1000))
    w("## Highest rate with p99 under 1 ms")
    w("")
    w(f"`upsplice-loadgen search` steps in the order run ({meta.get('conns')} tunnels, {meta.get('size')} B). ✓ = valid, rate "
      f"reached and corrected p99 < {limit / 1000:g} ms. *sustained* = the highest ✓ step.")
    w("")
    w("| router | steps: rate → corrected p99 (ms) | sustained (msg/s) | vs direct | vs HAProxy | gen (cores) at the last ✓ |")
    w("| --- | --- | ---: | ---: | ---: | ---: |")
    searches = {r: ((x["s"] or {}).get("search") if x else None) for r in routers for x in [get(r, "search")]}
    sustained = {r: (x or {}).get("answer_rate", 0) for r, x in searches.items()}
    hs = sustained.get("haproxy")
    series = {}
    for r in routers:
        steps = (searches[r] or {}).get("steps") or []
        best = sustained[r]
        cells = [f"{fmt_rate(t['rate'])} → {ms(t['latency_us'])} {'✓' if t['pass'] else '✗'}"
                 + ("" if t["pass"] or (t["valid"] and t["rate_reached"]) else " (" + ("invalid" if not t["valid"] else "rate not reached") + ")")
                 for t in steps]
        deciding = list({t["rate"]: t for t in steps}.values())   # per rate, the attempt that decided it
        pts = [(float(t["rate"]), t["latency_us"] / 1000, bool(t["valid"] and t["rate_reached"]), "step") for t in deciding]
        for x in all_of(r, "fixed"):
            s = x["s"]
            if s and lat(s).get("p99") is not None:
                pts.append((float(x["param"]), lat(s)["p99"] / 1000, bool(x["rc"] == 0 and s.get("valid") and s.get("rate_reached")), "fixed"))
        if pts:
            series[r] = pts
        if steps:
            # The search's summary describes the run of its answer.
            gen = get(r, "search")["s"]["cpu"]["cores_busy"] if best else None
            vs_h = ((ratio(best, hs) if hs else "∞ (HAProxy: none)") if best else "–") if vs_haproxy(r) else "–"
            w(f"| {r} | {'; '.join(cells)} | {num(best) if best else 'none'} | {ratio(best, sustained.get('direct')) if vs_direct(r) and best else '–'} | "
              f"{vs_h} | {num(gen, 2)} |")
    w("")
    (b.figdir / "rate-vs-p99.svg").write_text(svg_rate_vs_p99(series, limit / 1000, "Corrected p99 against offered message rate"))
    w(f"![messages/s against p99]({b.rel}/rate-vs-p99.svg)")
    w("")
    w("Messages/s against corrected p99 (search steps and fixed-rate runs; drawn by scripts/bench-report.py).")
    w("")
    up_best = max(((sustained.get(r, 0), r) for r in upsplices), default=(0, None))
    if up_best[1] is None:
        b.goals.append(("Sustained rate (p99 < 1 ms) ≥ 1.5 × HAProxy's", "–", "could not be measured", "no upsplice run"))
    elif not hs:
        b.goals.append(("Sustained rate (p99 < 1 ms) ≥ 1.5 × HAProxy's", f"{up_best[1]}: {num(up_best[0])}/s, HAProxy: none",
                        "could not be measured" if not up_best[0] else "met (HAProxy had no passing step)",
                        "no HAProxy step kept p99 < 1 ms" + ("" if up_best[0] else ", nor did any upsplice plane") +
                        f"; direct: {num(sustained.get('direct')) if sustained.get('direct') else 'none'}"))
    else:
        rr = up_best[0] / hs
        b.goals.append(("Sustained rate (p99 < 1 ms) ≥ 1.5 × HAProxy's", f"{rr:.2f} × ({up_best[1]} {num(up_best[0])}/s, HAProxy {num(hs)}/s)",
                        "met" if rr >= 1.5 else "not met", f"direct: {num(sustained.get('direct')) + '/s' if sustained.get('direct') else 'none'}; bisected to the search's resolution"))

    return md


def handshakes(b: Bench) -> list[str]:
    md, w = b.section()
    meta, routers, upsplices, get, all_of = b.meta, b.routers, b.upsplices, b.get, b.all_of
    w("## Handshakes")
    w("")
    hs_limit = b.hs_limit
    w(f"New WebSocket connections per second (open loop, one second of connections per step), connect (TCP) and upgrade "
      f"(request written → 101 parsed) latency. ✓ = all upgraded, no errors and connect p99 + upgrade p99 < {hs_limit / 1000:g} ms.")
    w("")
    w("| router | offered/s | upgraded | connect p50 / p99 (ms) | upgrade p50 / p99 (ms) | connect+upgrade p50 / p99 (ms, sums) | gen (cores) | router CPU (s) | step |")
    w("| --- | ---: | ---: | --- | --- | --- | ---: | ---: | --- |")
    hs_best, hs_cap = {}, {}
    for r in routers:
        best = cap = 0
        for x in sorted(all_of(r, "handshake"), key=lambda x: x["param"]):
            s = x["s"]
            cn, up = lat(s, "connect"), lat(s, "upgrade")
            p50 = (cn.get("p50") or 0) + (up.get("p50") or 0)
            p99 = (cn.get("p99") or 0) + (up.get("p99") or 0)
            clean = bool(s and s.get("connections_ok") == s.get("connections") and s.get("total_errors") == 0)
            ok = clean and p99 < hs_limit
            if ok:
                best = max(best, x["param"])
            if clean:
                cap = max(cap, x["param"])
            w(f"| {r} | {num(x['param'])} | {num(s and s.get('connections_ok'))} / {num(s and s.get('connections'))} | "
              f"{ms(cn.get('p50'))} / {ms(cn.get('p99'))} | {ms(up.get('p50'))} / {ms(up.get('p99'))} | {ms(p50)} / {ms(p99)} | "
              f"{num(s and s['cpu']['cores_busy'], 2)} | {num(x.get('router_cpu_s'), 2)} | {'✓' if ok else '✗ ' + (f'p99 ≥ {hs_limit / 1000:g} ms' if clean else flags(s, x['rc']))} |")
        hs_best[r], hs_cap[r] = best, cap
    w("")
    w(f"| router | handshake rate (highest ✓ step, /s) | vs direct | vs HAProxy | highest step with every connection upgraded, no errors (any latency) |")
    w("| --- | ---: | ---: | ---: | ---: |")
    for r in routers:
        if any(x["router"] == r and x["workload"] == "handshake" for x in b.runs):
            w(f"| {r} | {num(hs_best[r]) if hs_best[r] else 'none'} | {ratio(hs_best[r], hs_best.get('direct')) if vs_direct(r) and hs_best[r] else '–'} | "
              f"{ratio(hs_best[r], hs_best.get('haproxy')) if vs_haproxy(r) and hs_best[r] else '–'} | {num(hs_cap[r]) if hs_cap[r] else 'none'} |")
    w("")
    w("The steps double, so the rate is known only to a factor of 2; the highest step is also bounded by what the generator "
      "itself opens on a shared core (see direct).")
    w("")

    uh = max(((hs_best.get(r, 0), r) for r in upsplices), default=(0, None))
    hh = hs_best.get("haproxy")
    if uh[1] is None or hh is None:
        b.goals.append(("Handshake rate ≥ HAProxy's", "–", "could not be measured", "no upsplice or HAProxy run"))
    else:
        worst = min(((hs_best.get(r, 0), r) for r in upsplices))
        if hh == 0:
            verdict = "met" if uh[0] > 0 else "could not be measured"
            meas = f"{uh[1]}: {num(uh[0]) if uh[0] else 'none'}; HAProxy: none"
        else:
            verdict = "met" if uh[0] >= hh else "not met"
            meas = f"{uh[0] / hh:.2f} × ({uh[1]} {num(uh[0])}/s, HAProxy {num(hh)}/s)"
        b.goals.append(("Handshake rate ≥ HAProxy's", meas, verdict,
                        f"lowest plane {worst[1]}: {num(worst[0]) if worst[0] else 'none'}; direct {num(hs_best.get('direct'))}/s"
                        + ("; the highest step was passed by the generator-limited direct run too" if hs_best.get("direct") and uh[0] >= hs_best.get("direct") else "")))

    return md


def churn(b: Bench) -> list[str]:
    md, w = b.section()
    meta, routers, upsplices, get, all_of = b.meta, b.routers, b.upsplices, b.get, b.all_of
    hs_limit = b.hs_limit
    if any(x["workload"] == "churn" for x in b.runs):
        w("## Connection churn")
        w("")
        w("Whole tunnel lifecycles per second (connect → upgrade → one 64-byte echo → client-first close; open loop, at most "
          f"512 at once). ✓ = every cycle completed, no errors and corrected cycle p99 < {hs_limit / 1000:g} ms. *router CPU per "
          "1,000 cycles* is the router process's own CPU; sockmap's map updates and deletions are charged to it.")
        w("")
        w("| router | rate/s | completed | handshake p50 / p99 (ms) | cycle p50 / p99 (ms) | router CPU per 1,000 cycles (s) | gen (cores) | step |")
        w("| --- | ---: | ---: | --- | --- | ---: | ---: | --- |")
        churn_best = {}
        for r in routers:
            best = 0
            for x in sorted(all_of(r, "churn"), key=lambda x: x["param"]):
                s = x["s"]
                ch = (s or {}).get("churn") or {}
                hs, cy = lat(s, "handshake"), lat(s)
                done, tried = ch.get("completed"), ch.get("attempts")
                clean = bool(s and done == tried and s.get("total_errors") == 0)
                ok = clean and (cy.get("p99") or 1e18) < hs_limit
                if ok:
                    best = max(best, x["param"])
                per_k = (x["router_cpu_s"] / done * 1000) if done and x.get("router_cpu_s") is not None else None
                w(f"| {r} | {num(x['param'])} | {num(done)} / {num(tried)} | {ms(hs.get('p50'))} / {ms(hs.get('p99'))} | "
                  f"{ms(cy.get('p50'))} / {ms(cy.get('p99'))} | {num(per_k, 3)} | {num(s and s['cpu']['cores_busy'], 2)} | "
                  f"{'✓' if ok else '✗ ' + (f'p99 ≥ {hs_limit / 1000:g} ms' if clean else flags(s, x['rc']))} |")
            churn_best[r] = best
        w("")
        w("| router | churn rate (highest ✓ step, /s) | vs direct | vs HAProxy |")
        w("| --- | ---: | ---: | ---: |")
        for r in routers:
            if any(x["router"] == r and x["workload"] == "churn" for x in b.runs):
                cb = churn_best.get(r, 0)
                w(f"| {r} | {num(cb) if cb else 'none'} | {ratio(cb, churn_best.get('direct')) if vs_direct(r) and cb else '–'} | "
                  f"{ratio(cb, churn_best.get('haproxy')) if vs_haproxy(r) and cb else '–'} |")
        w("")
        w("The steps double, so the rate is known only to a factor of 2.")
        w("")
    return md



def bulk_agg(b: Bench, router, c, workload):
    """Median throughput over the repetitions; CPU per GiB over all of them together."""
    xs = [x for x in b.all_of(router, workload) if x["param"] == c and x["s"] and x["s"].get("throughput")]
    if not xs:
        return None
    g = sorted((x["s"]["throughput"]["out_mbit_s"] + x["s"]["throughput"]["in_mbit_s"]) / 1000 for x in xs)
    med = g[len(g) // 2] if len(g) % 2 else (g[len(g) // 2 - 1] + g[len(g) // 2]) / 2
    byts = sum(x["s"]["throughput"]["bytes_out"] + x["s"]["throughput"]["bytes_in"] for x in xs)
    # A run whose machine CPU could not be read (the sampler missed its
    # window) has no CPU figure; the throughput still counts.
    mcpu = sum(x["machine_cpu_s"] for x in xs) if all(x.get("machine_cpu_s") is not None for x in xs) else None
    rcpu = sum(x["router_cpu_s"] for x in xs) if all(x.get("router_cpu_s") is not None for x in xs) else None
    gen = sum(x["s"]["cpu"]["cores_busy"] for x in xs) / len(xs)
    fl = sorted({flags(x["s"], x["rc"]) for x in xs})
    each = ", ".join(f"{(x['s']['throughput']['out_mbit_s'] + x['s']['throughput']['in_mbit_s']) / 1000:.2f}" for x in xs)
    return dict(gbit=med, each=each, per=mcpu / (byts / GIB) if byts and mcpu is not None else None,
                rper=rcpu / (byts / GIB) if byts and rcpu is not None else None, gen=gen, flags=" ".join(fl), n=len(xs))

def bulk_section(b: Bench, workload, title, what, target_name) -> list[str]:
    md, w = b.section()
    meta, routers, upsplices = b.meta, b.routers, b.upsplices
    w(f"## {title}")
    w("")
    w(f"{what}, {int(meta.get('bulk_chunk', 0)) // 1024} KiB writes, {meta.get('bulk_reps', '1')} repetitions of "
      f"{meta.get('bulk_d')} each (the median counts), through the routers' tcp "
      "listeners. *CPU per GiB* is machine-wide busy seconds per GiB moved, and *extra* the same minus direct's (the router's cost); "
      "*router* is the router process alone.")
    w("")
    w("| router | tunnels | Gbit/s (median) | each repetition (Gbit/s) | vs direct | vs HAProxy | CPU per GiB (s, machine) | extra per GiB over direct (s) | router CPU per GiB (s) | gen (cores) | runs |")
    w("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    got = {}
    for c in (1, 8):
        d = bulk_agg(b, "direct", c, workload)
        h = bulk_agg(b, "haproxy", c, workload)
        for r in routers:
            a = bulk_agg(b, r, c, workload)
            if not a:
                continue
            dg = d["gbit"] if d else None
            got[(r, c)] = (a["gbit"], dg)
            vs_h = ratio(a["gbit"], h["gbit"]) if h and vs_haproxy(r) else "–"
            w(f"| {r} | {c} | {a['gbit']:.2f} | {a['each']} | {ratio(a['gbit'], dg) if vs_direct(r) else '–'} | {vs_h} | {num(a['per'], 3)} | "
              f"{num(a['per'] - d['per'], 3) if d and a['per'] is not None and d['per'] is not None and vs_direct(r) else '–'} | "
              f"{num(a['rper'], 3)} | {a['gen']:.2f} | {a['flags']} |")
    w("")
    for c in (1, 8):
        cands = [(got[(r, c)][0] / got[(r, c)][1], r) for r in upsplices if (r, c) in got and got[(r, c)][1]]
        name = f"{target_name}, {c} tunnel{'s' if c > 1 else ''}: ≥ 0.9 × direct"
        if cands:
            best = max(cands)
            allr = ", ".join(f"{r.removeprefix('upsplice-')} {v:.2f}" for v, r in sorted(cands, reverse=True))
            hb = got.get(("haproxy", c))
            b.goals.append((name, f"{best[0]:.2f} × direct ({best[1]})", "met" if best[0] >= 0.9 else "not met",
                            f"per plane: {allr}" + (f"; HAProxy {hb[0] / hb[1]:.2f}" if hb and hb[1] else "")))
        else:
            b.goals.append((name, "–", "could not be measured", "no run"))
    return md


def bulk(b: Bench) -> list[str]:
    return bulk_section(b, "bulk", "Bulk throughput", "Raw TCP, one way, to the discard backend", "Bulk throughput")


def two_way_bulk(b: Bench) -> list[str]:
    return bulk_section(b, "bulk2", "Two-way bulk throughput",
                        "Raw TCP through a raw TCP echo backend (`upsplice-loadgen echo --mode tcp`, which stops reading while its "
                        "write blocks), the client writing and reading at once with no cap on bytes in flight "
                        "(`tcp --mode bulk --direction both`); Gbit/s counts both directions",
                        "Two-way bulk throughput")


def cpu(b: Bench) -> list[str]:
    md, w = b.section()
    meta, routers, upsplices, get, all_of = b.meta, b.routers, b.upsplices, b.get, b.all_of
    w("## CPU per million messages and per GiB")
    w("")
    w("Over each fixed-rate run (connect, warm-up, measured window and drain): *machine* = busy CPU seconds of the whole machine "
      "(`/proc/stat`) per million messages; *extra* = machine minus direct's at the same rate — what routing the messages cost, "
      "including kernel threads and softirq work the router process is not charged for (and whatever else the machine ran: "
      "see the load average at the top); *router* = the router process's own utime+stime per million messages. Messages = "
      "reply rate × (warm-up + window); each message crosses the router twice (request and echo). Per GiB: see bulk above.")
    w("")
    w("| router | rate (msg/s) | machine CPU per M msgs (s) | extra over direct (s) | extra vs HAProxy | router CPU per M msgs (s) | router vs HAProxy | echo CPU per M (s) | gen (cores) | run |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    cpu_cmp = {}
    for rate in b.fixed_rates:
        def per_m(x, key):
            s = x["s"]
            if not s or x.get(key) is None:
                return None
            msgs = s["reply_rate"] * (s["warmup_s"] + s["duration_s"])
            return x[key] / msgs * 1e6 if msgs else None
        d = get("direct", "fixed", rate)
        dm = per_m(d, "machine_cpu_s") if d else None
        h = get("haproxy", "fixed", rate)
        hx = (per_m(h, "machine_cpu_s") - dm) if h and dm is not None and per_m(h, "machine_cpu_s") is not None else None
        hr = per_m(h, "router_cpu_s") if h else None
        for r in routers:
            x = get(r, "fixed", rate)
            if not x:
                continue
            m = per_m(x, "machine_cpu_s")
            ex = (m - dm) if m is not None and dm is not None and vs_direct(r) else None
            ro = per_m(x, "router_cpu_s")
            cpu_cmp[(r, rate)] = (ex, ro, x["s"] and x["s"].get("valid") and x["s"].get("rate_reached"))
            w(f"| {r} | {num(rate)} | {num(m, 2)} | {num(ex, 2)} | {pos_ratio(ex, hx) if vs_haproxy(r) else '–'} | "
              f"{num(ro, 2)} | {ratio(ro, hr) if vs_haproxy(r) else '–'} | {num(per_m(x, 'echo_cpu_s'), 2)} | "
              f"{num(x['s'] and x['s']['cpu']['cores_busy'], 2)} | {flags(x['s'], x['rc'])} |")
        cands = [(cpu_cmp[(r, rate)][0], r) for r in upsplices if (r, rate) in cpu_cmp and cpu_cmp[(r, rate)][0] is not None]
        if cands and hx:
            best = min(cands)
            rp = min(((cpu_cmp[(r, rate)][1], r) for r in upsplices if (r, rate) in cpu_cmp and cpu_cmp[(r, rate)][1] is not None), default=(None, None))
            rr = best[0] / hx
            noisy = hx <= 0 or best[0] < 0
            b.goals.append((f"CPU per million messages at {num(rate)}/s ≤ ⅓ of HAProxy's",
                            f"{rr:.2f} × HAProxy's (machine-wide extra, {best[1]})" if not noisy else f"– (machine-wide extra ≤ 0: {best[1]} {best[0]:+.2f} s, HAProxy {hx:+.2f} s)",
                            ("met" if rr <= 1 / 3 else "not met") if not noisy else "could not be measured (machine-wide noise larger than the routers' cost)",
                            f"{best[1]} +{best[0]:.2f} s vs HAProxy +{hx:.2f} s per M msgs over direct; router process alone: "
                            + (f"{rp[1]} {rp[0]:.2f} s vs HAProxy {hr:.2f} s ({rp[0] / hr:.2f} ×)" if rp[0] is not None and hr else "–")
                            + (" — HAProxy's or upsplice's run did not reach its rate" if not (cpu_cmp.get(('haproxy', rate), (0, 0, False))[2] and cpu_cmp.get((best[1], rate), (0, 0, False))[2]) else "")))
        else:
            b.goals.append((f"CPU per million messages at {num(rate)}/s ≤ ⅓ of HAProxy's", "–", "could not be measured", "no runs"))
    w("")

    return md


def idle_tunnels(b: Bench) -> list[str]:
    md, w = b.section()
    meta, routers, upsplices, get, all_of = b.meta, b.routers, b.upsplices, b.get, b.all_of
    w("## Idle tunnels: memory and the largest count")
    w("")
    w(f"**100,000 concurrent tunnels cannot be opened here.** Every process in this sandbox has a hard `RLIMIT_NOFILE` of "
      f"{meta.get('nofile', '?').split('/')[-1]} that root cannot raise (`prlimit` fails with EPERM), and a router holds 2 fds per "
      f"tunnel (client + backend), so one router process can hold at most ~9,990 tunnels. The run uses {meta.get('idle_n')} "
      "tunnels — the largest round count that fits with the listeners and the admin socket — over 4 source addresses "
      f"(127.0.0.1–127.0.0.4), the same for every router ({meta.get('idle_n_sockmap', '?')} for the sockmap plane). "
      "The generator and the echo backend need one fd per tunnel each. *most tunnels the fd limit allows* = (hard limit − the "
      "fresh router's fds) / fds per tunnel, from this measurement.")
    w("")
    w("| router | tunnels asked | upgraded (generator) | established at the router (ss) | router fds | fds per tunnel | most tunnels the fd limit allows | RSS fresh (KiB) | RSS with tunnels (KiB) | **RSS per tunnel** | vs HAProxy | messages during the hold: sent / echoed / errors | run |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    rss = {}
    for r in routers:
        m = idle_memory(get(r, "idle"))
        x = get(r, "idle")
        if not m or not x:
            continue
        rss[r] = (m["rss_kib"] - m["base_rss_kib"]) * 1024 / m["tunnels_asked"]
    for r in routers:
        m = idle_memory(get(r, "idle"))
        x = get(r, "idle")
        if not m or not x:
            continue
        s = x["s"] or {}
        fpt = (m["fds"] - m["base_fds"]) / m["tunnels_asked"]
        hard = int(meta.get("nofile", "0/0").split("/")[-1] or 0)
        most = (hard - m["base_fds"]) / fpt if fpt > 0 and hard else None
        # nginx spreads tunnels over two workers, each with its own limit
        w(f"| {r} | {num(m['tunnels_asked'])} | {num(s.get('connections_ok'))} | {num(m['established'])} | {num(m['fds'])} | "
          f"{fpt:.2f} | {num(most) + (' per worker' if r == 'nginx' else '') if most else '–'} | "
          f"{num(m['base_rss_kib'])} | {num(m['rss_kib'])} | **{rss[r] / 1024:.2f} KiB** | {ratio(rss[r], rss.get('haproxy')) if vs_haproxy(r) else '–'} | "
          f"{num(s.get('sent'))} / {num(s.get('received'))} / {num(s.get('total_errors'))} | {flags(x['s'], x['rc'])} |")
    w("")
    w("RSS per tunnel = (RSS with the tunnels open − RSS of the freshly started router) / tunnels; kernel socket buffers are not "
      "in RSS for any router. nginx: master + both workers.")
    w("")
    sm = rss.get("upsplice-sockmap")
    b.goals.append(("RSS per idle tunnel ≤ 1 KiB in sockmap mode", f"{sm / 1024:.2f} KiB" if sm is not None else "–",
                    ("met" if sm <= 1024 else "not met") if sm is not None else "could not be measured",
                    "" if sm is not None else "the sockmap plane is not available in this build (see Data planes)"))
    hr = rss.get("haproxy")
    if hr:
        below = [(rss[r], r) for r in upsplices if r in rss]
        worst = max(below) if below else None
        b.goals.append(("RSS per idle tunnel below HAProxy's on every data plane",
                        ", ".join(f"{r.removeprefix('upsplice-')} {v / 1024:.2f} KiB ({v / hr:.2f} ×)" for v, r in sorted(below)) + f"; HAProxy {hr / 1024:.2f} KiB",
                        ("met" if worst and worst[0] < hr else "not met") if worst else "could not be measured",
                        f"measured planes only; {', '.join(r for r in PLANES if r not in rss)} not measured"
                        if len(below) < len(PLANES) else "all four planes measured"))
    else:
        b.goals.append(("RSS per idle tunnel below HAProxy's on every data plane", "–", "could not be measured", "no HAProxy run"))
    big = [(s_ok, r) for r in upsplices for x in [get(r, "idle")] if x and x["s"] for s_ok in [x["s"].get("connections_ok", 0)]]
    if big:
        n, r = max(big)
        x = get(r, "idle")
        s = x["s"]
        m = idle_memory(get(r, "idle")) or {}
        b.goals.append(("100,000 concurrent tunnels on one node, nothing dropped", f"{num(n)} held ({r}), {n / 100000:.2f} × the target",
                        "could not be measured here",
                        f"hard RLIMIT_NOFILE {meta.get('nofile', '?').split('/')[-1]} per process, 2 fds per tunnel: at most ~9,990 per router process; "
                        f"at {num(n)}: {s.get('total_errors', '?')} errors, sample {s.get('received', '?')}/{s.get('sent', '?')} echoed, router RSS "
                        f"{num(m.get('rss_kib'))} KiB"))

    return md


def drift(b: Bench) -> list[str]:
    md, w = b.section()
    meta, routers, upsplices, get, all_of = b.meta, b.routers, b.upsplices, b.get, b.all_of
    w("## Drift of the shared machine")
    w("")
    w(f"The same direct run ({meta.get('conns')} tunnels, 20,000 msg/s) before each router and at the end, and the load average "
      "when each ended. Compare a router's rows with the probe just before it.")
    w("")
    w("| probe before | achieved/s | p50 (ms) | p99 (ms) | p99.9 (ms) | gen (cores) | machine CPU (cores) | load average | run |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for x in all_of("direct", "probe"):
        s = x["s"]
        c = lat(s)
        w(f"| {x['name'].removeprefix('direct-probe-')} | {num(s and s.get('achieved_rate'))} | {ms(c.get('p50'))} | {ms(c.get('p99'))} | "
          f"{ms(c.get('p999'))} | {num(s and s['cpu']['cores_busy'], 2)} | {num(x['machine_cpu_s'] / x['wall_s'] if x['machine_cpu_s'] is not None and x['wall_s'] else None, 2)} | {x['loadavg']} | {flags(s, x['rc'])} |")
    w("")

    return md


def known_problems(b: Bench) -> list[str]:
    md, w = b.section()
    meta, routers, upsplices, get, all_of = b.meta, b.routers, b.upsplices, b.get, b.all_of
    w("## Known problems")
    w("")
    w("* One 2-core machine runs generator, router and backend: every figure includes their competition for the cores, and the "
      "generator's own lateness is part of the corrected latency (send lag). Latency tails move between runs; medians and rates "
      "repeat better. See the drift table.")
    w("* The handshake rate is measured as an open-loop ramp of new connections that stay open for the step (at most one "
      "second's worth), and as whole lifecycles (churn), both with the rate known only to the step size.")
    w("* `connect+upgrade` percentiles are sums of the two histograms' percentiles (the generator keeps them separately), an upper "
      "bound of the true combined percentile.")
    w("* CPU per message includes connection set-up of the 1,000 tunnels and the warm-up; the same is true of direct, which is subtracted.")
    w("* 100,000 tunnels (and 10,000 for the memory figure) do not fit under the hard 20,000 open-files limit; see above.")
    w("* The idle tunnels are held by `upsplice-loadgen hold`, each sending one 64-byte message every "
      f"{meta.get('idle_period', '?')} s; the memory figures are the router's peak over the hold (read every 100 ms), which may "
      "include what the handshakes in progress held while the last tunnels opened.")
    w("* Each upsplice row sets `data_plane.mode` to its plane (`auto` is not a row: it picks one of them, see the README); "
      "the router's `/metrics` (Data planes, above) shows how many of its tunnels fell back to another plane.")
    skipped_file = b.out / "skipped.txt"
    skipped = skipped_file.read_text().split() if skipped_file.exists() else []
    if skipped:
        by_router: dict[str, int] = {}
        for name in skipped:
            router = "http keep-alive" if name.startswith("http-ka-") else next(
                (r for r in sorted(BY_NAME, key=len, reverse=True) if name.startswith(r + "-")), name.split("-")[0])
            by_router[router] = by_router.get(router, 0) + 1
        counts = ", ".join(f"{r} {n}" for r, n in by_router.items())
        w(f"* **{len(skipped)} runs were skipped, past the time budget of {meta.get('budget_s', '?')} s, and their rows are "
          f"missing above** ({counts}): `{' '.join(skipped)}`.")
    w("* Rates are doubled between handshake and churn steps, so those figures are known to a factor of about 2; "
      "ratios built from them are coarse. The sustained rate is bisected to within the search's resolution (see Setup).")
    w("")

    return md


# ------------------------------------------------------------------ http keep-alive (a section that also runs alone)
def section_head(title: str, measured: bool) -> list[str]:
    """The first lines of a section that also runs alone: its title, and a note when its runs are missing."""
    return [title, ""] + ([] if measured else ["Not measured in this run.", ""])


def kept_section(dest: Path | None, title: str) -> list[str] | None:
    """The section called `title` as the report `dest` has it (for a section a full run does not measure), or None."""
    if dest is None or not dest.exists():
        return None
    old = dest.read_text().splitlines()
    if title not in old:
        return None
    start = old.index(title)
    end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ")), len(old))
    return old[start:end]


def read_env(path: Path) -> dict:
    """KEY=value lines of a section's .env file (empty when it is missing)."""
    meta = {}
    for ln in path.read_text().splitlines() if path.exists() else []:
        if "=" in ln:
            k, v = ln.split("=", 1)
            meta[k] = v
    return meta


HTTP_KA_TITLE = "## HTTP keep-alive: small GETs"
HTTP_KA_TARGETS = ["direct", "upsplice", "haproxy", "nginx"]


def http_ka_runs(out: Path) -> list[dict]:
    """The runs of the http keep-alive section (out/http-keepalive.jsonl), one per router and connection count."""
    path = out / "http-keepalive.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def http_ka_figures(x: dict) -> dict:
    """Requests/s, latency and CPU per request of one run; None where the run gave nothing."""
    wrk = x.get("wrk") or {}
    n, dur = wrk.get("requests") or 0, (wrk.get("duration_us") or 0) / 1e6
    errors = {k: v for k, v in (wrk.get("errors") or {}).items() if v}
    per_req = (lambda cpu: cpu / n * 1e6 if cpu is not None and n else None)
    return dict(rps=n / dur if dur else None, p50=(wrk.get("latency_us") or {}).get("p50"),
                p99=(wrk.get("latency_us") or {}).get("p99"), router_us=per_req(x.get("router_cpu_s")),
                echo_us=per_req(x.get("echo_cpu_s")),
                router_cores=x["router_cpu_s"] / x["wall_s"] if x.get("router_cpu_s") is not None and x.get("wall_s") else None,
                conns_per_req=x["accepted"] / n if x.get("accepted") is not None and n else None,
                errors=errors, ok=bool(wrk) and x.get("rc") == 0)


def http_ka_line(path: str) -> str:
    """The progress line of the last run in the section's JSONL."""
    runs = http_ka_runs(Path(path).parent)
    if not runs:
        return "no result"
    f = http_ka_figures(runs[-1])
    errs = ", ".join(f"{k} {v}" for k, v in f["errors"].items())
    return (f"{num(f['rps'])} req/s | p50 {ms(f['p50'])} p99 {ms(f['p99'])} ms | router {num(f['router_us'], 1)} µs/req "
            f"({num(f['router_cores'], 2)} cores) | echo {num(f['echo_us'], 1)} µs/req"
            + (f" | {f['conns_per_req']:.3f} client conns/req" if f["conns_per_req"] is not None else "")
            + (f" | errors: {errs}" if errs else "") + ("" if f["ok"] else " | ✗ wrk failed"))


def http_keepalive(out: Path, goals: list | None = None) -> list[str]:
    """The section from out/http-keepalive.* alone (it is also written by `scripts/bench --only http-keepalive` into an
    existing report); when `goals` is given, its goal rows go there too."""
    runs = http_ka_runs(out)
    md = section_head(HTTP_KA_TITLE, bool(runs))
    w = md.append
    if not runs:
        return md
    meta = read_env(out / "http-keepalive.env")
    w(f"Run of {meta.get('date_utc', '?')} (commit {meta.get('commit', '?')}), load average {meta.get('loadavg_start', '?')} "
      f"at the start and {meta.get('loadavg_end', '?')} at the end, on {meta.get('nproc', '?')} cores shared by wrk, the "
      "router and the backend:")
    w("")
    w("```")
    w(meta.get("command", "scripts/bench --only http-keepalive"))
    w("```")
    w("")
    w(f"`wrk -t1 -c N -d {meta.get('duration', '?')}` (after {meta.get('warmup', '?')} of warm-up; {meta.get('wrk', 'wrk')}), "
      "closed loop, HTTP/1.1 keep-alive, `GET /` with `Host: bench.local`, to the echo backend (`upsplice-loadgen echo`, one "
      "thread; it answers plain requests with a 22-byte body and keeps the connection open). Each router reuses its "
      "connections to the backend: HAProxy `http-reuse safe` (nbthread 2), nginx an upstream `keepalive 128` (2 workers), "
      "upsplice `[backends] max_idle_per_backend = 128` (its configuration is in `out/bench/conf/upsplice-http.toml`); "
      "nginx's and upsplice's per-connection request caps are raised to 1,000,000 (HAProxy has none). *Router CPU* = "
      "utime + stime of the router's processes (nginx: master and workers) over the measured run, from `/proc/PID/stat`, "
      "per request; *echo* the same for the backend. wrk's latency is closed-loop (a slow answer delays the next request "
      "instead of counting against it): p99 at saturation, not at a fixed rate. A router that closes after each response "
      "makes wrk open a new connection for every request; its row measures that (*client connections per request*: "
      "upsplice's `upsplice_connections_accepted_total` over the run per request; the other routers do not count them).")
    w("")
    by = {(x["router"], x["conns"]): x for x in runs}
    for conns in sorted({x["conns"] for x in runs}):
        d = by.get(("direct", conns))
        h = by.get(("haproxy", conns))
        df = http_ka_figures(d) if d else {}
        hf = http_ka_figures(h) if h else {}
        w(f"### {conns} connections")
        w("")
        w("| target | requests/s | vs direct | vs HAProxy | p50 (ms) | p99 (ms) | router CPU (cores) | router CPU per request (µs) "
          "| vs HAProxy | echo CPU per request (µs) | client connections per request | wrk errors | run |")
        w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
        for r in HTTP_KA_TARGETS:
            x = by.get((r, conns))
            if not x:
                continue
            f = http_ka_figures(x)
            versus = r not in ("direct", "haproxy")
            errs = ", ".join(f"{k} {v}" for k, v in f["errors"].items()) or "–"
            w(f"| {r} | {num(f['rps'])} | {ratio(f['rps'], df.get('rps')) if r != 'direct' else '–'} | "
              f"{ratio(f['rps'], hf.get('rps')) if versus else '–'} | {ms(f['p50'])} | {ms(f['p99'])} | "
              f"{num(f['router_cores'], 2)} | {num(f['router_us'], 1)} | {ratio(f['router_us'], hf.get('router_us')) if versus else '–'} | "
              f"{num(f['echo_us'], 1)} | {num(f['conns_per_req'], 3)} | {errs} | {'ok' if f['ok'] else '✗ wrk failed'} |")
        w("")
        u = by.get(("upsplice", conns))
        uf = http_ka_figures(u) if u else {}
        target = f"HTTP keep-alive at {conns} connections: requests/s ≥ HAProxy's at ≤ its CPU per request"
        if uf.get("rps") and hf.get("rps") and uf.get("router_us") and hf.get("router_us"):
            met = uf["rps"] >= hf["rps"] and uf["router_us"] <= hf["router_us"]
            measured = (f"{uf['rps'] / hf['rps']:.2f} × HAProxy's requests/s at {uf['router_us'] / hf['router_us']:.2f} × its "
                        "CPU per request")
            verdict = "met" if met else "not met"
        else:
            measured, verdict = "–", "could not be measured"
        w(f"Goal (issue 12): {target.split(': ', 1)[1]} — **{verdict}** ({measured}).")
        w("")
        if goals is not None:
            goals.append((target, measured, verdict, "section HTTP keep-alive"))
    return md


# ------------------------------------------------------------------ TLS termination (a section that also runs alone)
TLS_TITLE = "## TLS termination: upsplice (rustls) and HAProxy (OpenSSL)"
TLS_TARGETS = ["direct", "upsplice", "haproxy"]


def tls_runs(out: Path) -> list[dict]:
    """The runs of the TLS section (out/tls-runs.jsonl), each with its summary and CPU figures."""
    path = out / "tls-runs.jsonl"
    runs = []
    for ln in path.read_text().splitlines() if path.exists() else []:
        if ln.strip():
            r = json.loads(ln)
            r["s"] = load(out / r["json"])
            r.update(watched(r))
            runs.append(r)
    return runs


def server_cpu_s(x):
    """CPU seconds of the process that terminated TLS in run x: the router's, or for direct the TLS backend's."""
    return x["router_cpu_s"] if x["router"] != "direct" else x["echo_cpu_s"]


def hs_figures(x):
    """Handshakes per second, full / resumed counts, latency and the TLS server's CPU per handshake of a churn run."""
    s = (x or {}).get("s") or {}
    ch = s.get("churn") or {}
    lu = s.get("latency_us") or {}
    full, resumed = (lu.get("tls") or {}).get("count", 0), (lu.get("tls_resumed") or {}).get("count", 0)
    n, el = ch.get("handshakes", 0), ch.get("elapsed_s") or 0
    cpu = server_cpu_s(x) if x else None
    return dict(rate=n / el if el else None, n=n, full=full, resumed=resumed, p50=lat(s).get("p50"), p99=lat(s).get("p99"),
                p999=lat(s).get("p999"), tls_p50=(lu.get("tls_resumed") if resumed > full else lu.get("tls") or {}).get("p50"),
                cpu_us=cpu / n * 1e6 if cpu is not None and n else None,
                cores=cpu / x["wall_s"] if cpu is not None and x.get("wall_s") else None,
                achieved=s.get("achieved_rate"), ok=flags(s or None, x["rc"]) if x else "✗ no result")


def tls_section(out: Path, goals: list | None = None) -> list[str]:
    """The section from out/tls-* alone (`scripts/bench --only tls` writes it into an existing report; a full run adds it
    to the whole report, with its goal rows when `goals` is given)."""
    runs = tls_runs(out)
    md = section_head(TLS_TITLE, bool(runs))
    w = md.append
    if not runs:
        return md
    meta = read_env(out / "tls.env")

    def get(t, wl):
        return next((x for x in runs if x["router"] == t and x["workload"] == wl), None)

    targets = [t for t in TLS_TARGETS if any(x["router"] == t for x in runs)]
    key = {"ec": "ECDSA P-256", "rsa": "RSA 2048"}.get(meta.get("key", ""), meta.get("key", "?"))
    w(f"Run of {meta.get('date_utc', '?')} (commit {meta.get('commit', '?')}), load average {meta.get('loadavg_start', '?')} "
      f"at the start and {meta.get('loadavg_end', '?')} at the end. The machine has {meta.get('nproc', '?')} cores, shared "
      "by the generator, the router, the backends **and other sessions' compilers** (the load average says how busy it "
      "was): absolute figures move from run to run, the ratios measured in this one run are what count.")
    w("")
    w("```")
    w(meta.get("command", "scripts/bench --only tls"))
    w("```")
    w("")
    w(f"One certificate for `bench.local` and 127.0.0.1 ({key}, signed by a CA made in the same step), generated with the "
      f"openssl CLI at the start of the run and served by all three: **upsplice** (rustls {meta.get('rustls', '?')}, ring; "
      "`[listener.tls]` on an http listener, whose upgraded tunnels run on the `tls` relay; a tcp listener with TLS for "
      f"bulk), **HAProxy** ({meta.get('haproxy', '?')}; {meta.get('haproxy_ssl', 'OpenSSL')}; `bind … ssl crt … alpn "
      "http/1.1`, mode http, nbthread 2; mode tcp with `ssl` for bulk) and **direct**: the echo backend itself serving TLS "
      "(`upsplice-loadgen echo --tls-cert --tls-key`, rustls, one thread) — the cost of TLS with no router at all. Both "
      "routers terminate TLS and speak plain TCP to the same plain echo / discard backends. All TLS 1.3 (both sides' "
      "default), X25519 (the generator, rustls, offers it first, as browsers do), TLS_AES_256_GCM_SHA384 (its first suite). Their configurations are in `out/bench/conf/` (`upsplice-tls.toml`, "
      "`haproxy-tls.cfg`). *Server CPU* is the CPU time (user + system, all threads, `/proc/PID/stat`, read by the "
      "generator's `--watch-pid`) of the process that terminates TLS — the router, or for *direct* the TLS echo — over the "
      "whole generator run, divided by what the run did.")
    w("")

    # ---- handshakes
    w("### TLS handshakes")
    w("")
    w(f"`upsplice-loadgen churn wss://… --connect-only`: each cycle connects, makes a TLS handshake and closes (the "
      f"client's close_notify and FIN, then the server's EOF) — no upgrade, no message. **Closed loop**: "
      f"{meta.get('hs_conc', '?')} cycles in flight for {meta.get('hs_d', '?')}, one generator thread (its own TLS work "
      "shares the 2 cores, the same for every target; `--insecure`: the client checks the handshake signature but not "
      "the certificate chain, to leave the cores to the servers). **Resumed**: the same loop with `--resume`: the "
      "run's connections share one session store, so each new connection offers a ticket an earlier one received; "
      "*resumed / full* are counted from each finished handshake (rustls's `handshake_kind()`), not assumed.")
    w("")
    w("| target | full handshakes/s | vs direct | vs HAProxy | server CPU per full handshake (µs) | vs HAProxy | server cores busy "
      "| cycle p50 / p99 (ms) | resumptions/s | vs HAProxy | resumed / full | server CPU per resumption (µs) | vs HAProxy | runs |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    hs = {t: hs_figures(get(t, "hs")) for t in targets}
    rs = {t: hs_figures(get(t, "resume")) for t in targets}
    for t in targets:
        f, r = hs[t], rs[t]
        vh = t == "upsplice"
        w(f"| {t} | {num(f['rate'])} | {ratio(f['rate'], hs['direct']['rate']) if t != 'direct' and 'direct' in hs else '–'} | "
          f"{ratio(f['rate'], hs.get('haproxy', {}).get('rate')) if vh else '–'} | {num(f['cpu_us'])} | "
          f"{ratio(f['cpu_us'], hs.get('haproxy', {}).get('cpu_us')) if vh else '–'} | {num(f['cores'], 2)} | "
          f"{ms(f['p50'])} / {ms(f['p99'])} | {num(r['rate'])} | {ratio(r['rate'], rs.get('haproxy', {}).get('rate')) if vh else '–'} | "
          f"{num(r['resumed'])} / {num(r['full'])} | {num(r['cpu_us'])} | "
          f"{ratio(r['cpu_us'], rs.get('haproxy', {}).get('cpu_us')) if vh else '–'} | {f['ok']}; {r['ok']} |")
    w("")
    w(f"**Open loop** at {meta.get('hs_rate', '?')} handshakes/s offered (`-r`, at most 256 in flight; corrected latency: "
      "from each cycle's due time, so a server that falls behind is charged for the queue):")
    w("")
    w("| target | achieved/s | cycle p50 (ms) | p99 (ms) | p99.9 (ms) | p99 vs HAProxy | server CPU per handshake (µs) | server cores busy | run |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    ol = {t: hs_figures(get(t, "hs-rate")) for t in targets}
    for t in targets:
        f = ol[t]
        w(f"| {t} | {num(f['achieved'])} | {ms(f['p50'])} | {ms(f['p99'])} | {ms(f['p999'])} | "
          f"{pos_ratio(f['p99'], ol.get('haproxy', {}).get('p99')) if t == 'upsplice' else '–'} | {num(f['cpu_us'])} | "
          f"{num(f['cores'], 2)} | {f['ok']} |")
    w("")

    # ---- PROXY protocol
    w("### PROXY protocol v2 in front of the handshake")
    w("")
    w("The closed handshake loop again, to a second TLS listener of the same process that requires a PROXY v2 header "
      "(upsplice `proxy_protocol = \"v2\"` with `proxy_trusted_cidrs = [\"127.0.0.0/8\"]`; HAProxy `accept-proxy`), the "
      "generator sending one (`--proxy-protocol v2`) before its ClientHello; then the loop without once more. *without* is "
      "the mean of the runs before and after, and *drift* how far those two differ (the shared machine's noise floor).")
    w("")
    w("| router | handshakes/s without | with PROXY v2 | with / without | drift (before / after) | server CPU per handshake without (µs) | with (µs) | with / without | runs |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    pp_cost = {}
    for t in [t for t in targets if t != "direct"]:
        a, b2, pp = hs_figures(get(t, "hs")), hs_figures(get(t, "hs-again")), hs_figures(get(t, "hs-proxy-v2"))
        both = [v for v in (a["rate"], b2["rate"]) if v]
        base = sum(both) / len(both) if both else None
        cpus = [v for v in (a["cpu_us"], b2["cpu_us"]) if v]
        base_cpu = sum(cpus) / len(cpus) if cpus else None
        pp_cost[t] = (base, pp["rate"], base_cpu, pp["cpu_us"])
        w(f"| {t} | {num(base)} | {num(pp['rate'])} | {ratio(pp['rate'], base)} | {ratio(b2['rate'], a['rate'])} | "
          f"{num(base_cpu)} | {num(pp['cpu_us'])} | {ratio(pp['cpu_us'], base_cpu)} | {pp['ok']}; {b2['ok']} |")
    w("")

    # ---- wss messages
    fx = {t: get(t, "fixed") for t in targets}
    w("### wss messages at a fixed rate")
    w("")
    w(f"`upsplice-loadgen ws wss://…` — {meta.get('conns', '?')} TLS connections (upgraded through the router), "
      f"{meta.get('size', '?')}-byte messages at {meta.get('rate', '?')}/s in total, {meta.get('fixed', '?')}, latency "
      "corrected for coordinated omission. *Server CPU per message* = the TLS server's CPU over the whole run (including the "
      "connections' handshakes and upgrades) / messages echoed; each message crosses the router twice (there and back). "
      "A pause of ~100 ms puts 1–2 % of a run's messages behind it, i.e. at p99. On this machine such pauses hit the "
      "tokio-based targets (the direct echo and upsplice) in two of three runs of this section and HAProxy in none, and "
      "two back-to-back direct plain ws runs gave p99 0.07 ms and 83 ms: their cause is **not found yet** (every socket "
      "here has TCP_NODELAY), so read p90 beside p99, and the run's `.hlog` (`out/bench/tls-*-fixed.hlog`, one histogram "
      "per second) for when it happened.")
    w("")
    w("| target | achieved/s | p50 (ms) | p90 (ms) | p99 (ms) | p99.9 (ms) | p99 vs direct | p99 vs HAProxy | server CPU per message (µs) | vs direct | vs HAProxy | run |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    per_msg = {}
    for t in targets:
        x = fx[t]
        s = (x or {}).get("s") or {}
        cpu = server_cpu_s(x) if x else None
        per_msg[t] = cpu / s["received"] * 1e6 if cpu is not None and s.get("received") else None
    for t in targets:
        x = fx[t]
        s = (x or {}).get("s") or {}
        c = lat(s)
        dp, hp = lat((fx.get("direct") or {}).get("s")).get("p99"), lat((fx.get("haproxy") or {}).get("s")).get("p99")
        w(f"| {t} | {num(s.get('achieved_rate'))} | {ms(c.get('p50'))} | {ms(c.get('p90'))} | {ms(c.get('p99'))} | {ms(c.get('p999'))} | "
          f"{pos_ratio(c.get('p99'), dp) if t != 'direct' else '–'} | {pos_ratio(c.get('p99'), hp) if t == 'upsplice' else '–'} | "
          f"{num(per_msg[t], 1)} | {pos_ratio(per_msg[t], per_msg.get('direct')) if t != 'direct' else '–'} | "
          f"{pos_ratio(per_msg[t], per_msg.get('haproxy')) if t == 'upsplice' else '–'} | {flags(x['s'], x['rc']) if x else '✗ no result'} |")
    w("")

    # ---- bulk
    w("### Bulk through one TLS connection (MB/s)")
    w("")
    w(f"`upsplice-loadgen tcp --mode bulk --direction up --tls` — one connection writing {meta.get('bulk', '?')} (the "
      "median run is shown) to the discard backend: through a tcp listener with TLS (upsplice: the same `tls` relay as the "
      "wss tunnels) or HAProxy mode tcp with `ssl`, or straight to the discard backend serving TLS (direct). The TLS "
      "server decrypts every byte; the routers then write it in the clear. *Server CPU per GiB*: its CPU over the run / "
      "GiB moved in the measured window (the 1 s warm-up moves bytes too, so this overstates all three alike).")
    w("")
    w("| target | MB/s | vs direct | vs HAProxy | server CPU per GiB (s) | vs HAProxy | runs (MB/s) |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    bulk = {}
    for t in targets:
        xs = [x for x in runs if x["router"] == t and x["workload"] == "bulk" and x["s"] and x["s"].get("throughput")]
        vals = sorted(((x["s"]["throughput"]["bytes_out"] / 1e6 / x["s"]["duration_s"]), x) for x in xs if x["s"].get("duration_s"))
        if not vals:
            bulk[t] = (None, None, "")
            continue
        mb, x = vals[len(vals) // 2]
        cpu = server_cpu_s(x)
        gib = x["s"]["throughput"]["bytes_out"] / GIB
        bulk[t] = (mb, cpu / gib if cpu is not None and gib else None, ", ".join(f"{v:.0f}" for v, _ in vals))
    for t in targets:
        mb, cg, allv = bulk[t]
        w(f"| {t} | {num(mb)} | {ratio(mb, bulk['direct'][0]) if t != 'direct' and 'direct' in bulk else '–'} | "
          f"{ratio(mb, bulk.get('haproxy', (None,))[0]) if t == 'upsplice' else '–'} | {num(cg, 2)} | "
          f"{pos_ratio(cg, bulk.get('haproxy', (None, None))[1]) if t == 'upsplice' else '–'} | {allv or '✗ no result'} |")
    w("")

    # ---- idle
    w("### Memory per idle TLS tunnel")
    w("")
    w(f"`upsplice-loadgen hold wss://…` opens {meta.get('idle_n', '?')} wss tunnels through the freshly started router "
      f"(TLS handshake, upgrade) and holds them {int(meta.get('idle_period', 5)) + 1} s, each sending one message every "
      f"{meta.get('idle_period', '?')} s (which checks that every one is alive); then the same number of plain ws tunnels "
      "through a plain listener of the same process (upsplice: the `copy` plane). RSS per tunnel = (peak RSS − RSS before "
      "the hold) / tunnels, from the router's `VmRSS`; kernel socket buffers are not in it.")
    w("")
    w("| router | TLS tunnels held | RSS before (KiB) | RSS with them (KiB) | **RSS per TLS tunnel** | vs HAProxy | plain tunnels held | RSS per plain tunnel | TLS − plain | runs |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    idle = {}
    for t in [t for t in targets if t != "direct"]:
        per = {}
        for wl in ("idle", "idle-plain"):
            x = get(t, wl)
            m = idle_memory(x) if x else None
            per[wl] = (m, (m["rss_kib"] - m["base_rss_kib"]) * 1024 / m["tunnels_asked"] if m else None, x)
        idle[t] = per
    for t, per in idle.items():
        (m, v, x), (_, vp, xp) = per["idle"], per["idle-plain"]
        hv = idle.get("haproxy", {}).get("idle", (None, None, None))[1]
        held = lambda y: num(((y or {}).get("s") or {}).get("hold", {}).get("held")) if y else "–"
        w(f"| {t} | {held(x)} | {num(m['base_rss_kib']) if m else '–'} | {num(m['rss_kib']) if m else '–'} | "
          f"**{v / 1024:.2f} KiB** | {pos_ratio(v, hv) if t == 'upsplice' else '–'} | {held(xp)} | "
          f"{f'{vp / 1024:.2f} KiB' if vp is not None else '–'} | {f'{(v - vp) / 1024:.2f} KiB' if vp is not None else '–'} | "
          f"{flags(x['s'], x['rc']) if x else '✗'}; {flags(xp['s'], xp['rc']) if xp else '✗'} |" if v is not None else f"| {t} | – | – | – | – | – | – | – | – | ✗ no result |")
    w("")

    ui, hi = idle.get("upsplice", {}).get("idle", (None, None))[1], idle.get("haproxy", {}).get("idle", (None, None))[1]

    # ---- reading: who wins where, by how much (from this run's figures), and where the memory goes
    w("### Reading the figures")
    w("")

    def cmp(a, b, lower_is_better, what):
        """'upsplice … HAProxy' sentence part for one figure: which wins and by how much."""
        if not a or not b:
            return f"{what}: not measured"
        better = a < b if lower_is_better else a > b
        factor = (b / a if lower_is_better else a / b) if better else (a / b if lower_is_better else b / a)
        who = "upsplice" if better else "**HAProxy**"
        return f"{what}: {who} by {factor:.2f}×"

    uh, hh = hs.get("upsplice", {}), hs.get("haproxy", {})
    ur, hr = rs.get("upsplice", {}), rs.get("haproxy", {})
    uo, ho = ol.get("upsplice", {}), ol.get("haproxy", {})
    us_, hs_ = lat((fx.get("upsplice") or {}).get("s")), lat((fx.get("haproxy") or {}).get("s"))
    items = [
        cmp(uh.get("rate"), hh.get("rate"), False, "full handshakes/s"),
        cmp(uh.get("cpu_us"), hh.get("cpu_us"), True, "CPU per full handshake"),
        cmp(ur.get("rate"), hr.get("rate"), False, "resumptions/s"),
        cmp(uo.get("p99"), ho.get("p99"), True, f"handshake p99 at {meta.get('hs_rate', '?')}/s offered"),
        cmp(us_.get("p90"), hs_.get("p90"), True, "wss message p90"),
        cmp(us_.get("p99"), hs_.get("p99"), True, "wss message p99"),
        cmp(us_.get("p999"), hs_.get("p999"), True, "wss message p99.9"),
        cmp(per_msg.get("upsplice"), per_msg.get("haproxy"), True, "CPU per wss message"),
        cmp(bulk.get("upsplice", (None,))[0], bulk.get("haproxy", (None,))[0], False, "bulk MB/s"),
        cmp(bulk.get("upsplice", (None, None))[1], bulk.get("haproxy", (None, None))[1], True, "CPU per GiB"),
        cmp(ui, hi, True, "RSS per idle TLS tunnel"),
    ]
    w("Each figure's winner in this run (upsplice against HAProxy): " + "; ".join(items) + ". One run on a shared, busy "
      "machine: a factor near 1 (within the *drift* of the PROXY table) is not a difference.")
    w("")
    if uh.get("cpu_us") and ur.get("cpu_us"):
        w(f"A resumption costs the servers nearly what a full handshake does here (upsplice {ur['cpu_us'] / uh['cpu_us']:.2f}×, "
          f"HAProxy {pos_ratio(hr.get('cpu_us'), hh.get('cpu_us'))}×, direct "
          f"{pos_ratio(rs.get('direct', {}).get('cpu_us'), hs.get('direct', {}).get('cpu_us'))}×): a TLS 1.3 resumption "
          "(`psk_dhe_ke`, what both offer) still makes the X25519 exchange and only skips the certificate and its signature, "
          "which with an ECDSA P-256 key are the cheap part. With an RSA key (`BENCH_TLS_KEY=rsa`) the signature dominates "
          "and resumption saves much more.")
        w("")
    pu, ph = pp_cost.get("upsplice"), pp_cost.get("haproxy")
    if pu and pu[2] and pu[3]:
        w(f"The PROXY v2 header costs upsplice {(pu[3] / pu[2] - 1) * 100:+.0f} % CPU per handshake"
          + (f" (HAProxy {(ph[3] / ph[2] - 1) * 100:+.0f} %)" if ph and ph[2] and ph[3] else "")
          + ": reading ~28 bytes before the ClientHello is small next to the handshake; the handshakes/s ratio moves by "
          "as much as the loop without a header moves between its two runs (*drift*), so the CPU figure is the one to read.")
        w("")
    w("**Where upsplice's memory per idle TLS tunnel goes.** A plain tunnel on the `copy` plane costs the RSS in the "
      "*RSS per plain tunnel* column (its tasks, the two sockets' state, the relay's bookkeeping; the relay's 64 KiB "
      "buffers are pooled and held only while bytes move). TLS adds rustls's per-connection state: the `ServerConnection` "
      "(boxed inside the tokio-rustls stream) with the traffic keys of both directions (ring's AES-GCM key schedules and "
      "GHASH tables, about 1 KiB), the record layer's state, and the **deframer buffer**: rustls 0.23 reads TLS records into "
      "a `Vec` it grows to 4 KiB on the first read and shrinks back to 4 KiB — never below — whenever it is empty "
      "(`DeframerVecBuffer::prepare_read`), so every connection that ever received a record keeps 4 KiB, zero-filled and "
      "resident, for its lifetime. Its outgoing and plaintext queues (`ChunkVecBuffer`s) free their chunks once drained, so "
      "an idle connection keeps none. The rest of the *TLS − plain* difference is allocator slack from the handshakes "
      "(certificate chain, transcript, key schedule: freed after the handshake, but the tunnels were opened at "
      f"{meta.get('idle_ramp', '?')}/s and freed chunks between live ones are not returned to the kernel; not profiled "
      "here, so this part is the likely explanation, not a measured one). HAProxy keeps no record "
      "buffer per idle connection at all (it sets `SSL_MODE_RELEASE_BUFFERS`, and its own 16 KiB buffers come from pools "
      "only while data moves); its *TLS − plain* is presumably OpenSSL 3's per-connection `SSL` object and session state (not profiled either).")
    w("")

    # ---- goals
    u, h = hs.get("upsplice", {}), hs.get("haproxy", {})
    rows = []
    if u.get("rate") and h.get("rate"):
        met = u["rate"] >= h["rate"]
        rows.append(("TLS: full handshakes/s at least HAProxy's", f"{u['rate'] / h['rate']:.2f} × HAProxy's "
                     f"({num(u['rate'])} vs {num(h['rate'])}/s); server CPU per handshake {pos_ratio(u['cpu_us'], h['cpu_us'])} × its",
                     "met" if met else "not met"))
    else:
        rows.append(("TLS: full handshakes/s at least HAProxy's", "–", "could not be measured"))
    if ui and hi:
        rows.append(("TLS: less memory per idle TLS tunnel than HAProxy", f"{ui / 1024:.2f} KiB vs {hi / 1024:.2f} KiB "
                     f"({ui / hi:.2f} ×)", "met" if ui < hi else "not met"))
    else:
        rows.append(("TLS: less memory per idle TLS tunnel than HAProxy", "–", "could not be measured"))
    for target, measured, verdict in rows:
        w(f"Goal (issue 15): {target.split(': ', 1)[1]} — **{verdict}** ({measured}).")
        w("")
        if goals is not None:
            goals.append((target, measured, verdict, "section TLS termination"))
    return md


# ------------------------------------------------------------------ routes from NATS (a section that runs alone)
NATS_TITLE = "## Routes from NATS at scale"


def nats_json(out: Path, name: str) -> dict | None:
    """One nats-register summary (out/nats-NAME.json), None when the run gave none."""
    path = out / f"nats-{name}.json"
    try:
        return json.loads(path.read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


def nats_wrk(out: Path, name: str) -> dict | None:
    """wrk's summary line of one request loop (out/nats-wrk-NAME.txt)."""
    path = out / f"nats-wrk-{name}.txt"
    if not path.exists():
        return None
    return next((json.loads(ln.split(" ", 1)[1]) for ln in path.read_text().splitlines() if ln.startswith("WRK_JSON ")), None)


def nats_section(out: Path, dest: Path | None = None) -> list[str]:
    """The section from out/nats* (`scripts/bench --only nats`); without those results, the report's old section stays."""
    burst = nats_json(out, "burst")
    kept = burst is None and kept_section(dest, NATS_TITLE)
    if kept:
        return kept
    md = section_head(NATS_TITLE, burst is not None)
    w = md.append
    if burst is None:
        return md
    meta = read_env(out / "nats.env")
    f = lambda k: float(meta[k]) if meta.get(k) not in (None, "") else None  # noqa: E731
    rss = [int(x) for x in meta.get("rss_kib", "").split()] + [None] * 4
    eps = burst.get("endpoints") or 0
    w(f"Run of {meta.get('date_utc', '?')} (commit {meta.get('commit', '?')}), load average {meta.get('loadavg_start', '?')} "
      f"at the start, {meta.get('loadavg_burst', '?')} after the burst and {meta.get('loadavg_end', '?')} at the end. The "
      f"machine has {meta.get('nproc', '?')} cores, shared by nats-server, the generator, the router, the echo backend, wrk "
      "**and other sessions' compilers**: absolute figures move from run to run, the ratios measured in this one run are what "
      "count.")
    w("")
    w("```")
    w(meta.get("command", "scripts/bench --only nats"))
    w("```")
    w("")
    w(f"A real `nats-server` ({meta.get('nats_server', '?')}) on loopback; one upsplice (data plane copy) with `[nats]` "
      f"(`droplet_stale_threshold = \"{meta.get('stale_s', '?')}s\"`: nothing is pruned during the run) and one file "
      "route, `bench.local` → the echo backend, which the request loop uses (file and NATS routes live in one table: "
      "the lookup is the same). `upsplice-loadgen nats-register` publishes "
      f"gorouter's `router.register` JSON (host, port, uris, app, private_instance_id, private_instance_index as a string, "
      f"tags) on a raw NATS connection: {num(eps)} endpoints, each its own address `10.x.y.z:61000`, over "
      f"{num(burst.get('uris'))} URIs (`app-<n>.nats.bench`), at rate {meta.get('rate', '?')}. The request loop is "
      f"`wrk -t1 -c {meta.get('conns', '?')} -d {meta.get('wrk_d', '?')}s` (GET through the router to the echo backend, "
      "keep-alive), closed-loop: a stalled lookup shows in its tail and its max, not as a queue.")
    w("")
    w("### Filling the table")
    w("")
    cpu, wall = f("burst_cpu_s"), f("burst_wall_s")
    absorbed = burst.get("absorbed_s")
    w("| figure | value |")
    w("| --- | --- |")
    w(f"| registrations published (generator → nats-server, until its PONG) | {num(eps)} in {num(burst.get('publish_s'), 2)} s: "
      f"**{num(burst.get('published_per_s'))}/s** ({num((burst.get('bytes') or 0) / eps if eps else None)} bytes of JSON each) |")
    w(f"| registrations absorbed by the router (first PUB → `upsplice_nats_endpoints` = {num(eps)}) | "
      + (f"{num(absorbed, 2)} s: **{num(burst.get('absorbed_per_s'))}/s** |" if absorbed else "**not reached** within the timeout |"))
    w(f"| the router's table then (`upsplice_nats_endpoints` / `upsplice_nats_routes`) | {num(burst.get('router_endpoints'))} / "
      f"{num(burst.get('router_routes'))} |")
    loop = f("loop_cpu_per_s")
    w(f"| router CPU during the burst, with the request loop | {num(cpu, 2)} s in {num(wall, 2)} s "
      f"({num(100 * cpu / wall if cpu and wall else None)} % of one core; the loop alone: {num(100 * loop if loop else None)} %) |")
    w(f"| router RSS before → after | {num(rss[0])} KiB → {num(rss[1])} KiB: **{num((rss[1] - rss[0]) / eps if rss[1] and eps else None, 2)} "
      "KiB per endpoint** (allocator's high-water mark included) |")
    taken = meta.get("refresh_taken")
    w(f"| a refresh of every endpoint at rate max (nothing changes: no rebuild) | published in "
      f"{num((nats_json(out, 'refresh') or {}).get('publish_s'), 2)} s; the router took **{num(int(taken) if taken else None)}** "
      f"of {num(eps)} (dropped by its NATS client as a slow consumer, `upsplice_nats_dropped_messages_total`: "
      f"{meta.get('dropped_total', '?')}); router CPU {num(f('refresh_cpu_s'), 2)} s in {num(f('refresh_wall_s'), 2)} s with the loop; RSS after {num(rss[2])} KiB |")
    w(f"| bad messages | {meta.get('bad_total', '?')} |")
    w("")
    w("### Requests while the table changes")
    w("")
    w("| request loop | requests/s | p50 | p99 | p99.9 | max | errors |")
    w("| --- | --- | --- | --- | --- | --- | --- |")
    for name, label in [("idle", "alone"), ("burst", f"during the burst of {num(eps)} registrations"),
                        ("refresh", "during the refresh at rate max")]:
        x = nats_wrk(out, name)
        if not x:
            w(f"| {label} | – | – | – | – | – | – |")
            continue
        lat = x.get("latency_us") or {}
        errs = sum((x.get("errors") or {}).values())
        rps = x["requests"] / (x["duration_us"] / 1e6) if x.get("duration_us") else None
        ms = lambda us: f"{us / 1000:.2f} ms" if us is not None else "–"  # noqa: E731
        w(f"| {label} | {num(rps)} | {ms(lat.get('p50'))} | {ms(lat.get('p99'))} | {ms(lat.get('p999'))} | {ms(lat.get('max'))} | {errs} |")
    w("")
    w("### From `router.register` to the first routed request")
    w("")
    w("One new URI at a time, pointing at the echo backend; the generator publishes its registration and requests it through "
      "the router (a new connection each time) every millisecond until the answer is not 404.")
    w("")
    w("| table | samples | median | max |")
    w("| --- | --- | --- | --- |")
    for name, label in [("first-empty", "empty"), ("first-full", f"{num(eps)} endpoints")]:
        x = nats_json(out, name)
        if x:
            w(f"| {label} | {x['samples']} | {num(x['p50_ms'], 1)} ms | {num(x['max_ms'], 1)} ms |")
        else:
            w(f"| {label} | – | – | – |")
    w("")
    first = {k: (nats_json(out, k) or {}).get("p50_ms") for k in ("first-empty", "first-full")}
    idle, during = nats_wrk(out, "idle") or {}, nats_wrk(out, "burst") or {}
    p99 = lambda x: (x.get("latency_us") or {}).get("p99")  # noqa: E731
    w("### Reading the figures")
    w("")
    w("* **CPU.** Two cores run the router, wrk, the echo backend, nats-server and the generator, so the router's CPU is "
      "bounded: what the registrations take shows as requests the loop did not get (its requests/s above), not as CPU "
      "added on top; the router's own figure is given with the loop running.")
    w(f"* **Register to routed.** The NATS task hands changes to the routing table every 100 ms, so on an empty table a new "
      f"route is routed after about half of that (median {num(first['first-empty'], 1)} ms). With {num(eps)} endpoints the "
      f"median is {num(first['first-full'], 1)} ms: a flush hands over only the URIs that changed, and the table is a "
      "persistent map (a new version shares every route it did not change with the one before), so the cost of a change "
      "does not grow with the table.")
    w(f"* **Requests during the burst.** Lookups take no lock, and no request failed; the tail grows (p99 {num((p99(idle) or 0) / 1000, 2)} "
      f"→ {num((p99(during) or 0) / 1000, 2)} ms): parsing the registrations (one NATS task, one message at a time) and "
      "the flushes take CPU from the two cores the loop, wrk and nats-server share.")
    w("* **Drops at full speed.** The router's NATS client (async-nats) buffers 262,144 messages per subscription; what "
      "comes beyond that while the NATS task falls behind is dropped, logged and counted "
      "(`upsplice_nats_dropped_messages_total`). The refresh row shows how many of a refresh sent as fast as one "
      "connection can the router took. A route emitter paces its refreshes (every 20 s), and a lost refresh only matters "
      "if the next one is lost too; a first registration lost this way stays unknown until that endpoint's next refresh.")
    w("")
    return md


# ------------------------------------------------------------------ a three-node fleet (a section that runs alone)
FLEET_TITLE = "## A three-node fleet against one node"
# Written by hand from `cargo bench -p upsplice-benches --bench handshake -- route_lookup`
# (a microbenchmark, not a load run): a full run keeps it as it is.
LOOKUP_TITLE = "## Route lookup in a table learned from NATS"
FLEET_TARGETS = [
    ("direct", "(a) direct", "generator → echo backend"),
    ("node", "(d) one node, no balancer", "generator (PROXY v2 from 127.0.0.2) → node 1 → echo"),
    ("lb-one", "(b) HAProxy → one node", "generator → HAProxy → node 1 → echo"),
    ("lb-three", "(c) HAProxy → three nodes", "generator → HAProxy (round-robin) → nodes 1–3 → echo"),
]


def fleet_run(out: Path, name: str) -> dict:
    """One fleet run (`fleet-NAME`): both generator processes' summaries, their sums and the merged .hlog report."""
    runs = {json.loads(ln)["name"]: json.loads(ln) for ln in (out / "fleet-runs.jsonl").read_text().splitlines()
            if ln.strip()} if (out / "fleet-runs.jsonl").exists() else {}
    x = runs.get(f"fleet-{name}")
    parts = [load(out / f"fleet-{name}-{i}.json") for i in (1, 2)]
    merged = load(out / f"fleet-{name}-merged.json")
    if x is None or None in parts:
        return dict(ok=False, x=x, merged=merged)
    ch = [p.get("churn") or {} for p in parts]
    ok = all(p.get("valid") for p in parts) and x["rc"] == [0, 0] and x["merge_rc"] == 0
    problems = "; ".join(f"{i + 1}: {flags(p, rc)}" for i, (p, rc) in enumerate(zip(parts, x["rc"])) if flags(p, rc) != "ok")
    return dict(ok=ok, x=x, parts=parts, merged=merged, problems=problems or "ok",
                completed=sum(c.get("completed", 0) for c in ch), attempts=sum(c.get("attempts", 0) for c in ch),
                cycles_per_s=sum(c.get("cycles_per_s", 0) for c in ch), achieved=sum(p.get("achieved_rate", 0) for p in parts),
                offered=sum(p.get("target_rate", 0) for p in parts), errors=sum(p.get("total_errors", 0) for p in parts),
                lat=lat(merged), hs=lat(parts[0], "handshake"), watch=parts[0].get("watch") or {},
                gen_cores=sum((p.get("cpu") or {}).get("cores_busy", 0) for p in parts))


def fleet_line(out: Path, name: str) -> str:
    """The progress line of one fleet run."""
    r = fleet_run(out, name)
    if "parts" not in r:
        return "no result"
    lt = r["lat"]
    return (f"{num(r['cycles_per_s']):>8} cycles/s ({num(r['completed'])} of {num(r['attempts'])}) | merged p50 "
            f"{ms(lt.get('p50'))} p99 {ms(lt.get('p99'))} ms | errors {r['errors']} | {r['problems']}")


def fleet_cpu(r: dict, meta: dict) -> dict:
    """CPU seconds of HAProxy, the nodes and the echo backend over the first generator process's run (None: not watched),
    the machine's busy cores, and of those the cores that none of this run's processes used (other sessions' work)."""
    procs = {p["pid"]: p["cpu_s"] for p in r["watch"].get("processes") or []}
    pick = lambda pids: sum(procs[p] for p in pids if p in procs) if any(p in procs for p in pids) else None  # noqa: E731
    ints = lambda v: [int(p) for p in (v or "").split(",") if p]  # noqa: E731
    machine = (r["watch"].get("machine") or {}).get("cores_busy")
    ours = sum(p.get("cores_busy", 0) for p in r["watch"].get("processes") or []) + r["gen_cores"]
    return dict(lb=pick(ints(meta.get("lb_pid"))), nodes=pick(ints(meta.get("node_pids"))), echo=pick(ints(meta.get("echo_pid"))),
                machine=machine, others=max(machine - ours, 0.0) if machine is not None else None)


def fleet_section(out: Path, dest: Path | None = None) -> list[str]:
    """The section from out/fleet* (`scripts/bench --only fleet`); without those results, the report's old section stays."""
    measured = (out / "fleet-runs.jsonl").exists() and fleet_run(out, "direct-closed1").get("parts") is not None
    kept = not measured and kept_section(dest, FLEET_TITLE)
    if kept:
        return kept
    md = section_head(FLEET_TITLE, measured)
    w = md.append
    if not measured:
        return md
    meta = read_env(out / "fleet.env")
    reg = load(out / "fleet-register.json")
    conc, rate, d = meta.get("conc", "?"), meta.get("rate", "?"), meta.get("d", "?")
    w(f"Run of {meta.get('date_utc', '?')} (commit {meta.get('commit', '?')}), load average {meta.get('loadavg_start', '?')} "
      f"at the start and {meta.get('loadavg_end', '?')} at the end (the 1-minute figure after each run: the tables' last "
      f"column). The machine has "
      f"{meta.get('nproc', '?')} cores, shared by the generator's two processes, HAProxy (2 threads), the three nodes, the "
      "echo backend, nats-server **and other sessions' compilers and tests**: absolute figures move from run to run, the "
      "ratios measured in this one run are what count.")
    w("")
    w("```")
    w(meta.get("command", "scripts/bench --only fleet"))
    w("```")
    w("")
    w(f"The setup of the fleet test (forwarder/tests/fleet.rs): a real `nats-server` ({meta.get('nats_server', '?')}); three "
      "upsplice nodes (data plane copy), each its own process on its own loopback address (127.0.0.11, .12, .13), with "
      "`[nats]` routes only and an http listener that takes a PROXY v2 header from 127.0.0.2 only; "
      f"{meta.get('haproxy', 'HAProxy').split(' - ')[0].replace('HAProxy version', 'HAProxy')} in TCP mode in front (`nbthread 2`, `source 127.0.0.2 send-proxy-v2`, health checks "
      "every second), with one frontend that balances round-robin over the three nodes and one per node. The echo backend "
      "(`upsplice-loadgen echo`, one thread) is registered once over NATS by `upsplice-loadgen nats-register` (gorouter's "
      "`router.register` JSON)"
      + (f"; node 1 routed it {num(reg.get('p50_ms'), 1)} ms after the registration was published, through HAProxy" if reg else "")
      + ". Every cycle is `upsplice-loadgen churn`: connect, WebSocket upgrade, one 64-byte message and its echo, "
      "client-first close. The generator runs as **two processes at once**, each from its own source addresses "
      f"({meta.get('sources', '?')}; to the node directly both come from 127.0.0.2, the address the node trusts a PROXY "
      "header from, and send it themselves), and `upsplice-loadgen merge` adds their two `.hlog` files (per-second "
      "histograms of the corrected cycle latency) into the one latency report below; cycles/s are the two processes' sum. "
      f"Each run lasts {d} s.")
    w("")
    w(f"### Closed loop: {conc} cycles in flight per process (2 × {conc})")
    w("")
    w("Run twice, the second round in reverse order ((c), (b), (d), (a)): the rounds' difference is the drift of the shared "
      "machine, and the ratios are taken from the two rounds' mean, in which a steady drift cancels. *CPU per cycle* is "
      "the watched processes' CPU over the first generator process's runs divided by its cycles (both rounds).")
    w("")
    w("| target | path | cycles/s, round 1 · round 2 | mean | vs (a) direct | vs (d) one node | vs (b) HAProxy → one node | "
      "cycle p50 / p99 (ms, merged), round 1 · round 2 | CPU per cycle, µs: HAProxy / nodes / echo | machine busy / of it not "
      "this run's (cores) | "
      "errors | listen overflows / SYN retransmits, round 1 · round 2 | load after, round 1 · round 2 |")
    w("| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | --- | --- |")
    rounds = {t: [fleet_run(out, f"{t}-closed{i}") for i in (1, 2)] for t, _, _ in FLEET_TARGETS}

    def mean_rate(t):
        got = [r["cycles_per_s"] for r in rounds[t] if r.get("parts")]
        return sum(got) / len(got) if got else None

    drops = lambda r: f"{r['x'].get('listen_overflows', '?')} / {r['x'].get('syn_retrans', '?')}"  # noqa: E731
    cost = {}  # target -> CPU per cycle (µs) of HAProxy, the nodes, the echo backend
    for t, label, path in FLEET_TARGETS:
        rs = [r for r in rounds[t] if r.get("parts")]
        if not rs:
            w(f"| {label} | {path} | – | – | – | – | – | – | – | – | – | – | – |")
            continue
        cpus = [fleet_cpu(r, meta) for r in rs]
        n1 = sum((r["parts"][0].get("churn") or {}).get("completed") or 0 for r in rs)

        def per_us(key):
            v = [c[key] for c in cpus if c[key] is not None]
            return sum(v) / n1 * 1e6 if v and n1 else None

        per = lambda key: num(per_us(key))  # noqa: E731
        cost[t] = {k: per_us(k) for k in ("lb", "nodes", "echo")}

        m = mean_rate(t)
        each = lambda f: " · ".join(f(r) if r.get("parts") else "–" for r in rounds[t])  # noqa: E731
        busy = [c["machine"] for c in cpus if c["machine"] is not None]
        others = [c["others"] for c in cpus if c["others"] is not None]
        problems = "; ".join(r["problems"] for r in rs if not r["ok"])
        w(f"| {label} | {path} | {each(lambda r: num(r['cycles_per_s']))} | **{num(m)}** | "
          f"{ratio(m, mean_rate('direct')) if t != 'direct' else '–'} | "
          f"{ratio(m, mean_rate('node')) if t not in ('direct', 'node') else '–'} | "
          f"{ratio(m, mean_rate('lb-one')) if t == 'lb-three' else '–'} | "
          f"{each(lambda r: ms(r['lat'].get('p50')) + ' / ' + ms(r['lat'].get('p99')))} | "
          f"{per('lb')} / {per('nodes')} / {per('echo')} | {num(sum(busy) / len(busy) if busy else None, 2)} / "
          f"{num(sum(others) / len(others) if others else None, 2)} | "
          f"{sum(r['errors'] for r in rs)}{' ✗ ' + problems if problems else ''} | {each(drops)} | "
          f"{each(lambda r: r['x']['loadavg'].split()[0])} |")
    w("")
    w(f"### Open loop: {rate} cycles/s per process offered (2 × {rate}), corrected latency")
    w("")
    w("A cycle is due at its place in the schedule; its latency counts from then, so a cycle held back (a full window of 256 "
      "per process, a slow accept) is charged for the wait. Run twice, the second round in reverse order; each round's "
      "figures are the two processes' `.hlog` files merged. *Handshake* is connect → 101 (the first process's own summary). "
      "*Listen overflows / SYN retransmits* are the kernel's counts over the run (`/proc/net/netstat`, every process on the "
      "machine, other sessions' tests included): a connection whose SYN a full listen queue dropped waits one second for its "
      "retransmission, which shows as a second-long tail. *CPU not this run's*: the machine's busy cores less what the "
      "watched processes (HAProxy, the nodes, the echo backend) and the two generator processes used — other sessions' "
      "work, which takes the cores from under the run.")
    w("")
    w("| target | round | started /s (offered) | completed | cycle p50 | p99 | p99.9 | max (ms, merged) | handshake p50 / p99 (ms) | "
      "errors | listen overflows / SYN retransmits | CPU not this run's (cores) | load after |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: | --- |")
    for t, label, _ in FLEET_TARGETS:
        for i in (1, 2):
            r = fleet_run(out, f"{t}-open{i}")
            if "parts" not in r:
                w(f"| {label} | {i} | – | – | – | – | – | – | – | – | – | – | – |")
                continue
            lt, hs = r["lat"], r["hs"]
            w(f"| {label} | {i} | {num(r['achieved'])} ({num(r['offered'])}) | {num(r['completed'])} / {num(r['attempts'])} | "
              f"{ms(lt.get('p50'))} | {ms(lt.get('p99'))} | {ms(lt.get('p999'))} | {ms(lt.get('max'))} | "
              f"{ms(hs.get('p50'))} / {ms(hs.get('p99'))} | {r['errors']}{'' if r['problems'] == 'ok' else ' ' + r['problems']} | "
              f"{drops(r)} | {num(fleet_cpu(r, meta)['others'], 2)} | {r['x']['loadavg'].split()[0]} |")
    w("")
    acc = [meta.get(f"node{i}_accepted") for i in (1, 2, 3)]
    spread = [abs(a["cycles_per_s"] - b["cycles_per_s"]) / max(a["cycles_per_s"], b["cycles_per_s"])
              for a, b in rounds.values() if a.get("parts") and b.get("parts") and max(a["cycles_per_s"], b["cycles_per_s"]) > 0]
    opens = {t: [fleet_run(out, f"{t}-open{i}") for i in (1, 2)] for t, _, _ in FLEET_TARGETS}
    p99s = {t: sorted(r["lat"]["p99"] for r in rs if r.get("parts") and r["lat"].get("p99") is not None) for t, rs in opens.items()}
    open_drops = sum((r["x"] or {}).get("listen_overflows", 0) + (r["x"] or {}).get("syn_retrans", 0)
                     for rs in opens.values() for r in rs if r.get("x"))
    w("### Reading the figures")
    w("")
    c_of = lambda t, k: (cost.get(t) or {}).get(k)  # noqa: E731
    three, one = c_of("lb-three", "nodes"), c_of("lb-one", "nodes")
    fleet_costlier = "" if three is None or one is None else (
        f": per cycle the fleet path costs {ratio(three, one)}× the CPU of one node")
    w(f"* **Not scale-out.** The three nodes share the same {meta.get('nproc', '?')} cores with HAProxy, the generator and "
      "the echo backend, all busy in the closed loop (the *machine busy* column), so three nodes cannot serve more than one: "
      "(c) against (b) is the cost of the fleet path (the balancer spreading connections over three processes, each with "
      "its own runtime and caches), not the capacity a fleet on three machines would add. On separate machines each node "
      "brings its own cores and the fleet's rate would add up to the balancer's limit; that cannot be measured on this "
      f"machine. Here (c) made {ratio(mean_rate('lb-three'), mean_rate('lb-one'))}× the cycles of (b), while the nodes "
      f"spent {num(c_of('lb-three', 'nodes'))} µs of CPU per cycle across three against {num(c_of('lb-one', 'nodes'))} µs in "
      f"one{fleet_costlier}. A difference in rate on saturated cores is how they were shared (three "
      "nodes run six tokio workers against HAProxy's two threads, the generator's two processes and the echo backend) "
      "or a limit of one process that three do not hit (each node has its own accept loop; not profiled), not capacity "
      "that three machines would add.")
    w(f"* **The balancer's cost.** (b) against (d), {ratio(mean_rate('lb-one'), mean_rate('node'))}× here, is what HAProxy "
      "in TCP mode adds to every cycle: one more accept, connect and PROXY header per connection, and its CPU "
      f"({num(c_of('lb-one', 'lb'))} µs per cycle) taken from the same two cores; on a real foundation the balancer runs on "
      "machines of its own.")
    if spread:
        w(f"* **Noise.** The two closed-loop rounds of one target differ by up to {num(100 * max(spread))} % of the larger: "
          "other sessions kept part of the two cores busy all along (the *not this run's* column), so a ratio between "
          "targets is known to about that much too; a second run of the section moves the ratios by as much.")
    if any(p99s.values()):
        labels = {t: label.split(")")[0] + ")" for t, label, _ in FLEET_TARGETS}
        best, worst = max(v[0] for v in p99s.values() if v), max(v[-1] for v in p99s.values() if v)
        kept_up = all(r.get("ok") and r["problems"] == "ok" and r["completed"] == r["attempts"]
                      for rs in opens.values() for r in rs if r.get("parts"))
        w("* **Open-loop tails.** At 2 × " + str(rate) + " cycles/s "
          + ("every target keeps up" if kept_up else "not every run kept up (see its errors column)")
          + ", and the better of its two rounds "
          "has a p99 of " + ", ".join(f"{labels[t]} {ms(v[0])} ms" for t, v in p99s.items() if v)
          + ("; the other rounds stay within twice that (at most " + ms(worst) + " ms)." if worst <= 2 * best else
             "; the other round's tail is longer (up to " + ms(worst) + " ms), with "
          + ("no listen queue overflow or SYN retransmission in any open-loop run, so no connection waited for a "
             "retransmitted SYN; presumably stalls of the shared machine, which hit whichever run they fall in (not "
             "verified: the runs' *not this run's* CPU is 1 to 2 cores)." if open_drops == 0 else
             f"{open_drops} listen queue overflows and SYN retransmissions over the open-loop runs (machine-wide).")
          + " The better round is the closer estimate of the path's own tail; neither is a bound."))
    w(f"* **Spread.** Connections the nodes' web listeners accepted over the whole section (health checks included): "
      f"node 1 {num(int(acc[0])) if acc[0] else '?'}, node 2 {num(int(acc[1])) if acc[1] else '?'}, node 3 "
      f"{num(int(acc[2])) if acc[2] else '?'}; node 1 also carries (d) and (b), and (c) spreads evenly.")
    w("* **Merging.** The latency columns are the two generator processes' `.hlog` files added by `upsplice-loadgen merge` "
      "(the same histograms the processes' own summaries hold, added per second of wall-clock time); cycles/s add the "
      "two processes' own rates.")
    w("")
    return md


def replace_section(report_path: Path, lines: list[str], title: str, before: str) -> None:
    """Puts `lines` (a `## ` section) into the report in place of the section called `title`, or, when it has none,
    before the section called `before` (at the end without that); the rest of the file stays as it was."""
    old = report_path.read_text().splitlines() if report_path.exists() else []
    heads = [i for i, ln in enumerate(old) if ln.startswith("## ")]
    if title in old:
        start = old.index(title)
        end = next((i for i in heads if i > start), len(old))
    else:
        start = end = old.index(before) if before in old else len(old)
    report_path.write_text("\n".join(old[:start] + lines + old[end:]) + "\n")



def goals_table(b: Bench) -> list[str]:
    md, w = b.section()
    w("## Targets")
    w("")
    w("| target | measured | verdict | notes |")
    w("| --- | --- | --- | --- |")
    for t, m, v, n in b.goals:
        vv = {"met": "**met**", "not met": "**not met**"}.get(v, f"*{v}*")
        w(f"| {t} | {m} | {vv} | {n} |")
    w("")
    return md


# ------------------------------------------------------------------ report
def report(out: Path, dest: Path, loadgen: str) -> None:
    b = Bench(out, dest, loadgen)
    # Sections are rendered in the order their goals belong in the table;
    # the table itself stands after the data planes.
    before = [header(b), how_to_run(b), setup(b), data_planes(b)]
    after = [fixed_latency(b), sustained_rate(b), handshakes(b), churn(b), bulk(b), two_way_bulk(b),
             http_keepalive(b.out, b.goals), tls_section(b.out, b.goals), nats_section(b.out, dest),
             kept_section(dest, LOOKUP_TITLE) or [], fleet_section(b.out, dest), cpu(b), idle_tunnels(b), drift(b), known_problems(b)]
    md = [ln for sec in before + [goals_table(b)] + after for ln in sec]
    dest.write_text("\n".join(md) + "\n")


def main(argv):
    if len(argv) >= 3 and argv[1] == "line":
        print(line(argv[2], argv[3] if len(argv) > 3 else "0"))
    elif len(argv) == 4 and argv[1] == "fleet-line":
        print(fleet_line(Path(argv[2]), argv[3]))
    elif len(argv) == 3 and argv[1] == "http-ka-line":
        print(http_ka_line(argv[2]))
    elif len(argv) == 5 and argv[1] == "report":
        report(Path(argv[2]), Path(argv[3]), argv[4])
    elif len(argv) == 5 and argv[1:3] == ["section", "http-keepalive"]:
        replace_section(Path(argv[4]), http_keepalive(Path(argv[3])), HTTP_KA_TITLE, "## CPU per million messages and per GiB")
    elif len(argv) == 5 and argv[1:3] == ["section", "tls"]:
        replace_section(Path(argv[4]), tls_section(Path(argv[3])), TLS_TITLE, "## CPU per million messages and per GiB")
    elif len(argv) == 5 and argv[1:3] == ["section", "nats"]:
        replace_section(Path(argv[4]), nats_section(Path(argv[3])), NATS_TITLE, "## CPU per million messages and per GiB")
    elif len(argv) == 5 and argv[1:3] == ["section", "fleet"]:
        replace_section(Path(argv[4]), fleet_section(Path(argv[3])), FLEET_TITLE, "## CPU per million messages and per GiB")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
