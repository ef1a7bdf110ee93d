#!/usr/bin/env bash
# fio's nbd engine (4 KiB, QD 32, one connection) against corebuf-nbd, qemu-nbd and nbdkit's
# file plugin, on the same data file, interleaved in the same run:
#   hot-read     random reads, working set (256 MiB) in cache: corebuf --cache-bytes 512M,
#                qemu-nbd in its default page-cache mode (cache=writeback), nbdkit file (default)
#   cold-read    random reads over the whole 1 GiB file = 8 x corebuf's 128 MiB cache, against
#                qemu-nbd --cache=none (O_DIRECT) and nbdkit file cache=none; the file's page
#                cache is dropped before each peer run
#   write-flush  random writes over 256 MiB with a flush (NBD_CMD_FLUSH) every 1000 writes;
#                peers in their default page-cache modes, corebuf --cache-bytes 512M
# Each scenario runs ROUNDS times; each round runs the three servers back to back (in an order
# that rotates) and computes corebuf / (the better peer). The table shows the median IOPS, the
# median ratio, each server's CPU time per I/O (less sensitive to other load on the machine
# than IOPS are) and fio's own CPU time per I/O against each server (fio runs on one of the
# two cores: when its CPU time per I/O times the IOPS nears one second per second, fio is the
# bottleneck).
# TRANSPORT=unix runs every server on a Unix-domain socket instead of loopback TCP (corebuf
# --unix, qemu-nbd -k, nbdkit -U; fio's URI nbd+unix://), same file and settings otherwise.
# Loopback only; every server it starts is stopped on exit.
#
# Usage: examples/nbd-server/bench.sh           (from anywhere in the repository)
# Environment: ROUNDS (3), RUNTIME seconds per measurement (10), SHARDS for corebuf-nbd (1:
#              fio's nbd engine needs the other core of this 2-core machine), SPIN_US
#              (corebuf's spin before parking, 0), BENCH_DIR (target/nbd-bench; a real file
#              system, not tmpfs), SCENARIOS ("hot-read cold-read write-flush"), PORT (10941),
#              TRANSPORT (tcp or unix; tcp).
set -euo pipefail
cd "$(dirname "$0")/../.."

ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-10}
SHARDS=${SHARDS:-1}
SPIN_US=${SPIN_US:-0}
BENCH_DIR=${BENCH_DIR:-target/nbd-bench}
SCENARIOS=${SCENARIOS:-"hot-read cold-read write-flush"}
PORT=${PORT:-10941}
TRANSPORT=${TRANSPORT:-tcp}
case "$TRANSPORT" in
  tcp | unix) ;;
  *) echo "TRANSPORT must be tcp or unix, not $TRANSPORT" >&2; exit 2 ;;
esac
FILE_SIZE=$((1 << 30))

say() { printf '==> %s\n' "$*" >&2; }

for tool in fio qemu-nbd nbdkit nbdinfo; do
  if ! command -v "$tool" >/dev/null; then
    echo "$tool is missing: run examples/nbd-server/scripts/install-clients.sh as root" >&2
    exit 1
  fi
done
say "building corebuf-nbd (release)"
cargo build --release -q -p corebuf-nbd
BIN=$PWD/target/release/corebuf-nbd
mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
DATA=$BENCH_DIR/disk.img
SOCKET=$BENCH_DIR/nbd.sock
if [ "$TRANSPORT" = unix ]; then
  URI="nbd+unix:///?socket=$SOCKET"
else
  URI="nbd://127.0.0.1:$PORT/"
fi
if [ "$(stat -c %s "$DATA" 2>/dev/null || echo 0)" != "$FILE_SIZE" ]; then
  say "writing a 1 GiB data file of random bytes (every block allocated, no holes)"
  head -c "$FILE_SIZE" /dev/urandom >"$DATA.tmp" && sync "$DATA.tmp" && mv "$DATA.tmp" "$DATA"
fi

SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
}
trap stop_server EXIT

