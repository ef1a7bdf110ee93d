#!/usr/bin/env bash
# Counts the system calls fio's nbd engine makes per I/O (and the server's, and loopback TCP
# segments) during the hot random read of bench.sh, against one server: corebuf or nbdkit.
# It shows where fio's CPU time per I/O goes: how many polls, sends and recvs fio makes per
# I/O against each server.
#
# Usage: examples/nbd-server/scripts/fio-syscalls.sh corebuf|nbdkit
# Environment: RUNTIME (6 s of fio; the count covers 4 s in its middle), PORT (10951),
#              BENCH_DIR (target/nbd-bench, whose disk.img bench.sh writes).
# Needs fio, nbdkit, nbdinfo (scripts/install-clients.sh) and perf (Debian: linux-perf).
# The tracepoints perf counts add some cost to every system call: compare the counts, not
# the IOPS, with bench.sh's.
set -euo pipefail
cd "$(dirname "$0")/../../.."
SERVER=${1:?usage: $0 corebuf|nbdkit}
RUNTIME=${RUNTIME:-6}
PORT=${PORT:-10951}
BENCH_DIR=${BENCH_DIR:-target/nbd-bench}
DATA=$BENCH_DIR/disk.img
for tool in fio nbdkit nbdinfo perf nstat; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (fio/nbdkit/nbdinfo: scripts/install-clients.sh; perf: apt-get install -y linux-perf; nstat: iproute2)" >&2; exit 1; }
done
[ -f "$DATA" ] || { echo "$DATA is missing: run examples/nbd-server/bench.sh once" >&2; exit 1; }
cargo build --release -q -p corebuf-nbd
OUT=$(mktemp -d)
case "$SERVER" in
  corebuf) target/release/corebuf-nbd --path "$DATA" --port "$PORT" --shards 1 --cache-bytes 512M \
    --export-name "" >"$OUT/server.log" 2>&1 & ;;
  nbdkit) nbdkit -f -i 127.0.0.1 -p "$PORT" file "$DATA" >"$OUT/server.log" 2>&1 & ;;
  *) echo "unknown server $SERVER (corebuf or nbdkit)" >&2; exit 1 ;;
esac
SP=$!
trap 'kill $SP 2>/dev/null || true; wait $SP 2>/dev/null || true; rm -rf "$OUT"' EXIT
for _ in $(seq 100); do nbdinfo --size "nbd://127.0.0.1:$PORT" >/dev/null 2>&1 && break; sleep 0.1; done
fio --name=warm --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/" --bs=64k --iodepth=8 --rw=read \
  --size=256M --output-format=terse >/dev/null
nstat -n >/dev/null
fio --name=bench --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/" --bs=4k --iodepth=32 --rw=randread \
  --size=256M --time_based --runtime="$RUNTIME" --randrepeat=0 --output-format=terse \
  --terse-version=3 >"$OUT/fio.out" &
FP=$!
sleep 1
JOB=$(pgrep -n -f "fio --name=bench") # fio's job process, which does the I/O
EVENTS=raw_syscalls:sys_enter,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_enter_poll,syscalls:sys_enter_io_uring_enter
perf stat -x, -e "$EVENTS" -p "$JOB" -o "$OUT/fio.perf" -- sleep 4 &
P1=$!
perf stat -x, -e "$EVENTS" -p "$SP" -o "$OUT/server.perf" -- sleep 4 &
P2=$!
wait $P1 $P2 $FP
nstat >"$OUT/nstat"
IOPS=$(awk -F';' '/^3;/ { print int($8) }' "$OUT/fio.out")
echo "$SERVER: $IOPS IOPS (fio randread 4 KiB QD 32, $RUNTIME s); per I/O:"
for who in fio server; do
  awk -F, -v who="$who" -v i="$IOPS" '$3 ~ /sys_enter/ {
    n = $3; sub(/.*sys_enter_?/, "", n); if (n == "") n = "all"; printf "  %-6s %-14s %.2f\n", who, n, $1 / (i * 4) }' "$OUT/$who.perf"
done
awk -v i="$IOPS" -v r="$RUNTIME" '$1 == "TcpOutSegs" { printf "  loopback TCP segments %.2f\n", $2 / (i * r) }' "$OUT/nstat"
