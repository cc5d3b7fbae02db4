"""Tier reads/s on one Redis server vs a 3-master Redis Cluster, same run, same machine.

    python -m benchmarks.cluster_tiers [--workers 4] [--seconds 5] [--rounds 3] [--keys 20000]
        [--batch 16] [--value-bytes 200] [--out benchmarks/results/cluster_tiers.json]

Starts an embedded redis-server and an embedded 3-master cluster (the same binary; or uses
$REDIS_URL and $REDIS_CLUSTER_URL, a ``redis+cluster://`` URL), fills each with the same keys,
then runs each arm for ``--seconds`` with ``--workers`` processes (each its own client), the
backends alternating round by round (so drift on a shared machine hits both alike). Arms:

- ``tier_mget``: ``RedisTier.get_many`` of ``--batch`` random keys with their expiries (one script
  call, GET and PTTL per key, on a server; one per hash-tag group, pipelined per node, on the
  cluster; the committed results predate the expiries and were one MGET).
- ``tier_lookup``: ``SharedWTinyLFU.lookup``, the RAM tier's get path in ``TieredCache`` (the Lua
  script that reads the values and records the accesses; one call per group on the cluster).
- ``result_get``: ``ResultCache.get`` of one random key over 64 tenants (the exact cache's
  lookup script: the read and the tenant's hit counter).

With ``--one-node-cluster`` (default) a third backend, a 1-master cluster, runs the same arms:
the same cluster client and cluster-mode server with every slot on one node, which separates what
the cluster client costs from what spreading over three masters costs.

Prints, per arm, the median reads/s (keys read, not calls) over the rounds and the p50 call
latency of worker 0, for every backend, and the 3-master/single ratio; the last line is the JSON written to
``--out``. Reads/s on a small shared box are bounded by the clients' CPU as much as by Redis.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ARMS = ("tier_mget", "tier_lookup", "result_get")
TENANTS = 64
META = "bench:cluster_tiers"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--keys", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--value-bytes", type=int, default=200)
    p.add_argument("--one-node-cluster", action=argparse.BooleanOptionalAction, default=True,
                   help="also a 1-master cluster: separates the cluster client's cost from the topology's")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "cluster_tiers.json")
    return p.parse_args(argv)


def tier_keys(n: int) -> list[str]:
    return [f"feat:user:1:{i}" for i in range(n)]


def result_keys(n: int) -> list[str]:
    from caches.result import ResultCache

    cache = ResultCache.__new__(ResultCache)  # key naming only: no client needed
    return [cache.key(tenant=f"t{i % TENANTS}", model="m", version="1", payload=i) for i in range(n)]


def policy_for(tier: Any, n: int, value_bytes: int) -> Any:
    from caches.admission import SharedWTinyLFU, WTinyLFUConfig

    entry = len(tier_keys(1)[0]) + value_bytes
    return SharedWTinyLFU(tier, WTinyLFUConfig(2 * n * entry, entry_bytes=entry), prefix=f"{META}:placement")


def fill(url: str, n: int, value_bytes: int) -> None:
    """The same keys and values on a backend: tier values and exact-cache entries."""
    from caches.redis_client import is_cluster, make_client
    from caches.result import ResultCache
    from caches.tiers.redis import RedisTier

    client = make_client(url, socket_timeout_s=30)
    if is_cluster(client):
        from redis.cluster import RedisCluster

        client.flushdb(target_nodes=RedisCluster.PRIMARIES)
    else:
        client.flushdb()
    tier = RedisTier(url, meta_prefix=META)
    keys = tier_keys(n)
    value = b"v" * value_bytes
    for i in range(0, n, 500):
        tier.put_many({k: value for k in keys[i : i + 500]})
    cache = ResultCache(client, default_ttl_s=3600)
    for k in result_keys(n):
        cache.put(k, value)
    tier.close()
    client.close()


def worker(url: str, arm: str, n: int, batch: int, value_bytes: int, seconds: float, ready: Any, go: Any,
           out: Any) -> None:
    from caches.redis_client import make_client
    from caches.result import ResultCache
    from caches.tiers.base import TierUnavailable
    from caches.tiers.redis import RedisTier

    rng = random.Random(os.getpid())
    tier = RedisTier(url, meta_prefix=META)
    policy = policy_for(tier, n, value_bytes)
    cache = ResultCache(make_client(url))
    tkeys, rkeys = tier_keys(n), result_keys(n)
    if arm == "tier_mget":
        def op() -> int:
            return len(tier.get_many(rng.sample(tkeys, batch)))
    elif arm == "tier_lookup":
        def op() -> int:
            found = policy.lookup(tier, rng.sample(tkeys, batch))
            return len(found or {})
    else:
        def op() -> int:
            return 1 if cache.get(rng.choice(rkeys)) is not None else 0
    op()  # connect and load the scripts before the clock starts
    ready.put(os.getpid())
    go.wait()
    reads, lat = 0, []
    deadline = time.time() + seconds
    errors = 0
    while time.time() < deadline:
        t0 = time.perf_counter()
        try:
            reads += op()
        except TierUnavailable:  # a stalled call (1 s timeout on a loaded box): counted, not fatal
            errors += 1
        lat.append(time.perf_counter() - t0)
    out.put({"reads": reads, "calls": len(lat), "errors": errors,
             "p50_ms": 1000 * statistics.median(lat) if lat else None})


def run_arm(url: str, arm: str, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=worker, args=(url, arm, args.keys, args.batch, args.value_bytes, args.seconds,
                                              ready, go, q)) for _ in range(args.workers)]
    for p in procs:
        p.start()
    for _ in procs:  # every worker connected, scripts loaded: then the clock starts for all
        ready.get(timeout=120)
    go.set()
    rows = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    reads = sum(r["reads"] for r in rows)
    return {"reads_per_s": reads / args.seconds, "calls_per_s": sum(r["calls"] for r in rows) / args.seconds,
            "p50_ms": rows[0]["p50_ms"], "errors": sum(r["errors"] for r in rows)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from caches.redis_server import EmbeddedRedis, EmbeddedRedisCluster, redis_binary
    from caches.tiers.redis import CLUSTER_SHARDS

    with ExitStack() as stack:
        single = os.environ.get("REDIS_URL") or stack.enter_context(EmbeddedRedis()).url
        cluster = os.environ.get("REDIS_CLUSTER_URL") or stack.enter_context(EmbeddedRedisCluster(masters=3)).url
        backends = {"single": single, "cluster": cluster}
        if args.one_node_cluster:  # the cluster client and cluster mode alone, without the topology
            backends["cluster1"] = stack.enter_context(EmbeddedRedisCluster(masters=1)).url
        for url in backends.values():
            fill(url, args.keys, args.value_bytes)
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {a: {b: [] for b in backends} for a in ARMS}
        for r in range(args.rounds):
            order = list(backends) if r % 2 == 0 else list(reversed(backends))  # drift hits all alike
            for arm in ARMS:
                for name in order:
                    row = run_arm(backends[name], arm, args)
                    runs[arm][name].append(row)
                    print(f"round {r + 1} {arm:12s} {name:8s} {row['reads_per_s']:10.0f} reads/s "
                          f"p50 {row['p50_ms']:.3f} ms errors {row['errors']}", file=sys.stderr, flush=True)
    summary: dict[str, Any] = {}
    names = list(runs[ARMS[0]])
    print("\n" + f"{'arm':12s}" + "".join(f" {n + ' reads/s':>17s} {n + ' p50 ms':>16s}" for n in names)
          + "  cluster/single")
    for arm in ARMS:
        med = {b: statistics.median(x["reads_per_s"] for x in runs[arm][b]) for b in names}
        p50 = {b: statistics.median(x["p50_ms"] for x in runs[arm][b]) for b in names}
        row: dict[str, Any] = {}
        for b in names:
            row[f"{b}_reads_per_s"] = round(med[b])
            row[f"{b}_p50_ms"] = round(p50[b], 4)
        row["cluster_over_single"] = round(med["cluster"] / med["single"], 3)
        summary[arm] = row
        print(f"{arm:12s}" + "".join(f" {row[f'{b}_reads_per_s']:17d} {row[f'{b}_p50_ms']:16.3f}" for b in names)
              + f"  {row['cluster_over_single']:14.2f}")
    result = {
        "benchmark": "cluster_tiers", "baseline": "single redis-server, same binary, same run",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "redis_server": redis_binary(), "cluster_masters": 3, "tier_shards": CLUSTER_SHARDS,
        "cpus": os.cpu_count(), "machine": platform.machine(), "summary": summary, "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"summary": summary}))
    return result


if __name__ == "__main__":
    main()
