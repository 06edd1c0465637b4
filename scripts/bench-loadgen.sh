#!/usr/bin/env bash
# Bounded loopback measurements of upsplice-loadgen itself (see docs/benchmarks-loadgen.md).
# Usage: scripts/bench-loadgen.sh OUTDIR   (needs a release build; wrk optional)
# The echo server runs on CPU 1 and the generator on CPU 0 (taskset), one thread each;
# PIN=0,1 ECHO_PIN=0,1 lets the kernel place both (better on a machine shared with other work).
set -euo pipefail
out=${1:-out/bench-loadgen}
mkdir -p "$out"
B=${B:-target/release/upsplice-loadgen}

start_echo() { # mode
  taskset -c "${ECHO_PIN:-1}" "$B" echo --listen 127.0.0.1:0 --threads 1 --mode "$1" > "$out/echo.addr" &
  echo_pid=$!
  for _ in $(seq 50); do grep -q listening "$out/echo.addr" 2>/dev/null && break; sleep 0.1; done
  addr=$(awk '{print $3}' "$out/echo.addr")
}
stop_echo() { kill -TERM "$echo_pid"; wait "$echo_pid" || true; }

# gen NAME ARGS...: one generator run; the generator measures the echo server's CPU alongside (--watch-pid).
gen() {
  local name=$1; shift
  taskset -c "${PIN:-0}" timeout 120 "$B" "$@" --watch-pid "$echo_pid" --json "$out/$name.json" > "$out/$name.txt" 2>&1 || true
  python3 - "$out/$name.json" "$name" <<'PY'
import json, sys
s = json.load(open(sys.argv[1])); name = sys.argv[2]
c, u, lag = s["latency_us"]["corrected"], s["latency_us"]["uncorrected"], s["latency_us"]["send_lag"]
echo = s["watch"]["processes"][0]
print(f"{name:18} target {s['target_rate']:>9.0f}/s achieved {s['achieved_rate']:>9.0f}/s reached={s['rate_reached']!s:5} "
      f"corr p50 {c['p50']/1e3:8.3f} p99 {c['p99']/1e3:8.3f} ms | uncorr p50 {u['p50']/1e3:7.3f} p99 {u['p99']/1e3:8.3f} ms | "
      f"lag p99 {lag['p99']/1e3:8.3f} ms | gen cpu {s['cpu']['cores_busy']:.2f} cores | echo cpu {echo['cores_busy']:.2f} cores | "
      f"late {s['sent'] - s['sent_in_window']} unsent {s['unsent']} errors {s['total_errors']} valid={s['valid']}")
PY
}

echo "# load average before: $(cat /proc/loadavg)"
start_echo ws
# Floor: one connection, low rate.
gen floor-ws ws --target "$addr" -c 1 -r 1000 -d 10s -w 2s --size 64 --threads 1
# Ceiling: one generator core, 50 connections, rising rates.
for r in 25000 100000 400000 800000 1600000; do
  gen "ws-$r" ws --target "$addr" -c 50 -r "$r" -d 5s -w 2s --size 64 --threads 1
done
# Threads: the same load from two current-thread runtimes spread over both cores.
PIN=0,1 gen ws-800000-2thr ws --target "$addr" -c 50 -r 800000 -d 5s -w 2s --size 64 --threads 2
# HTTP: wrk's closed-loop maximum, then our open-loop http at that rate.
if command -v wrk > /dev/null; then
  # The echo server's CPU during wrk: an idle `hold` of one connection for
  # the same 10 s watches it (its own cost is one idle socket).
  "$B" hold --target "$addr" -c 1 -d 10s --watch-pid "$echo_pid" --json "$out/wrk-echo.json" > /dev/null 2>&1 &
  watcher=$!
  taskset -c "${PIN:-0}" /usr/bin/time -f "wrk cpu user %U system %S wall %e" \
    wrk -t1 -c50 -d10s --latency "http://$addr/" > "$out/wrk.txt" 2>&1
  wait "$watcher" || true
  echo "wrk                $(grep -E 'Requests/sec' "$out/wrk.txt") | p99 $(awk '$1=="99%"{print $2}' "$out/wrk.txt") | $(grep 'wrk cpu' "$out/wrk.txt") | echo cpu $(python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['watch']['processes'][0]['cores_busy'],2))" "$out/wrk-echo.json") cores"
  wrk_rate=$(awk '/Requests\/sec/{printf "%d", $2}' "$out/wrk.txt")
  gen http-at-wrk-rate http --target "$addr" -c 50 -r "$wrk_rate" -d 10s -w 2s --threads 1
  gen http-80pct-wrk http --target "$addr" -c 50 -r "$(( wrk_rate * 8 / 10 ))" -d 10s -w 2s --threads 1
  gen http-half-wrk http --target "$addr" -c 50 -r "$(( wrk_rate / 2 ))" -d 10s -w 2s --threads 1
fi
stop_echo
start_echo tcp
gen floor-tcp tcp --target "$addr" -c 1 -r 1000 -d 10s -w 2s --size 64 --threads 1
stop_echo
echo "# load average after: $(cat /proc/loadavg)"
