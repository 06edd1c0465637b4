#!/usr/bin/env python3
"""scripts/profile's report: per-unit figures from its raw results.

  profile-report.py OUT              the summary (markdown) of every run in OUT
  profile-report.py line OUT NAME    one line for one run (progress)
  perf script ... | profile-report.py fold
                                     perf script (-F pid,tid,comm,period,ip,sym, -g)
                                     folded to "pid<TAB>thread comm<TAB>root;..;leaf<TAB>ns"

A unit is one echoed message (ws), one connect-upgrade-echo-close cycle
(churn) or one request (http); units in the window = rate x window (the
loads are open-loop; the generator's JSON says whether the rate held).
"""
import collections
import glob
import json
import os
import re
import sys

TARGETS = ["direct", "haproxy", "copy", "splice", "uring", "sockmap"]
WORKLOADS = ["ws", "churn", "http", "wrk"]
UNIT = {"ws": "message", "churn": "cycle", "http": "request", "wrk": "request"}
HZ = os.sysconf("SC_CLK_TCK")


def fold(lines):
    head = re.compile(r"^(.*?)\s+(\d+)/(\d+)\s+(\d+)\s*$")
    acc = collections.Counter()
    cur, frames = None, []

    def flush():
        if cur:
            acc[(cur[0], cur[1], ";".join(reversed(frames)) or "[none]")] += cur[2]

    for ln in lines:
        ln = ln.rstrip("\n")
        if not ln.strip():
            flush()
            cur, frames = None, []
            continue
        if not ln.startswith("\t") and not ln.startswith(" "):
            m = head.match(ln)
            if m:
                flush()
                cur, frames = (m.group(2), m.group(1).strip().replace(" ", "_").replace("\t", "_"), int(m.group(4))), []
            continue
        parts = ln.strip().split(None, 1)
        if len(parts) == 2:
            ip, sym = parts
            sym = re.sub(r"\+0x[0-9a-f]+$", "", sym).replace(";", ",")
            if sym == "[unknown]":
                continue
            frames.append(sym + ("_[k]" if ip.startswith("ffff") else ""))
    flush()
    for (pid, comm, stack), ns in acc.most_common():
        print(f"{pid}\t{comm}\t{stack}\t{ns}")


def read_env(path):
    env = {}
    if os.path.exists(path):
        for ln in open(path):
            if "=" in ln:
                k, v = ln.rstrip("\n").split("=", 1)
                env[k] = v
    return env


def read_stat(path):
    """perf stat -x, output: {event: count}."""
    out = {}
    if not os.path.exists(path):
        return out
    for ln in open(path):
        f = ln.strip().split(",")
        if len(f) < 3 or ln.startswith("#"):
            continue
        try:
            out[f[2]] = float(f[0])
        except ValueError:
            pass
    return out


def busy_ticks(line):
    f = [int(x) for x in line.split()[1:]]
    # user nice system idle iowait irq softirq steal
    return f[0] + f[1] + f[2] + f[5] + f[6] + f[7], sum(f[:8])


def threads(path):
    out = {}
    if os.path.exists(path):
        for ln in open(path):
            f = ln.split()
            if len(f) == 6:
                out[f[0]] = (f[1], int(f[2]) + int(f[3]), int(f[4]) + int(f[5]))
    return out


