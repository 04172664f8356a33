"""Rebalance benchmark: 10,000 groups over 4 real pushgateways, then one more joins (4 -> 5).

Prints: preload time, groups moved, seconds to converge, duplicates left (must be 0), and the
throughput of live pushes (routed by the new ring) before and during the rebalance.

    python bench/rebalance_bench.py [--groups 10000] [--max-ops 50]

Instances are realistic (consistency check on, as shipped), so the preload is a PUT per group
with a few concurrent clients; it is timed and printed too.
"""
from __future__ import annotations

import argparse
import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from kong_plugin_pgwshard.clients.pushgateway import PushgatewayClient
from kong_plugin_pgwshard.core.grouping import GroupingKey
from kong_plugin_pgwshard.core.ring import Member, Ring
from kong_plugin_pgwshard.harness.processes import Pushgateway
from kong_plugin_pgwshard.rebalance.rebalancer import Rebalancer


def body(n: int) -> str:
    return (f"# TYPE batch_records_total counter\nbatch_records_total {n}\n"
            f"# TYPE batch_last_success_seconds gauge\nbatch_last_success_seconds {1.7e9 + n}\n")


def live_pusher(addresses: list[str], stop, pushed, failed) -> None:
    """Push live groups in a loop, routed by the new ring, counting successes.

    Runs in its own process so the rebalancer's JSON parsing does not steal its GIL."""
    ring = Ring(Member.parse(a) for a in addresses)
    keys = [GroupingKey.from_labels({"job": "live", "instance": f"l{n}"}) for n in range(20)]
    n = 0
    while not stop.is_set():
        key = keys[n % len(keys)]
        try:
            PushgatewayClient(ring.owner(key).name, timeout=10).put_group(key, body(n))
            with pushed.get_lock():
                pushed.value += 1
        except Exception:  # noqa: BLE001 - a failed live push is counted, not fatal
            with failed.get_lock():
                failed.value += 1
        n += 1


def measure(window: float, pushed) -> float:
    start, t0 = pushed.value, time.monotonic()
    time.sleep(window)
    return (pushed.value - start) / (time.monotonic() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=10_000)
    parser.add_argument("--max-ops", type=float, default=50.0, help="rebalancer max_ops_per_second")
    parser.add_argument("--concurrency", type=int, default=8, help="preload clients")
    parser.add_argument("--live-clients", type=int, default=2)
    args = parser.parse_args()

    pgws = [Pushgateway() for _ in range(5)]
    stop = multiprocessing.Event()
    pushers: list[multiprocessing.Process] = []
    try:
        for pgw in pgws:
            pgw.start()
        members = [Member.parse(p.address) for p in pgws]
        ring4, ring5 = Ring(members[:4]), Ring(members)
        keys = [GroupingKey.from_labels({"job": "bench", "instance": f"host-{n:05d}"}) for n in range(args.groups)]

        t0 = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(lambda k: PushgatewayClient(ring4.owner(k).name, timeout=30).put_group(k, body(1)), keys))
        preload = time.monotonic() - t0
        print(f"preload: {args.groups} groups over 4 instances by PUT, {args.concurrency} clients: "
              f"{preload:.1f} s ({args.groups / preload:.0f} groups/s)")

        # The 5th instance joins: from now on live pushes follow the new ring, as the plugin would.
        pushed, failed = multiprocessing.Value("l", 0), multiprocessing.Value("l", 0)
        for _ in range(args.live_clients):
            proc = multiprocessing.Process(target=live_pusher, daemon=True,
                                           args=([m.name for m in members], stop, pushed, failed))
            proc.start()
            pushers.append(proc)
        before = measure(5.0, pushed)

        expected = sum(1 for k in keys if ring4.owner(k) != ring5.owner(k))
        rebalancer = Rebalancer(max_ops_per_second=args.max_ops, timeout=30)
        during_counts: list[float] = []
        sampler_stop = threading.Event()

        def sample() -> None:
            while not sampler_stop.is_set():
                during_counts.append(measure(2.0, pushed))

        sampler = threading.Thread(target=sample, daemon=True)
        t0 = time.monotonic()
        sampler.start()
        report = rebalancer.reconcile(ring5, [m.name for m in members])
        passes = 1
        while rebalancer.plan(ring5, [m.name for m in members]) and passes < 3:
            report = rebalancer.reconcile(ring5, [m.name for m in members])
            passes += 1
        converge = time.monotonic() - t0
        sampler_stop.set()
        sampler.join()
        stop.set()

        holders: dict[GroupingKey, list[str]] = {}
        for pgw in pgws:
            for group in PushgatewayClient(pgw.address, timeout=30).groups():
                holders.setdefault(group.key, []).append(pgw.address)
        duplicates = sum(1 for where in holders.values() if len(where) > 1)
        misplaced = sum(1 for k, where in holders.items() if ring5.owner(k).name not in where)
        missing = sum(1 for k in keys if k not in holders)
        during = sum(during_counts) / len(during_counts) if during_counts else float("nan")

        print(f"groups moved on 4 -> 5: {report.moved if passes == 1 else 'see passes'} "
              f"(ring predicts {expected}); passes: {passes}; failed: {report.failed}")
        print(f"seconds to converge: {converge:.1f} (max_ops_per_second={args.max_ops:g}); "
              f"longest owner re-check to PUT end: {report.window_seconds * 1000:.0f} ms")
        print(f"duplicates left: {duplicates}; not on owner: {misplaced}; missing: {missing}")
        print(f"live pushes/s: before {before:.0f}, during rebalance {during:.0f} "
              f"({during / before:.0%} of before); live push errors: {failed.value}")
    finally:
        stop.set()
        for proc in pushers:
            proc.join(15)
            if proc.is_alive():
                proc.kill()
        for pgw in pgws:
            pgw.stop()


if __name__ == "__main__":
    main()
