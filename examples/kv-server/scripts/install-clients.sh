#!/usr/bin/env bash
# Installs the outside Redis clients corebuf-kv's client tests drive: redis-tools (redis-cli,
# redis-benchmark), nutcracker (twemproxy) and python3-redis (redis-py, with RedisCluster).
# Debian / Ubuntu, as root (or via sudo). Tests skip with a printed reason where a client is
# missing, so a failure here is not fatal to the gate; it only makes the run weaker.
set -euo pipefail

packages=(redis-tools nutcracker python3-redis)
have_all=1
for tool in redis-cli redis-benchmark nutcracker; do
  command -v "$tool" >/dev/null 2>&1 || have_all=0
done
# redis-py for Debian's own python3 (a python3 earlier on PATH, pyenv say, may lack it).
/usr/bin/python3 -c 'import redis.cluster' >/dev/null 2>&1 || have_all=0
if [ "$have_all" = 1 ]; then
  echo "install-clients: redis-tools, nutcracker and python3-redis are already installed"
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