IDLE = re.compile(r"(default_idle|pv_native_safe_halt|native_safe_halt|cpuidle|intel_idle|acpi_idle|poll_idle|mwait_idle|do_idle)")
NET = re.compile(r"(net_rx_action|__netif_receive|tcp_v4_rcv|sk_psock|sk_skb|tcp_bpf|process_backlog|ip_rcv|__dev_queue_xmit)")
KTHREAD = re.compile(r"^(kworker|ksoftirqd|iou-|rcu|migration|kthreadd)")
SYSCALL = re.compile(r"^(?:__x64_sys_|__ia32_sys_|__do_sys_|__se_sys_)(\w+)_\[k\]$")
USER_GROUPS = [
    ("allocation", re.compile(r"(^malloc$|^free$|^realloc$|^calloc$|_int_malloc|_int_free|_int_realloc|malloc_consolidate|cfree|__rust_alloc|__rust_dealloc|__rust_realloc|alloc::alloc::|alloc::raw_vec|tcache|__libc_malloc|__libc_free)")),
    ("httparse", re.compile(r"httparse")),
    ("tokio scheduling, timers, io driver", re.compile(r"(tokio::runtime|tokio::time|tokio::sync|tokio::io::|mio::|parking_lot|std::sys::.*thread|std::thread)")),
    ("memcpy/memmove/memset", re.compile(r"(memcpy|memmove|memset|memcmp)")),
    ("upsplice handshake (head, rewrite, route)", re.compile(r"upsplice::(handshake|route|host|path)")),
    ("upsplice upstream", re.compile(r"upsplice::upstream")),
    ("upsplice access log, metrics", re.compile(r"upsplice::(access|metrics)")),
    ("upsplice data plane", re.compile(r"upsplice::dataplane")),
    ("upsplice connection, server", re.compile(r"upsplice::(connection|server|state)")),
    ("haproxy", re.compile(r"^(h1_|htx_|http_|stream_|sc_|si_|conn_|fd_|task_|process_|run_tasks|__task|pool_|b_|raw_sock|sock_|channel_|tcp_|ha_|h1|co_)")),
]


WRAPPERS = [  # the libc (or std) frame a syscall was entered from, when the kernel frames do not name it
    (re.compile(r"(__send|__libc_send|sendto)$"), "sendto"),
    (re.compile(r"(__recv|__libc_recv|recvfrom)$"), "recvfrom"),
    (re.compile(r"epoll_wait$"), "epoll_wait"),
    (re.compile(r"epoll_ctl$"), "epoll_ctl"),
    (re.compile(r"(libc_write|__write)$"), "write"),
    (re.compile(r"(libc_read|__read)$"), "read"),
    (re.compile(r"writev$"), "writev"),
    (re.compile(r"readv$"), "readv"),
    (re.compile(r"^splice$"), "splice"),
    (re.compile(r"^syscall$"), "futex (libc syscall())"),
    (re.compile(r"(__close|close)$"), "close"),
]


def syscall_of(frames):
    for f in frames:  # the outermost syscall entry
        m = SYSCALL.match(f)
        if m:
            return m.group(1)
    for i, f in enumerate(frames):
        if f.startswith("entry_SYSCALL_64") and i > 0:
            for rx, name in WRAPPERS:
                if rx.search(frames[i - 1]):
                    return name
            return frames[i - 1]
    return None


def classify(stack):
    """A stack (root;..;leaf) to a group: the syscall it is in (kernel
    frames under a syscall entry; a context switch on the way back to user
    space is its own group), a page fault, softirq or interrupt outside
    one, or the leaf-most user frame group."""
    frames = stack.split(";")
    kernel = [f for f in frames if f.endswith("_[k]")]
    if kernel:
        if any(f.startswith("exit_to_user_mode_loop") for f in kernel) and any("schedule" in f for f in kernel):
            return "context switch on return to user space (preempted)"
        sc = syscall_of(frames)
        if sc:
            return "sys " + sc
        if any("io_uring" in f or "io_wq" in f or "io_worker" in f for f in kernel):
            return "io_uring (kernel, outside a syscall)"
        if any("asm_exc_page_fault" in f or "handle_mm_fault" in f for f in kernel):
            return "page faults"
        if any(NET.search(f) for f in kernel):
            return "kernel network outside a syscall (softirq, workqueue)"
        if any("schedule" in f for f in kernel):
            return "kernel scheduling outside a syscall"
        return "kernel other (interrupts, timers)"
    for f in reversed(frames):
        for name, rx in USER_GROUPS:
            if rx.search(f):
                return name
    return "other user code"


