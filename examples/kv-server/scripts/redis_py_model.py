#!/usr/bin/env python3
"""Random operations through redis-py (python3-redis), every reply checked against a model.

A plain dict is the model; a seeded random sequence of commands goes to the server through
redis-py, and each reply must be what Redis would answer for the model's state. Used by
corebuf-kv's tests (tests/outside_clients.rs) in three modes:

    --mode single      redis.Redis against one node
    --mode cluster     redis.cluster.RedisCluster against a cluster (one seed node given)
    --mode twemproxy   redis.Redis against nutcracker (no multi-key EXISTS there)

    redis_py_model.py --port 7379 --mode single --seed 1 --ops 2000 --commands get,set,del

--commands names the commands to exercise (the server may not serve all the model knows).
Prints one summary line; exits non-zero with the seed, the step and the difference on the
first wrong reply. Works against redis-server too (how the model itself is checked).
"""
import argparse
import random
import sys

import redis
from redis.cluster import RedisCluster

# Everything the model knows; --commands selects from these.
KNOWN = ("get set setnx del exists mget mset incr decr incrby append strlen getset getdel "
         "expire ttl persist").split()


class Mismatch(Exception):
    pass


def check(what, got, want):
    if got != want:
        raise Mismatch(f"{what}: got {got!r}, want {want!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=["single", "cluster", "twemproxy"], default="single")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--keys", type=int, default=40)
    ap.add_argument("--commands", default="get,set,del,exists,mget,mset")
    args = ap.parse_args()
    commands = [c for c in args.commands.split(",") if c]
    unknown = [c for c in commands if c not in KNOWN]
    if unknown:
        sys.exit(f"the model does not know {unknown}; it knows {KNOWN}")

    if args.mode == "cluster":
        r = RedisCluster(host=args.host, port=args.port, socket_timeout=30)
    else:
        r = redis.Redis(host=args.host, port=args.port, socket_timeout=30)

    rng = random.Random(args.seed)
    # Keys of this run only (a server may hold keys of earlier runs): the prefix is drawn
    # outside the seeded sequence, which it does not change. In cluster mode some keys share a
    # hash tag so that plain MGET / MSET (one slot) are exercised as well.
    prefix = f"py{args.seed}:{random.SystemRandom().randrange(1 << 30)}:"
    plain = [f"{prefix}k{i}" for i in range(args.keys)]
    tagged = [f"{{{prefix}tag}}k{i}" for i in range(args.keys // 4)]
    keys = plain + tagged
    model = {}  # key -> bytes
    ttl = set()  # keys with an expiry (far in the future: the test never waits for one)
    counts = {c: 0 for c in commands}

    def value():
        if rng.random() < 0.3:
            return str(rng.randrange(-1000, 1000)).encode()
        return rng.randbytes(rng.choice([0, 1, 10, 100, 3000])).replace(b"\r", b"r")

    def key_group(n):
        """Several keys, and whether they share a slot: in cluster mode either spread
        (redis-py's *_nonatomic split them by slot) or all tagged (one command)."""
        one_slot = rng.random() < 0.5
        pool = tagged if one_slot else keys
        return [rng.choice(pool) for _ in range(n)], one_slot

    def as_int(v):
        try:
            n = int(v)
        except ValueError:
            return None
        return n if str(n).encode() == v and -(1 << 63) <= n < (1 << 63) else None

    for step in range(args.ops):
        cmd = rng.choice(commands)
        counts[cmd] += 1
        k = rng.choice(keys)
        try:
            if cmd == "get":
                check(f"GET {k}", r.get(k), model.get(k))
            elif cmd == "set":
                v, cond = value(), rng.choice([None, None, "nx", "xx"])
                ok = {"nx": k not in model, "xx": k in model, None: True}[cond]
                got = r.set(k, v, nx=cond == "nx", xx=cond == "xx")
                check(f"SET {k} {cond}", got, True if ok else None)
                if ok:
                    model[k] = v
                    ttl.discard(k)
            elif cmd == "setnx":
                v = value()
                check(f"SETNX {k}", r.setnx(k, v), k not in model)
                model.setdefault(k, v)
            elif cmd == "del":
                ks, _ = key_group(rng.randint(1, 4))
                check(f"DEL {ks}", r.delete(*ks), len(set(ks) & model.keys()))
                for x in ks:
                    model.pop(x, None)
                    ttl.discard(x)
            elif cmd == "exists":
                ks = [k] if args.mode == "twemproxy" else key_group(rng.randint(1, 4))[0]
                check(f"EXISTS {ks}", r.exists(*ks), sum(x in model for x in ks))
            elif cmd == "mget":
                ks, one_slot = key_group(rng.randint(1, 6))
                if args.mode == "cluster" and not one_slot:
                    got = r.mget_nonatomic(ks)
                else:
                    got = r.mget(ks)
                check(f"MGET {ks}", got, [model.get(x) for x in ks])
            elif cmd == "mset":
                ks, one_slot = key_group(rng.randint(1, 6))
                pairs = {x: value() for x in ks}
                if args.mode == "cluster" and not one_slot:
                    check(f"MSET {ks}", all(r.mset_nonatomic(pairs)), True)
                else:
                    check(f"MSET {ks}", r.mset(pairs), True)
                model.update(pairs)
                ttl.difference_update(pairs)
            elif cmd in ("incr", "decr", "incrby"):
                by = {"incr": 1, "decr": -1, "incrby": rng.randrange(-10**6, 10**6)}[cmd]
                old = as_int(model.get(k, b"0"))
                new = None if old is None else old + by
                if new is None or not -(1 << 63) <= new < (1 << 63):
                    try:
                        got = r.incrby(k, by)
                    except redis.ResponseError as e:
                        check(f"{cmd} {k} error", "not an integer" in str(e) or "overflow" in str(e), True)
                    else:
                        raise Mismatch(f"{cmd.upper()} {k} on {model.get(k)!r}: got {got!r}, want an error")
                else:
                    check(f"{cmd.upper()} {k} {by}", r.incrby(k, by), new)
                    model[k] = str(new).encode()
            elif cmd == "append":
                v = value()
                model[k] = model.get(k, b"") + v
                check(f"APPEND {k}", r.append(k, v), len(model[k]))
            elif cmd == "strlen":
                check(f"STRLEN {k}", r.strlen(k), len(model.get(k, b"")))
            elif cmd == "getset":
                v = value()
                check(f"GETSET {k}", r.getset(k, v), model.get(k))
                model[k] = v
                ttl.discard(k)
            elif cmd == "getdel":
                check(f"GETDEL {k}", r.getdel(k), model.pop(k, None))
                ttl.discard(k)
            elif cmd == "expire":
                check(f"EXPIRE {k}", r.expire(k, 100000), k in model)
                if k in model:
                    ttl.add(k)
            elif cmd == "ttl":
                got = r.ttl(k)
                if k not in model:
                    check(f"TTL {k}", got, -2)
                elif k not in ttl:
                    check(f"TTL {k}", got, -1)
                else:
                    check(f"TTL {k} in (99000, 100000]", 99000 < got <= 100000, True)
            elif cmd == "persist":
                check(f"PERSIST {k}", r.persist(k), k in ttl and k in model)
                ttl.discard(k)
        except Mismatch as e:
            sys.exit(f"seed {args.seed}, step {step}: {e}")
    # The model's final state, read back whole.
    for k in keys:
        if r.get(k) != model.get(k):
            sys.exit(f"seed {args.seed}: final GET {k}: got {r.get(k)!r}, want {model.get(k)!r}")
    done = ", ".join(f"{c} {n}" for c, n in counts.items())
    print(f"redis-py {redis.__version__} {args.mode}: {args.ops} operations checked "
          f"(seed {args.seed}; {done}); {len(model)} keys match the model")


main()
