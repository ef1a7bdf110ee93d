#!/usr/bin/env python3
"""Writes src/cmdtable/table.rs, corebuf-kv's command table, from a running Redis 7.0.

The table must say exactly what Redis 7 says about each command corebuf-kv supports (arity,
flags, key positions, key specs, ACL categories, tips, docs), because cluster-aware clients
and redis-cli read it through COMMAND. Rather than copy it by hand, ask Redis itself:

    redis-server --port 17999 --bind 127.0.0.1 --save '' --appendonly no &
    examples/kv-server/scripts/gen-cmdtable.py 17999 > examples/kv-server/src/cmdtable/table.rs
    cargo fmt --all

Needs python3-redis. Only the connection is used (replies are read raw, RESP2). History entries
of the docs are left out; everything else COMMAND INFO / COMMAND DOCS report is kept.
"""
import sys

import redis

# Commands corebuf-kv serves (some arrive with the kv commands work; the table lists them all).
COMMANDS = """GET SET SETNX SETEX PSETEX GETSET GETDEL GETEX MGET MSET MSETNX INCR DECR INCRBY
DECRBY INCRBYFLOAT APPEND STRLEN GETRANGE SUBSTR SETRANGE DEL UNLINK EXISTS TYPE EXPIRE PEXPIRE
EXPIREAT PEXPIREAT EXPIRETIME PEXPIRETIME TTL PTTL PERSIST RENAME RENAMENX KEYS SCAN RANDOMKEY
DBSIZE FLUSHDB FLUSHALL PING ECHO SELECT QUIT CLIENT COMMAND CONFIG INFO TIME SAVE SHUTDOWN HELLO
CLUSTER READONLY READWRITE ASKING""".split()

# The subcommands it serves, per container command.
# (CLIENT SETINFO and NO-TOUCH, which the server accepts, came after Redis 7.0: not listed.)
SUBCOMMANDS = {
    "client": "id info list getname setname no-evict reply",
    "command": "count docs getkeys info list help",
    "config": "get set resetstat rewrite",
    "cluster": "info myid slots shards nodes keyslot countkeysinslot getkeysinslot help",
}


def pairs(flat):
    return dict(zip(flat[0::2], flat[1::2]))


def dec(x):
    if isinstance(x, bytes):
        return x.decode()
    if isinstance(x, list):
        return [dec(i) for i in x]
    return x


def rs(s):
    """A Rust string literal; long texts are split at spaces with `\\` continuations (which
    drop the line break and the next line's indentation), so rustfmt can indent the table."""
    words = s.replace("\\", "\\\\").replace('"', '\\"').split(" ")
    lines, line = [], ""
    for w in words:
        if line and len(line) + len(w) > 60:
            lines.append(line + " \\")
            line = w
        else:
            line = f"{line} {w}" if line else w
    lines.append(line)
    return '"' + "\n".join(lines) + '"'


def strs(items):
    return "&[" + ", ".join(rs(i) for i in items) + "]"


def arg(a, depth):
    m = pairs(a)
    out = f"Arg::new({rs(m['name'])}, {rs(m['type'])})"
    if "key_spec_index" in m:
        out += f".key_spec({m['key_spec_index']})"
    if "token" in m:
        out += f".token({rs(m['token'])})"
    if "since" in m:
        out += f".since({rs(m['since'])})"
    if "deprecated_since" in m:
        out += f".deprecated_since({rs(m['deprecated_since'])})"
    for flag in m.get("flags", []):
        out += {"optional": ".optional()", "multiple": ".multiple()",
                "multiple_token": ".multiple_token()"}[flag]
    if "arguments" in m:
        out += ".of(&[\n" + ",\n".join(arg(s, depth + 1) for s in m["arguments"]) + ",\n])"
    return out


def key_spec(spec):
    m = pairs(spec)
    begin, find = pairs(m["begin_search"]), pairs(m["find_keys"])
    assert begin["type"] == "index" and find["type"] == "range", m
    b, f = pairs(begin["spec"]), pairs(find["spec"])
    return (f"KeySpec {{\nnotes: {rs(m.get('notes', ''))},\nflags: {strs(m['flags'])},\n"
            f"begin_index: {b['index']},\nlast_key: {f['lastkey']},\nkey_step: {f['keystep']},\n"
            f"limit: {f['limit']},\n}}")


def doc(m):
    fields = [f"summary: {rs(m['summary'])}", f"since: {rs(m['since'])}",
              f"group: {rs(m['group'])}", f"complexity: {rs(m['complexity'])}",
              f"doc_flags: {strs(m.get('doc_flags', []))}",
              f"deprecated_since: {rs(m.get('deprecated_since', ''))}",
              f"replaced_by: {rs(m.get('replaced_by', ''))}",
              "arguments: &[\n" + "".join(arg(a, 0) + ",\n" for a in m.get("arguments", [])) + "]"]
    return "Doc {\n" + ",\n".join(fields) + ",\n}"


def command(info, docs, name):
    e = info[name]
    m = pairs(docs[name])
    subs = ""
    if name.split("|")[0] in SUBCOMMANDS and "|" not in name:
        wanted = SUBCOMMANDS[name].split()
        sub_info = {s[0]: s for s in e[9]}
        sub_docs = pairs(m["subcommands"])
        info.update(sub_info)
        docs.update(sub_docs)
        subs = "".join(command(info, docs, f"{name}|{w}") + ",\n" for w in sorted(wanted))
    specs = "".join(key_spec(s) + ",\n" for s in e[8])
    return (f"Command {{\nname: {rs(name)},\narity: {e[1]},\nflags: {strs(e[2])},\n"
            f"first_key: {e[3]},\nlast_key: {e[4]},\nstep: {e[5]},\n"
            f"acl_categories: {strs(e[6])},\ntips: {strs(e[7])},\n"
            f"key_specs: &[\n{specs}],\n"
            f"subcommands: &[\n{subs}],\ndoc: {doc(m)},\n}}")


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 6379
    conn = redis.Redis(port=port).connection_pool.get_connection("gen")
    names = [n.lower() for n in COMMANDS]
    conn.send_command("COMMAND", "INFO", *names)
    info = {e[0]: e for e in dec(conn.read_response())}
    conn.send_command("COMMAND", "DOCS", *names)
    docs = pairs(dec(conn.read_response()))
    conn.send_command("INFO", "server")
    version = dec(conn.read_response()).split("redis_version:")[1].split()[0]
    print(f"//! Generated by scripts/gen-cmdtable.py from Redis {version}'s COMMAND INFO and")
    print("//! COMMAND DOCS (Redis 7.0 is BSD-3-Clause, Copyright (c) 2006-2020, Salvatore")
    print("//! Sanfilippo); do not edit by hand: change the script's lists and run it again.")
    print()
    print("use super::{Arg, Command, Doc, KeySpec};")
    print()
    print("/// Every command corebuf-kv serves, sorted by name (binary search; a test checks).")
    print("pub static COMMANDS: &[Command] = &[")
    for name in sorted(names):
        print("    " + command(info, docs, name) + ",")
    print("];")


main()