def leaf(stack):
    return stack.rsplit(";", 1)[-1]


def folded(path):
    rows = []
    if os.path.exists(path):
        for ln in open(path):
            f = ln.rstrip("\n").split("\t")
            if len(f) == 4:
                rows.append((f[0], f[1], f[2], int(f[3])))
    return rows


class Run:
    def __init__(self, out, name):
        self.name = name
        self.target, self.wl = name.split("-", 1)
        self.env = read_env(f"{out}/{name}.env")
        self.ok = bool(self.env)
        if not self.ok:
            return
        self.window = float(self.env["window_s"])
        self.rate = float(self.env["rate"])
        self.units = self.rate * self.window or 1
        try:
            self.js = json.load(open(f"{out}/{name}.json"))
        except (OSError, ValueError):
            self.js = {}
        self.router = read_stat(f"{out}/{name}.router.stat")
        self.count_env = read_env(f"{out}/{name}.count.env")
        self.c_router = read_stat(f"{out}/{name}.count.router.stat")
        self.c_echo = read_stat(f"{out}/{name}.count.echo.stat")
        self.c_lg = read_stat(f"{out}/{name}.count.lg.stat")
        reads = read_stat(f"{out}/{name}.count.router.reads")
        self.c_reads = {
            "recvfrom → EAGAIN": reads.get("syscalls:sys_exit_recvfrom"),
            "read → EAGAIN": reads.get("syscalls:sys_exit_read"),
            "splice → EAGAIN": reads.get("syscalls:sys_exit_splice"),
            "recvfrom with MSG_PEEK": reads.get("syscalls:sys_enter_recvfrom"),
        }
        try:
            self.cjs = json.load(open(f"{out}/{name}.count.json"))
        except (OSError, ValueError):
            self.cjs = {}
        self.echo = read_stat(f"{out}/{name}.echo.stat")
        self.lg = read_stat(f"{out}/{name}.lg.stat")
        b0, t0 = busy_ticks(self.env["stat_start"].split(" ", 1)[1].strip())
        b1, t1 = busy_ticks(self.env["stat_end"].split(" ", 1)[1].strip())
        self.machine_busy_s = (b1 - b0) / HZ
        self.th0 = threads(f"{out}/{name}.threads0")
        self.th1 = threads(f"{out}/{name}.threads1")
        self.rows = folded(f"{out}/{name}.folded")
        rp, ep, lp = self.env.get("router_pid"), self.env["echo_pid"], self.env["lg_pid"]
        self.focus = rp or ep
        groups = collections.Counter()
        for pid, comm, stack, ns in self.rows:
            if pid == rp:
                g = "router"
            elif pid == ep:
                g = "echo"
            elif pid == lp:
                g = "loadgen"
            elif pid == "0":
                g = "idle" if IDLE.search(stack) and not NET.search(stack) else "softirq/kernel in idle"
            elif KTHREAD.match(comm):
                g = "kernel threads (" + re.sub(r"[/:].*|\d+$", "", comm) + ")"
            else:
                # Other helpers' builds and tests (their loopback traffic too:
                # a sender's softirq runs in its own context).
                g = "other processes (noise)"
            groups[g] += ns
        self.groups = groups

    def per(self, v):
        return v / self.units

    def us(self, ns):
        return ns / 1e3 / self.units

    def stat_per(self, who, event, scale=1.0):
        """A perf stat count per unit: from the counting run where the echo
        counts the units, else from the sampling run."""
        if self.by_echo():
            st = {"router": self.c_router, "echo": self.c_echo, "lg": self.c_lg}[who]
            return st.get(event, 0) * scale / self.count_units() if st else None
        st = {"router": self.router, "echo": self.echo, "lg": self.lg}[who]
        return st.get(event, 0) * scale / self.units if st else None

    def router_us(self):
        if self.by_echo():  # the counting run's window, units counted at the echo
            return self.c_router.get("task-clock", 0) * 1e3 / self.count_units()
        return self.task_us(self.router)

    def task_us(self, st):
        return st.get("task-clock", 0) * 1e3 / self.units if st else None  # msec -> us

    def syscalls(self, st):
        return {k.split("sys_enter_", 1)[1]: self.cper(v) for k, v in st.items() if k.startswith("syscalls:sys_enter_") and v}

    def count_units(self):
        """Units in the counting run's window. A closed loop (wrk) has no
        fixed rate and its average over the run is not the window's: there
        the echo backend's sends in the window count the requests (one each,
        as the direct run shows)."""
        if self.by_echo():
            return self.c_echo.get("syscalls:sys_enter_sendto", 0) or 1
        return self.rate * float(self.count_env.get("window_s") or self.window)

    def by_echo(self):
        """Whether the echo backend's sends count the units: one send per
        request or per message (the direct runs show 1.00) as long as the
        echo does not coalesce, i.e. for requests and for messages at low
        rates. It also corrects for a generator that stalled in the window
        (this machine's load spikes do that)."""
        return self.wl in ("wrk", "http") or (self.wl == "ws" and self.rate <= 5000)

    def cper(self, v):
        """Per unit of the counting run."""
        return v / self.count_units()

    def ours_us(self):
        return sum(v for g, v in self.groups.items() if g not in ("idle", "other processes (noise)")) / 1e3 / self.units

    def line(self):
        j = self.js
        rr = j.get("rate_reached")
        c = j.get("latency_us", {}).get("corrected", {})
        s = f"rate {j.get('achieved_rate', 0):.0f}/s{'' if rr else ' NOT REACHED'} p50 {c.get('p50', 0)} p99 {c.get('p99', 0)} us"
        s += f" errors {j.get('total_errors', '?')}"
        if self.router:
            s += f" | router {self.router_us():.1f} us, {self.cper(self.c_router.get('raw_syscalls:sys_enter', 0)):.2f} syscalls, "
            s += f"{self.stat_per('router', 'context-switches'):.2f} cs per {UNIT[self.wl]}"
        if self.rows:
            s += f" | sampled ours {self.ours_us():.1f} us"
        return s + f" | load {self.env['loadavg_start']}"


