#!/usr/bin/env bash
# redis-benchmark against corebuf-kv and redis-server with matching durability:
#   - fsync always:   corebuf-kv --fsync always   vs redis-server --appendonly yes --appendfsync always
#   - fsync everysec: corebuf-kv --fsync everysec vs redis-server --appendonly yes --appendfsync everysec
#   - a data set larger than corebuf-kv's cache (redis keeps it all in memory)
# GET and SET with -P 16 -c 50 (and MSET once). Loopback only; every server it starts is stopped.
#
# Usage: examples/kv-server/bench.sh            (from anywhere in the repository)
# Environment: REQUESTS (default 300000), KEYS (default 100000),
#              SHARDS (default: cores - 1, at least 1: redis-benchmark, one thread, runs on this
#              machine too and needs a core of its own; redis-server is one thread),
#              BENCH_DIR (default target/kv-bench; must be on a real file system, not tmpfs),
#              CORE_PORT / REDIS_PORT (default 7481 / 7482).
set -euo pipefail
cd "$(dirname "$0")/../.."

REQUESTS=${REQUESTS:-300000}
KEYS=${KEYS:-100000}
CORES=$(nproc)
SHARDS=${SHARDS:-$((CORES > 1 ? CORES - 1 : 1))}
BENCH_DIR=${BENCH_DIR:-target/kv-bench}
CORE_PORT=${CORE_PORT:-7481}
REDIS_PORT=${REDIS_PORT:-7482}

say() { printf '\n==> %s\n' "$*" >&2; }

# --- tools -----------------------------------------------------------------------------------
if ! command -v redis-benchmark >/dev/null || ! command -v redis-server >/dev/null; then
  say "installing redis-tools and redis-server"
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-tools redis-server) \
      >/dev/null 2>&1 || true
  fi
fi
if ! command -v redis-benchmark >/dev/null; then
  echo "redis-benchmark is not available (apt-get install redis-tools); skipping the benchmark" >&2
  exit 0
fi
HAVE_REDIS=1
command -v redis-server >/dev/null || { HAVE_REDIS=0; echo "redis-server missing: corebuf-kv only" >&2; }

say "building corebuf-kv (release)"
cargo build --release -q -p corebuf-kv
BIN=target/release/corebuf-kv
mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)

CORE_PID=""
REDIS_PID=""
cleanup() {
  [ -n "$CORE_PID" ] && kill "$CORE_PID" 2>/dev/null && wait "$CORE_PID" 2>/dev/null || true
  [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null && wait "$REDIS_PID" 2>/dev/null || true
}
trap cleanup EXIT

wait_port() { # port
  for _ in $(seq 300); do
    redis-cli -p "$1" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "nothing answers on port $1" >&2
  return 1
}

start_core() { # fsync cache-bytes size
  rm -f "$BENCH_DIR/core.data" "$BENCH_DIR/core.data.log"
  "$BIN" --path "$BENCH_DIR/core.data" --size "$3" --port "$CORE_PORT" --shards "$SHARDS" \
    --cache-bytes "$2" --fsync "$1" >"$BENCH_DIR/core.out" 2>"$BENCH_DIR/core.err" &
  CORE_PID=$!
  wait_port "$CORE_PORT"
}

stop_core() {
  redis-cli -p "$CORE_PORT" shutdown >/dev/null 2>&1 || true
  wait "$CORE_PID" 2>/dev/null || true
  CORE_PID=""
}

start_redis() { # appendfsync
  rm -rf "$BENCH_DIR/redis"
  mkdir -p "$BENCH_DIR/redis"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$BENCH_DIR/redis" --save "" \
    --appendonly yes --appendfsync "$1" --daemonize no >"$BENCH_DIR/redis.log" 2>&1 &
  REDIS_PID=$!
  wait_port "$REDIS_PORT"
}

stop_redis() {
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  wait "$REDIS_PID" 2>/dev/null || true
  REDIS_PID=""
}

RESULTS=()
# run LABEL PORT TESTS [extra redis-benchmark args]: one line per test, "rps p50".
run() {
  local label=$1 port=$2 tests=$3
  shift 3
  local out
  # redis-benchmark spins forever on a server that went away: bounded here.
  out=$(timeout 600 redis-benchmark -p "$port" -t "$tests" -P 16 -c 50 -n "$REQUESTS" -r "$KEYS" -q "$@" 2>/dev/null |
    tr '\r' '\n' | grep 'requests per second' || true)
  while read -r line; do
    [ -z "$line" ] && continue
    local test rps p50
    test=${line%%:*}
    test=${test%% (*}
    rps=$(sed -E 's/.*: ([0-9.]+) requests per second.*/\1/' <<<"$line")
    p50=$(sed -nE 's/.*p50=([0-9.]+) msec.*/\1/p' <<<"$line")
    RESULTS+=("$(printf '%-34s %-6s %12s %9s' "$label" "$test" "$rps" "${p50:--}")")
    printf '%-34s %-6s %12s req/s  p50 %s ms\n' "$label" "$test" "$rps" "${p50:--}" >&2
  done <<<"$out"
}

for fsync in always everysec; do
  say "fsync $fsync: corebuf-kv ($SHARDS shards, 256M cache, 1G file)"
  start_core "$fsync" 256M 1G
  run "corebuf-kv fsync=$fsync" "$CORE_PORT" set,get
  run "corebuf-kv fsync=$fsync" "$CORE_PORT" mset -n $((REQUESTS / 10))
  stop_core
  if [ "$HAVE_REDIS" = 1 ]; then
    say "fsync $fsync: redis-server (appendonly yes, appendfsync $fsync)"
    start_redis "$fsync"
    run "redis appendfsync=$fsync" "$REDIS_PORT" set,get
    run "redis appendfsync=$fsync" "$REDIS_PORT" mset -n $((REQUESTS / 10))
    stop_redis
  fi
done

# A data set several times the cache: 256-byte values over 1M keys (~270 MB) with a 32 MiB cache.
BIG_KEYS=${BIG_KEYS:-1000000}
say "data set larger than the cache: $BIG_KEYS keys x 256 B, corebuf-kv cache 32M, fsync everysec"
start_core everysec 32M 2G
KEYS=$BIG_KEYS run "corebuf-kv 32M cache, 270MB data" "$CORE_PORT" set -n "$BIG_KEYS" -d 256
KEYS=$BIG_KEYS run "corebuf-kv 32M cache, 270MB data" "$CORE_PORT" get -d 256
redis-cli -p "$CORE_PORT" info cache | grep -E 'cache_hit_ratio|device_reads' >&2 || true
stop_core
if [ "$HAVE_REDIS" = 1 ]; then
  start_redis everysec
  KEYS=$BIG_KEYS run "redis (all in memory), 270MB data" "$REDIS_PORT" set -n "$BIG_KEYS" -d 256
  KEYS=$BIG_KEYS run "redis (all in memory), 270MB data" "$REDIS_PORT" get -d 256
  stop_redis
fi

echo
echo "redis-benchmark -P 16 -c 50, $REQUESTS requests over $KEYS keys (unless noted), $SHARDS corebuf shards"
printf '%-34s %-6s %12s %9s\n' "server" "test" "req/s" "p50 ms"
printf '%s\n' "${RESULTS[@]}"
