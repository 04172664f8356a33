"""Tombstone benchmark: DELETE latency through pgwshard-sync's delete API with 100,000 tombstones,
each stored durably (SQLite, WAL, synchronous=FULL) before its 202, and the tombstone check of a
rebalance pass over 10,000 groups.

Prints: the migration of a 100,000-entry JSON tombstone file (the format of earlier releases),
DELETE latency p50/p99/max (sequential, from a client, through the real pgwshard-sync process,
each delete also sent to 3 real pushgateways), bytes the daemon wrote per delete, the durable
write alone, and the time of 10,000 `covers` lookups as the rebalancer makes them, alone and
while deletes run. Prints the machine's load average too: the tails follow it.

    python bench/tombstone_bench.py [--tombstones 100000] [--deletes 2000] [--groups 10000] [--dir DIR]

DIR must be on a disk (not tmpfs) for the fsyncs to mean anything; the default is a temporary
directory under /var/tmp.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

import yaml

from kong_plugin_pgwshard.core.grouping import GroupingKey
from kong_plugin_pgwshard.harness.processes import ManagedProcess, Pushgateway, free_port, wait_until
from kong_plugin_pgwshard.sync.deletes import Tombstones

TTL = 7 * 24 * 3600.0


def key(job: str, n: int) -> GroupingKey:
    return GroupingKey.from_labels({"job": job, "instance": f"host-{n:07d}"})


def delete(port: int, k: GroupingKey) -> float:
    t0 = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{k.path()}", method="DELETE"),
                                timeout=30) as resp:
        assert resp.status == 202, resp.status
    return time.perf_counter() - t0


def wchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tombstones", type=int, default=100_000)
    parser.add_argument("--deletes", type=int, default=2_000)
    parser.add_argument("--groups", type=int, default=10_000)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    work = args.dir or tempfile.mkdtemp(prefix="pgwshard-tombstone-bench-", dir="/var/tmp")
    path = os.path.join(work, "tombstones.json")
    now = time.time()
    # spread over the TTL, as a fleet deleting its groups after every batch run builds them up
    entries = [{"labels": dict(key("batch", n).labels), "deleted_at": now - TTL * n / args.tombstones / 2}
               for n in range(args.tombstones)]
    with open(path, "w") as f:
        json.dump({"tombstones": entries}, f)
    t0 = time.perf_counter()
    Tombstones(path, TTL).close()
    old_size = os.path.getsize(path + ".json-before-sqlite")
    print(f"migration of a JSON file of {args.tombstones:,} tombstones ({old_size / 1e6:.1f} MB): "
          f"{time.perf_counter() - t0:.2f} s; SQLite file {os.path.getsize(path) / 1e6:.1f} MB")

    pgws = [Pushgateway().start() for _ in range(3)]
    port = free_port()
    with open(os.path.join(work, "pgwshard.yml"), "w") as f:
        yaml.safe_dump({"pushgateways": [p.address for p in pgws],
                        "health": {"source": "probes", "probes": {"interval": "1s", "timeout": "1s"}},
                        "file_sd": {"path": os.path.join(work, "sd.json")},
                        "rebalance": {"enabled": False},
                        "metrics": {"listen": "127.0.0.1:0"},
                        "deletes": {"listen": f"127.0.0.1:{port}", "tombstone_file": path}}, f)
    sync = ManagedProcess("pgwshard-sync", [sys.executable, "-m", "kong_plugin_pgwshard.sync.daemon",
                                            "--config", os.path.join(work, "pgwshard.yml")]).start()
    try:
        def up() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/-/healthy", timeout=1).status == 200
            except OSError:
                return False
        wait_until(up, 60, what="the delete API")
        assert sync.proc is not None
        for n in range(50):  # warm up: connections, SQLite's page cache
            delete(port, key("warm", n))
        before = wchar(sync.proc.pid)
        latencies = [delete(port, key("fresh", n)) for n in range(args.deletes)]
        written = wchar(sync.proc.pid) - before
        print(f"DELETE through pgwshard-sync at {args.tombstones:,} tombstones, {args.deletes} sequential, "
              f"each fsynced before its 202 and sent to 3 pushgateways: p50 {statistics.median(latencies) * 1e3:.1f} ms, "
              f"p99 {pct(latencies, 0.99) * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms; "
              f"{written / args.deletes / 1024:.1f} KiB written per delete")
    finally:
        sync.stop()
        for pgw in pgws:
            pgw.stop()

    # The durable write alone (what a DELETE costs before it reaches any pushgateway).
    store = Tombstones(path, TTL)
    alone_writes = []
    for n in range(args.deletes):
        t0 = time.perf_counter()
        store.record(key("alone", n))
        alone_writes.append(time.perf_counter() - t0)
    print(f"the tombstone write alone (commit + fsync of the write-ahead log), {args.deletes} in a row: "
          f"p50 {statistics.median(alone_writes) * 1e3:.2f} ms, p99 {pct(alone_writes, 0.99) * 1e3:.2f} ms, "
          f"max {max(alone_writes) * 1e3:.1f} ms")

    # The rebalancer's check: covers(key, pushed_at) per copy, in its own thread of the daemon.
    groups = [key("batch", n * 13) for n in range(args.groups)]  # most covered, some not
    t0 = time.perf_counter()
    covered = sum(store.covers(k, now - TTL) for k in groups)
    alone = time.perf_counter() - t0
    stop = threading.Event()

    def deleting() -> None:
        n = 0
        while not stop.is_set():
            store.record(key("during", n))
            n += 1

    thread = threading.Thread(target=deleting)
    thread.start()
    try:
        t0 = time.perf_counter()
        sum(store.covers(k, now - TTL) for k in groups)
        during = time.perf_counter() - t0
    finally:
        stop.set()
        thread.join()
    print(f"tombstone check of a rebalance pass, {args.groups:,} groups ({covered:,} covered) at "
          f"{len(store):,} tombstones: {alone * 1e3:.0f} ms alone, {during * 1e3:.0f} ms while deletes are recorded")
    store.close()
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