wait_port() {
  for _ in $(seq 300); do
    nbdinfo --size "$URI" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "no NBD server answers at $URI" >&2
  return 1
}

drop_page_cache() { dd if="$DATA" iflag=nocache count=0 status=none; }

start_server() { # server scenario
  local cache_bytes=512M
  [ "$2" = cold-read ] && cache_bytes=128M
  local corebuf_at=(--port "$PORT") qemu_at=(-b 127.0.0.1 -p "$PORT")
  local nbdkit_at=(-i 127.0.0.1 -p "$PORT")
  if [ "$TRANSPORT" = unix ]; then
    rm -f "$SOCKET"
    corebuf_at=(--unix "$SOCKET") qemu_at=(-k "$SOCKET") nbdkit_at=(-U "$SOCKET")
  fi
  case "$1" in
    corebuf)
      "$BIN" --path "$DATA" "${corebuf_at[@]}" --shards "$SHARDS" --spin-us "$SPIN_US" \
        --cache-bytes "$cache_bytes" --export-name "" >"$BENCH_DIR/corebuf.log" 2>&1 &
      ;;
    qemu-nbd)
      local cache=writeback
      [ "$2" = cold-read ] && cache=none
      qemu-nbd -f raw "${qemu_at[@]}" -x '' -t --cache="$cache" "$DATA" \
        >"$BENCH_DIR/qemu-nbd.log" 2>&1 &
      ;;
    nbdkit)
      local cache=default
      [ "$2" = cold-read ] && cache=none
      nbdkit -f "${nbdkit_at[@]}" file "$DATA" cache="$cache" \
        >"$BENCH_DIR/nbdkit.log" 2>&1 &
      ;;
  esac
  SERVER_PID=$!
  wait_port
}

fio_iops() { # rw size [extra fio args...] -> IOPS (read for reads, write for writes); fio's
  # own CPU seconds (user + system) go to $BENCH_DIR/fio.cpu
  local rw=$1 size=$2
  shift 2
  local field=8
  [ "$rw" = randwrite ] && field=49
  local TIMEFORMAT='%U %S'
  { time fio --name=bench --ioengine=nbd --uri="$URI" --bs=4k --iodepth=32 \
    --rw="$rw" --size="$size" --time_based --runtime="$RUNTIME" --randrepeat=0 \
    --output-format=terse --terse-version=3 "$@" >"$BENCH_DIR/fio.out" 2>"$BENCH_DIR/fio.err"; } \
    2>"$BENCH_DIR/fio.time"
  awk '{ print $1 + $2 }' "$BENCH_DIR/fio.time" >"$BENCH_DIR/fio.cpu"
  awk -F';' -v f=$field '/^3;/ { print int($f) }' "$BENCH_DIR/fio.out"
}

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; } # utime + stime, in clock ticks

measure() { # server scenario -> "IOPS server-CPU-us-per-I/O fio-CPU-us-per-I/O"
  local server=$1 scenario=$2
  [ "$scenario" = cold-read ] && drop_page_cache
  start_server "$server" "$scenario"
  local iops ticks
  case "$scenario" in
    hot-read)
      # Warm up: read the working set once (the peers' page cache and corebuf's cache).
      fio --name=warm --ioengine=nbd --uri="$URI" --bs=64k --iodepth=8 \
        --rw=read --size=256M --output-format=terse >/dev/null
      ticks=$(cpu_ticks "$SERVER_PID")
      iops=$(fio_iops randread 256M)
      ;;
    cold-read)
      ticks=$(cpu_ticks "$SERVER_PID")
      iops=$(fio_iops randread 1G)
      ;;
    write-flush)
      ticks=$(cpu_ticks "$SERVER_PID")
      iops=$(fio_iops randwrite 256M --fsync=1000)
      ;;
  esac
  ticks=$(($(cpu_ticks "$SERVER_PID") - ticks))
  stop_server
  # The server's CPU time (user + system) per I/O, over the measured run (fio's setup and
  # teardown included, so a slight overestimate for every server alike), and fio's own: the
  # client shares this machine's two cores, and at QD 32 it can be the bottleneck.
  echo "$iops $(awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" -v i="$iops" -v r="$RUNTIME" \
    'BEGIN { printf "%.1f", (i > 0) ? t / hz * 1e6 / (i * r) : 0 }') $(awk -v i="$iops" \
    -v r="$RUNTIME" '{ printf "%.1f", (i > 0) ? $1 * 1e6 / (i * r) : 0 }' "$BENCH_DIR/fio.cpu")"
}

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

