#!/usr/bin/env python3
"""Ring figures: load spread, movement on membership change, and lookup cost.

usage: python bench/ring_bench.py [--keys 100000]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

from kong_plugin_pgwshard.core.grouping import parse_push_path
from kong_plugin_pgwshard.core.ring import Member, Ring


def members(n: int) -> list[Member]:
    return [Member(f"10.0.{i // 250}.{i % 250 + 1}", 9091) for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=100_000)
    args = parser.parse_args()
    paths = [f"/metrics/job/batch{i % 97}/instance/host-{i}:9100" for i in range(args.keys)]
    keys = [str(parse_push_path(p)) for p in paths]

    print(f"load spread over {args.keys} grouping keys (share of keys per node; ideal = 1/N)")
    for n in (3, 5, 10):
        ring = Ring(members(n))
        load = Counter(ring.owner(k) for k in keys)
        shares = [load[m] / len(keys) for m in ring.members]
        print(f"  N={n:<3} ideal {1 / n:6.2%}  min {min(shares):6.2%}  max {max(shares):6.2%}  "
              f"stdev {statistics.pstdev(shares) * n:6.1%} of ideal")

    print("movement on membership change (ideal = 1/N of keys; between survivors must be 0)")
    for n in (3, 5, 10):
        base = members(n + 1)
        small, big = Ring(base[:n]), Ring(base)
        before = {k: small.owner(k) for k in keys}
        after = {k: big.owner(k) for k in keys}
        moved = sum(before[k] != after[k] for k in keys)
        between_survivors = sum(before[k] != after[k] and after[k] != base[n] for k in keys)
        print(f"  add    {n}->{n + 1}: moved {moved / len(keys):6.2%} (ideal {1 / (n + 1):6.2%}), "
              f"between survivors {between_survivors}")
        removed = Ring(base[1:n])  # remove the first member of `small`
        moved = sum(before[k] != removed.owner(k) for k in keys)
        between_survivors = sum(before[k] != base[0] and before[k] != removed.owner(k) for k in keys)
        print(f"  remove {n}->{n - 1}: moved {moved / len(keys):6.2%} (ideal {1 / n:6.2%}), "
              f"between survivors {between_survivors}")

    ring = Ring(members(10))
    sample = paths[:20_000]
    start = time.perf_counter()
    for p in sample:
        ring.owner(parse_push_path(p))
    per_request = (time.perf_counter() - start) / len(sample)
    start = time.perf_counter()
    for k in keys[:20_000]:
        ring.owner(k)
    per_lookup = (time.perf_counter() - start) / 20_000
    start = time.perf_counter()
    for _ in range(20):
        Ring(members(10))
    build = (time.perf_counter() - start) / 20
    print(f"cost: parse + owner {per_request * 1e6:.1f} µs per request; owner alone {per_lookup * 1e6:.1f} µs; "
          f"ring build (10 nodes) {build * 1e3:.2f} ms, once per membership change")


if __name__ == "__main__":
    main()
