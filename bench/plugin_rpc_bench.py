#!/usr/bin/env python3
"""The plugin server alone, driven over its socket as Kong drives it: requests per second, and
the server's own CPU per request, for a push (HandleEvent + 2 Steps), a read (HandleEvent + 1
Step) and a rejected push (HandleEvent + exit), with 1 and 4 concurrent clients (Kong's workers).

Servers: `pgwshard-plugin`, and for comparison the same plugin under kong-pdk's stock dedicated
server in its gevent and threads modes. The clients are Python on the same box, so req/s is
bounded by them too; the CPU per request is the server's cost.

usage: python bench/plugin_rpc_bench.py [--requests 5000]
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from kong_plugin_pgwshard.harness.kong_rpc import KongRPC, Request, run_access
from kong_plugin_pgwshard.harness.processes import PluginServer, cpu_seconds

CASES = {"push": "/metrics/job/x/instance/i1", "read": "/metrics", "rejected": "/metrics/job/x/odd"}
STOCK = ("from kong_pdk.cli import start_dedicated_server; from kong_plugin_pgwshard.plugin import handler as plugin; "
         "start_dedicated_server('pgwshard', plugin.Plugin, plugin.version, plugin.priority, plugin.Schema)")


class StockServer(PluginServer):
    """The plugin under kong-pdk's own dedicated server."""

    def __init__(self, flags: list[str]):
        super().__init__()
        script = Path(self.prefix) / "stock_server.py"  # kong-pdk stats its own script: not -c
        script.write_text(STOCK + "\n")
        self.argv = [sys.executable, str(script), "-p", self.prefix, "--no-lua-style", *flags]
        self.cwd = str(REPO)


def drive(socket_path: str, iid: int, path: str, n: int) -> None:
    rpc = KongRPC(socket_path)
    for _ in range(n):
        run_access(rpc, iid, Request(path))
    rpc.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    servers = {"pgwshard-plugin": PluginServer, "kong-pdk gevent": lambda: StockServer(["-g"]),
               "kong-pdk threads": lambda: StockServer([])}
    print(f"{'server':17} {'case':9} {'clients':>7} {'req/s':>8} {'server CPU µs/req':>18}")
    for label, make in servers.items():
        server = make().start()
        try:
            iid = KongRPC(server.socket_path).start_instance("pgwshard", {"nodes": ["10.0.0.1:9091", "10.0.0.2:9091"]})
            for case, path in CASES.items():
                for clients in (1, 4):
                    n = args.requests // clients
                    threads = [threading.Thread(target=drive, args=(server.socket_path, iid, path, n))
                               for _ in range(clients)]
                    cpu_before, start = cpu_seconds(server.proc.pid), time.perf_counter()
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    elapsed, cpu = time.perf_counter() - start, cpu_seconds(server.proc.pid) - cpu_before
                    total = n * clients
                    print(f"{label:17} {case:9} {clients:>7} {total / elapsed:>8.0f} {cpu / total * 1e6:>18.0f}",
                          flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