declare -A RESULTS CPU FIOCPU
SERVERS=(corebuf qemu-nbd nbdkit)
for round in $(seq "$ROUNDS"); do
  for scenario in $SCENARIOS; do
    # Rotate the order every round, so that no server always runs first or last.
    for k in 0 1 2; do
      server=${SERVERS[$(((k + round) % 3))]}
      read -r iops cpu fiocpu <<<"$(measure "$server" "$scenario")"
      say "round $round  $scenario  $server: $iops IOPS, $cpu us of server CPU and $fiocpu us of fio CPU per I/O"
      RESULTS[$scenario,$server,$round]=$iops
      CPU[$scenario,$server,$round]=$cpu
      FIOCPU[$scenario,$server,$round]=$fiocpu
    done
  done
done

target() {
  case "$1" in
    hot-read) echo 1.5 ;;
    cold-read) echo 0.9 ;;
    write-flush) echo 1.0 ;;
  esac
}

printf '\nfio nbd engine, 4 KiB, QD 32, over %s, %s s per run, median of %s rounds; corebuf-nbd --shards %s\n' \
  "$TRANSPORT" "$RUNTIME" "$ROUNDS" "$SHARDS"
printf '%-12s %12s %12s %12s %16s %8s %6s\n' scenario corebuf-nbd qemu-nbd nbdkit \
  "ratio vs better" target met
for scenario in $SCENARIOS; do
  ratios=""
  for round in $(seq "$ROUNDS"); do
    c=${RESULTS[$scenario,corebuf,$round]}
    q=${RESULTS[$scenario,qemu-nbd,$round]}
    k=${RESULTS[$scenario,nbdkit,$round]}
    ratios+="$(awk -v c="$c" -v q="$q" -v k="$k" 'BEGIN { b = (q > k) ? q : k; printf "%.3f", (b > 0) ? c / b : 0 }')"$'\n'
  done
  med() { for round in $(seq "$ROUNDS"); do echo "${RESULTS[$scenario,$1,$round]}"; done | median; }
  medcpu() { for round in $(seq "$ROUNDS"); do echo "${CPU[$scenario,$1,$round]}"; done | median; }
  medfio() { for round in $(seq "$ROUNDS"); do echo "${FIOCPU[$scenario,$1,$round]}"; done | median; }
  ratio=$(printf '%s' "$ratios" | median)
  goal=$(target "$scenario")
  met=$(awk -v r="$ratio" -v t="$goal" 'BEGIN { print (r >= t) ? "yes" : "NO" }')
  printf '%-12s %12s %12s %12s %16s %8s %6s\n' "$scenario" "$(med corebuf)" "$(med qemu-nbd)" \
    "$(med nbdkit)" "$ratio" ">= $goal" "$met"
  printf '  per-round ratios: %s\n' "$(printf '%s' "$ratios" | tr '\n' ' ')"
  printf '  server CPU per I/O (median, us): corebuf-nbd %s, qemu-nbd %s, nbdkit %s\n' \
    "$(medcpu corebuf)" "$(medcpu qemu-nbd)" "$(medcpu nbdkit)"
  printf '  fio CPU per I/O against each (median, us): corebuf-nbd %s, qemu-nbd %s, nbdkit %s\n' \
    "$(medfio corebuf)" "$(medfio qemu-nbd)" "$(medfio nbdkit)"
done
