#!/usr/bin/env python3
"""What the plugin's change checks cost: the plugin server following a Kong Status API (a small
stand-in serving /status with a configuration hash and the upstream's targets), with the
checks every `watch_interval` 0.1 s (the default) and without them (`watch_interval` not below
`refresh_interval`). Prints the server's idle CPU, and pushes per second and the server's CPU
per push driven over its socket as Kong drives it (1 and 4 clients).

usage: python bench/membership_watch_bench.py [--requests 5000] [--idle-seconds 10]
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kong_plugin_pgwshard.harness.kong_rpc import KongRPC, Request, run_access
from kong_plugin_pgwshard.harness.processes import PluginServer, cpu_seconds

TARGETS = {"data": [{"target": f"10.0.0.{i}:9091", "weight": 100} for i in range(1, 4)], "next": None}


class StatusAPI(BaseHTTPRequestHandler):
    """Kong's Status API as far as the plugin reads it (kong/status/init.lua)."""

    requests = 0

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        StatusAPI.requests += 1
        path = self.path.split("?")[0]
        body = {"configuration_hash": "5f8e0c2b0a7e4d1c9b3a2f1e0d9c8b7a"} if path == "/status" else TARGETS
        raw = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


def drive(socket_path: str, iid: int, n: int) -> None:
    rpc = KongRPC(socket_path)
    for _ in range(n):
        run_access(rpc, iid, Request("/metrics/job/x/instance/i1"))
    rpc.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    args = parser.parse_args()
    api = ThreadingHTTPServer(("127.0.0.1", 0), StatusAPI)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{api.server_address[1]}"
    print(f"{'checks':22} {'idle CPU %':>10} {'/status reads/s':>15} {'clients':>7} {'req/s':>8} {'server CPU µs/push':>19}")
    try:
        for label, watch in (("every 0.1 s (default)", 0.1), ("none", 2.0)):
            server = PluginServer().start()
            try:
                iid = KongRPC(server.socket_path).start_instance("pgwshard", {
                    "membership": "upstream", "upstream": "pushgateways", "admin_url": url,
                    "refresh_interval": 2, "watch_interval": watch})
                assert server.proc is not None
                reads, cpu = StatusAPI.requests, cpu_seconds(server.proc.pid)
                time.sleep(args.idle_seconds)  # the measured quiet window itself
                idle = (cpu_seconds(server.proc.pid) - cpu) / args.idle_seconds * 100
                rate = (StatusAPI.requests - reads) / args.idle_seconds
                for clients in (1, 4):
                    n = args.requests // clients
                    threads = [threading.Thread(target=drive, args=(server.socket_path, iid, n)) for _ in range(clients)]
                    cpu, start = cpu_seconds(server.proc.pid), time.perf_counter()
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    elapsed, used = time.perf_counter() - start, cpu_seconds(server.proc.pid) - cpu
                    print(f"{label:22} {idle:>10.2f} {rate:>15.1f} {clients:>7} {n * clients / elapsed:>8.0f} "
                          f"{used / (n * clients) * 1e6:>19.0f}", flush=True)
            finally:
                server.stop()
    finally:
        api.shutdown()


if __name__ == "__main__":
    main()
