#!/usr/bin/env python3
"""The plugin server alone, driven over its socket as Kong drives it: requests per second and
latency per request for a push (HandleEvent + 2 Steps), a read (HandleEvent + 1 Step) and a
rejected push (HandleEvent + exit), in gevent and threads mode, with 1 and 4 concurrent clients
(Kong's workers). Pick the kong.conf start mode from these figures.

usage: python bench/plugin_rpc_bench.py [--requests 5000]
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.kong_rpc import KongRPC, Request, run_access  # noqa: E402
from tests.support.processes import PluginServer  # noqa: E402

CASES = {"push": "/metrics/job/x/instance/i1", "read": "/metrics", "rejected": "/metrics/job/x/odd"}


def drive(socket_path: str, iid: int, path: str, n: int) -> None:
    rpc = KongRPC(socket_path)
    for _ in range(n):
        run_access(rpc, iid, Request(path))
    rpc.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    print(f"{'mode':8} {'case':9} {'clients':>7} {'req/s':>8} {'µs/req':>8}")
    for mode in ("gevent", "threads"):
        server = PluginServer(mode).start()
        try:
            iid = KongRPC(server.socket_path).start_instance("pgwshard", {"nodes": ["10.0.0.1:9091", "10.0.0.2:9091"]})
            for case, path in CASES.items():
                for clients in (1, 4):
                    n = args.requests // clients
                    threads = [threading.Thread(target=drive, args=(server.socket_path, iid, path, n))
                               for _ in range(clients)]
                    start = time.perf_counter()
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    elapsed = time.perf_counter() - start
                    total = n * clients
                    print(f"{mode:8} {case:9} {clients:>7} {total / elapsed:>8.0f} {elapsed / total * 1e6 * clients:>8.0f}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
