#!/usr/bin/env bash
# Alternating A/B rounds of two (or more) corebuf-kv binaries under bench.sh's redis-benchmark
# settings, for changes too small to show in one bench.sh run on a noisy machine.
#
# Each round starts every binary in turn on a fresh data file (1 GiB, 256 MiB cache), runs
# SET, GET (300 000 requests over 100 000 keys) and MSET (30 000), and prints req/s with the
# server's CPU time per request (user + system, from /proc): a second figure to compare, as
# other load on the machine moves req/s and CPU per request differently.
#
# Usage: examples/kv-server/scripts/ab.sh BIN_A BIN_B [BIN ...]
#        (copy the binaries out of target/ first: a build between rounds would change them)
# Environment: ROUNDS (3), SHARDS (1), FSYNC (everysec), PORT (7491),
#              BENCH_DIR (target/kv-ab; a real file system, not tmpfs),
#              SERVER_ARGS (extra corebuf-kv arguments for every binary).
set -euo pipefail
cd "$(dirname "$0")/../../.."

ROUNDS=${ROUNDS:-3}
SHARDS=${SHARDS:-1}
FSYNC=${FSYNC:-everysec}
PORT=${PORT:-7491}
BENCH_DIR=${BENCH_DIR:-target/kv-ab}
[ $# -ge 2 ] || { sed -n '2,15p' "$0" >&2; exit 2; }
for bin in "$@"; do
  [ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 2; }
done
for tool in redis-benchmark redis-cli; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (apt-get install redis-tools)" >&2; exit 2; }
done
mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
TICKS=$(getconf CLK_TCK)

PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true; }
trap cleanup EXIT

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# One redis-benchmark test: prints "req/s server-us-per-request".
measure() { # test requests
  local before after out rps
  before=$(cpu_ticks "$PID")
  out=$(timeout 300 redis-benchmark -p "$PORT" -t "$1" -P 16 -c 50 -n "$2" -r 100000 -q 2>/dev/null |
    tr '\r' '\n' | grep 'requests per second' | tail -1 || true)
  after=$(cpu_ticks "$PID")
  rps=$(sed -nE 's/.*: ([0-9.]+) requests per second.*/\1/p' <<<"$out")
  awk -v r="${rps:-0}" -v t=$((after - before)) -v hz="$TICKS" -v n="$2" \
    'BEGIN { printf "%9.0f %6.2f", r, t / hz / n * 1e6 }'
}

printf '%-24s %5s %-8s %18s %18s %18s\n' binary round fsync "SET req/s (us)" "GET req/s (us)" \
  "MSET req/s (us)"
for round in $(seq "$ROUNDS"); do
  for bin in "$@"; do
    rm -f "$BENCH_DIR/ab.data" "$BENCH_DIR/ab.data.log"
    # shellcheck disable=SC2086
    "$bin" --path "$BENCH_DIR/ab.data" --size 1G --port "$PORT" --shards "$SHARDS" \
      --cache-bytes 256M --fsync "$FSYNC" ${SERVER_ARGS:-} >"$BENCH_DIR/ab.out" 2>"$BENCH_DIR/ab.err" &
    PID=$!
    for _ in $(seq 300); do
      redis-cli -p "$PORT" ping >/dev/null 2>&1 && break
      sleep 0.1
    done
    redis-cli -p "$PORT" ping >/dev/null 2>&1 || { echo "$bin did not answer on $PORT" >&2; exit 1; }
    set=$(measure set 300000)
    get=$(measure get 300000)
    mset=$(measure mset 30000)
    printf '%-24s %5s %-8s %18s %18s %18s\n' "$(basename "$bin")" "$round" "$FSYNC" "$set" "$get" "$mset"
    redis-cli -p "$PORT" shutdown >/dev/null 2>&1 || true
    wait "$PID" 2>/dev/null || true
    PID=""
  done
done
rm -f "$BENCH_DIR/ab.data" "$BENCH_DIR/ab.data.log"
