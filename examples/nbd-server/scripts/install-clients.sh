#!/usr/bin/env bash
# Installs the NBD clients corebuf-nbd's integration tests and benchmark drive: fio (with its
# nbd engine), qemu-utils (qemu-img, qemu-io, qemu-nbd), libnbd-bin (nbdinfo, nbdcopy) and
# nbdkit (the file plugin, a peer in the benchmark). Debian / Ubuntu, as root (or via sudo).
# Tests skip with a printed reason where a client is missing, so a failure here is not fatal
# to the gate; it only makes the run weaker.
set -euo pipefail

packages=(fio qemu-utils libnbd-bin nbdkit)
have_all=1
for tool in fio qemu-img qemu-io qemu-nbd nbdinfo nbdcopy nbdkit; do
  command -v "$tool" >/dev/null 2>&1 || have_all=0
done
if [ "$have_all" = 1 ]; then
  echo "install-clients: fio, qemu-utils, libnbd-bin and nbdkit are already installed"
  exit 0
fi

sudo=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install-clients: need root or sudo" >&2; exit 1; }
  sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update
"${sudo[@]}" apt-get install -y --no-install-recommends "${packages[@]}"
echo "install-clients: installed ${packages[*]}"