def achieved(r):
    j = r.js
    if j:
        return f"{j.get('achieved_rate', 0):.0f}" + ("" if j.get("rate_reached") else " (not reached)")
    return (f"{r.rate:.0f} over the run (closed loop); counting run's window: "
            f"{r.count_units() / float(r.count_env.get('window_s') or r.window):.0f}")


def fmt(v, d=1):
    return "–" if v is None else f"{v:.{d}f}"


def summary(out):
    meta = read_env(f"{out}/meta.env")
    runs = {}
    for p in sorted(glob.glob(f"{out}/*.env")):
        n = os.path.basename(p)[:-4]
        if "-" in n and n.split("-", 1)[1] in WORKLOADS:
            r = Run(out, n)
            if r.ok:
                runs[n] = r
    print(f"# scripts/profile summary ({meta.get('date_utc', '?')}, commit {meta.get('commit', '?')}, "
          f"kernel {meta.get('kernel', '?')}, {meta.get('perf', '?')}, sampling {meta.get('freq', '?')} Hz)\n")
    for wl in WORKLOADS:
        rs = [runs[f"{t}-{wl}"] for t in TARGETS if f"{t}-{wl}" in runs]
        if not rs:
            continue
        u = UNIT[wl]
        print(f"## {wl}: per {u} ({rs[0].rate:.0f} {u}s/s, window {rs[0].window:.0f} s)\n")
        print("Counting run (syscall tracepoints on) and sampling run (perf record -a -g) are two generator runs "
              "against the same router; syscalls come from the first, CPU and context switches from the second.\n")
        if wl == "wrk":
            print("wrk is a closed loop: its rate moves within a run. Syscalls and the router's CPU are per request "
                  "counted at the echo backend in the counting run's window; the sampled columns divide by wrk's "
                  "average rate (proportions only).\n")
        print("| target | load (1-min) start→end | achieved/s | p50/p99 µs | errors | router µs CPU | router syscalls | router ctx sw | "
              "echo µs | generator µs | sampled: router | echo | generator | kernel threads | softirq in idle | ours total | /proc/stat machine busy µs (noisy) |")
        print("|---" * 17 + "|")
        for r in rs:
            j, c = r.js, r.js.get("latency_us", {}).get("corrected", {})
            kt = sum(v for g, v in r.groups.items() if g.startswith("kernel threads"))
            si = r.groups.get("softirq/kernel in idle", 0)
            print(f"| {r.target} | {r.env['loadavg_start'].split()[0]}→{r.env.get('loadavg_end', '? ').split()[0]} | "
                  f"{achieved(r)} | "
                  f"{c.get('p50', '–')}/{c.get('p99', '–')} | {j.get('total_errors', '?')} | "
                  f"{fmt(r.router_us()) if r.router else '–'} | "
                  f"{fmt(r.cper(r.c_router.get('raw_syscalls:sys_enter', 0)), 2) if r.router else '–'} | "
                  f"{fmt(r.stat_per('router', 'context-switches'), 2) if r.router else '–'} | "
                  f"{fmt(r.stat_per('echo', 'task-clock', 1e3))} | {fmt(r.stat_per('lg', 'task-clock', 1e3))} | "
                  f"{fmt(r.us(r.groups.get('router', 0)))} | {fmt(r.us(r.groups.get('echo', 0)))} | "
                  f"{fmt(r.us(r.groups.get('loadgen', 0)))} | {fmt(r.us(kt))} | {fmt(r.us(si))} | {fmt(r.ours_us())} | "
                  f"{fmt(r.machine_busy_s * 1e6 / r.units)} |")
        print()
        # Syscalls per unit: router (echo for direct).
        print(f"### {wl}: syscalls per {u} (router; for direct the echo backend and the generator)\n")
        names = collections.Counter()
        for r in rs:
            for k, v in r.syscalls(r.c_router or r.c_echo).items():
                names[k] = max(names[k], v)
            if r.target == "direct":
                for k, v in r.syscalls(r.c_lg).items():
                    names[k] = max(names[k], v)
        keep = [k for k, v in names.most_common() if v >= 0.01]
        print("| syscall | " + " | ".join(("direct echo | direct gen" if r.target == "direct" else r.target) for r in rs) + " |")
        print("|---" * (1 + len(rs) + (1 if any(r.target == "direct" for r in rs) else 0)) + "|")
        for k in keep:
            cells = []
            for r in rs:
                cells.append(fmt(r.syscalls(r.c_router or r.c_echo).get(k), 2))
                if r.target == "direct":
                    cells.append(fmt(r.syscalls(r.c_lg).get(k), 2))
            print(f"| {k} | " + " | ".join(cells) + " |")
        for k in ["recvfrom → EAGAIN", "read → EAGAIN", "splice → EAGAIN", "recvfrom with MSG_PEEK"]:
            if not any(r.c_reads.get(k) for r in rs):
                continue
            cells = []
            for r in rs:
                v = r.c_reads.get(k)
                cells.append(fmt(r.cper(v), 2) if v is not None else "–")
                if r.target == "direct":
                    cells.append("–")
            print(f"| *of which:* {k} | " + " | ".join(cells) + " |")
        print()
        # Threads of the router.
        print(f"### {wl}: router threads (CPU µs and context switches per {u}, from /proc/PID/task)\n")
        for r in rs:
            if not r.th0:
                continue
            agg = collections.defaultdict(lambda: [0, 0, 0])
            for tid, (comm, cpu1, cs1) in r.th1.items():
                comm0, cpu0, cs0 = r.th0.get(tid, (comm, 0, 0))
                a = agg[re.sub(r"-?\d+$", "-N", comm)]
                a[0] += (cpu1 - cpu0) / HZ * 1e6
                a[1] += cs1 - cs0
                a[2] += 1
            cells = ", ".join(f"{c} ×{a[2]}: {r.per(a[0]):.1f} µs / {r.per(a[1]):.2f} cs" for c, a in sorted(agg.items(), key=lambda x: -x[1][0]) if a[0] or a[1])
            print(f"- {r.target}: {cells}")
        print()
        # Where the router's (direct: the echo's) samples go.
        print(f"### {wl}: the router's sampled CPU by group, µs per {u} (direct: the echo backend)\n")
        cats = {}
        for r in rs:
            c = collections.Counter()
            for pid, comm, stack, ns in r.rows:
                if pid == r.focus:
                    c[classify(stack)] += ns
            cats[r.target] = c
        allc = collections.Counter()
        for c in cats.values():
            for k, v in c.items():
                allc[k] = max(allc[k], v)
        print("| group | " + " | ".join(r.target for r in rs) + " |")
        print("|---" * (1 + len(rs)) + "|")
        for k, _ in allc.most_common(25):
            print(f"| {k} | " + " | ".join(fmt(r.us(cats[r.target].get(k, 0)), 2) for r in rs) + " |")
        print("| **total** | " + " | ".join(fmt(r.us(sum(cats[r.target].values())), 2) for r in rs) + " |")
        print()
        print(f"### {wl}: the router's top leaf functions, µs per {u} (direct: the echo backend)\n")
        for r in rs:
            c = collections.Counter()
            for pid, comm, stack, ns in r.rows:
                if pid == r.focus:
                    c[leaf(stack)] += ns
            print(f"- {r.target}: " + "; ".join(f"`{k}` {r.us(v):.2f}" for k, v in c.most_common(14)))
        print()
        # Machine groups, including the kernel threads by name.
        print(f"### {wl}: the whole machine's samples by process group, µs per {u}\n")
        gs = collections.Counter()
        for r in rs:
            for k, v in r.groups.items():
                gs[k] = max(gs[k], v)
        print("| group | " + " | ".join(r.target for r in rs) + " |")
        print("|---" * (1 + len(rs)) + "|")
        for k, _ in gs.most_common():
            print(f"| {k} | " + " | ".join(fmt(r.us(r.groups.get(k, 0)), 2) for r in rs) + " |")
        print()


def callgrind(d, name):
    """Instructions per unit from a callgrind dump (the one callgrind_control -d wrote)."""
    dumps = sorted(glob.glob(f"{d}/{name}.out.*"), key=lambda p: int(p.rsplit(".", 1)[1]) if p.rsplit(".", 1)[1].isdigit() else 0)
    if not dumps:
        return "no dump"
    total = 0
    for ln in open(dumps[-1]):
        if ln.startswith("summary:") or ln.startswith("totals:"):
            total = int(ln.split()[1])
    try:
        js = json.load(open(f"{d}/{name}.json"))
    except (OSError, ValueError):
        return f"{total} Ir (no generator result)"
    units = js["churn"]["completed"] if js.get("churn") else js.get("received", 0)
    per = total / units if units else 0
    with open(f"{d}/{name}.per-unit", "w") as f:
        f.write(f"{total} {units} {per:.0f}\n")
    return f"{total} Ir over {units} units = {per:,.0f} Ir per unit (dump {os.path.basename(dumps[-1])})"


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "fold":
        fold(sys.stdin)
    elif len(sys.argv) == 4 and sys.argv[1] == "line":
        r = Run(sys.argv[2], sys.argv[3])
        print(r.line() if r.ok else "no results")
    elif len(sys.argv) == 4 and sys.argv[1] == "callgrind":
        print(callgrind(sys.argv[2], sys.argv[3]))
    elif len(sys.argv) == 2:
        summary(sys.argv[1])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
