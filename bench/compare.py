#!/usr/bin/env python3
"""Side by side on one box, one load generator (Debian's wrk):

  direct   one pushgateway, no proxy
  native   nginx's own `hash $request_uri consistent` over N pushgateways
  plugin   the pgwshard plugin through the OpenResty host over N pushgateways
  kong     real Kong (DB-less, the shipped kong.conf lines and kong.yml) with the pgwshard plugin
  kong-hash  the same Kong build and config without the plugin: Kong's own `hash_on: path`

for G groups and N shards. Prints pushes/s, p50 and p99, the CPU each push cost the proxy (nginx
workers), the plugin server and the pushgateways, and the ratios the goals
name: plugin / native >= 0.8 (while pushgateways are not the bottleneck), kong / kong-hash (what the
plugin costs inside Kong), and N=4 / direct >= 8
at 4000 groups (each push makes a pushgateway re-check every group it holds, so sharding should
pay more than linearly). On a machine where all of it shares a few cores, the CPU columns say
which part the throughput was spent on.

Groups are preloaded with the consistency check off (fast), then the same pushgateways restart
on their persistence files with the check on, as in production (with --no-consistency-check they
keep it off, so that the front's own cost decides the throughput).

usage: python bench/compare.py [--groups 100,2000,4000,10000] [--shards 1,2,4] [--seconds 10] [--repeat 3]
                               [--modes direct,native,plugin,kong,kong-hash] [--connections 16]
                               [--no-consistency-check] [--kong-membership upstream|static]

The Kong modes need a Kong 3.9 (PGWSHARD_KONG, `kong` on PATH, or .ci/build-kong.sh's build) and,
started as root, a virtualenv of Debian's python3 (Kong's workers and the plugin server they spawn
run as nobody). In them `proxy` is Kong's nginx processes (master's children: its workers).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import os
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from kong_plugin_pgwshard.harness.processes import (
    ManagedProcess,
    Pushgateway,
    child_pids,
    cpu_seconds,
    free_port,
    http_get,
    temp_dir,
    wait_until,
)

BODY = b"# TYPE bench_last_success gauge\nbench_last_success 1\n# TYPE bench_items counter\nbench_items 42\n"
NO_CHECK = ["--push.disable-consistency-check"]


class NativeHashNginx(ManagedProcess):
    """nginx with its own consistent hash on $request_uri: the baseline to beat."""

    def __init__(self, backends: list[str]):
        self.port = free_port()
        self.prefix = temp_dir("pgwshard-nginx-native-")
        servers = "\n".join(f"        server {b} max_fails=0;" for b in backends)
        conf = Path(self.prefix) / "nginx.conf"
        conf.write_text(textwrap.dedent(f"""\
            worker_processes 2;
            pid {self.prefix}/nginx.pid;
            error_log {self.prefix}/error.log warn;
            events {{ worker_connections 1024; }}
            http {{
                access_log off;
                client_body_temp_path {self.prefix}/body;
                proxy_temp_path {self.prefix}/proxy;
                upstream pushgateways {{
                    hash $request_uri consistent;
            {servers}
                    keepalive 64;
                }}
                server {{
                    listen 127.0.0.1:{self.port};
                    location / {{
                        proxy_pass http://pushgateways;
                        proxy_http_version 1.1;
                        proxy_set_header Connection "";
                    }}
                }}
            }}
            """))
        super().__init__("nginx-native", ["nginx", "-p", self.prefix, "-c", str(conf), "-g", "daemon off;"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        super().start()
        wait_until(lambda: http_get(self.url + "/-/healthy")[0] == 200, 10, what="nginx native")
        return self


class KongFront:
    """One DB-less Kong node over the pushgateways, set up as README "Kong topologies" says: the
    shipped kong.conf lines and kong.yml (targets = the pushgateways). With plugin, pgwshard reads
    them from the node's Status API (membership: upstream) or is given them (static); without,
    the same file minus the plugin, so Kong's own `hash_on: path` places every push."""

    def __init__(self, backends: list[str], plugin: bool, membership: str = "upstream"):
        import yaml

        from kong_plugin_pgwshard.harness.kong import Kong, shipped_declarative
        work = temp_dir("pgwshard-bench-kong-")
        kong_yml = f"{work}/kong.yml"
        self.kong = Kong({"database": "off", "declarative_config": kong_yml}, REPO / "kong" / "kong.conf",
                         name="bench-kong", admin=False)
        doc = shipped_declarative(REPO / "kong" / "kong.yml", backends, self.kong.status_url)
        for service in doc["services"]:
            if not plugin:
                service.pop("plugins", None)
            elif membership == "static":
                for conf in service.get("plugins", []):
                    conf["config"] = {"membership": "static", "nodes": backends}
        Path(kong_yml).write_text(yaml.safe_dump(doc))
        self.plugin = plugin

    @property
    def url(self) -> str:
        return self.kong.proxy_url

    def start(self):
        self.kong.start()
        if self.plugin:  # Kong answers 500 to a push until the server it spawned has its socket
            wait_until(lambda: os.path.exists(self.kong.socket_path), 30, what="Kong's plugin server socket")
        return self

    def stop(self) -> None:
        self.kong.stop()


def preload(url: str, groups: int) -> float:
    """PUT every group once through the front under test; returns seconds taken."""
    host, port = url.removeprefix("http://").split(":")
    started = time.monotonic()

    def put_range(chunk: range) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        for i in chunk:
            conn.request("PUT", f"/metrics/job/bench/instance/i{i}", BODY)
            resp = conn.getresponse()
            resp.read()
            if resp.status >= 300:
                raise RuntimeError(f"preload push {i}: {resp.status}")
        conn.close()

    step = max(1, groups // 8)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(put_range, [range(i, min(i + step, groups)) for i in range(0, groups, step)]))
    return time.monotonic() - started


def wrk(url: str, groups: int, seconds: int, connections: int) -> dict:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", str(REPO / "bench/push.lua"),
         url, "--", str(groups)],
        capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    m = re.search(r"RESULT requests=(\d+) duration_us=(\d+) errors=(\d+) p50_us=(\d+) p99_us=(\d+) non2xx=(\d+)", out)
    if not m:
        raise RuntimeError(f"wrk printed no RESULT line:\n{out}")
    requests, duration, errors, p50, p99, non2xx = map(int, m.groups())
    return {"requests": requests, "rps": requests / (duration / 1e6), "p50_ms": p50 / 1000, "p99_ms": p99 / 1000,
            "errors": errors + non2xx}


def run_case(mode: str, groups: int, shards: int, seconds: int, connections: int, check: bool = True,
             kong_membership: str = "upstream") -> dict:
    pgws = [Pushgateway(extra_args=NO_CHECK).start() for _ in range(shards)]
    front = None
    try:
        front = start_front(mode, pgws, kong_membership)
        load_s = preload(front.url, groups)
        # Restart each instance on its persisted groups with the consistency check on, as in production.
        for i, pgw in enumerate(pgws if check else ()):
            pgw.stop()
            pgws[i] = Pushgateway(port=pgw.port, data_dir=pgw.data_dir).start()
        held = sum(len(p.groups()) for p in pgws)
        parts = {**front_parts(mode, front), "pgw": [p.proc.pid for p in pgws]}
        before = {part: sum(map(cpu_seconds, pids)) for part, pids in parts.items()}
        result = wrk(front.url, groups, seconds, connections)
        for part, pids in parts.items():  # µs of CPU per push
            result[f"{part}_us"] = (sum(map(cpu_seconds, pids)) - before[part]) / max(1, result["requests"]) * 1e6
        result.update(preload_s=load_s, held=held)
        if isinstance(front, KongFront):  # a push Kong sent on without the plugin still gets a 2xx: its log says
            for line in front.kong.error_lines()[:3]:
                print(f"  kong error.log: {line}", flush=True)
        return result
    finally:
        if front:
            front.stop()
        for pgw in pgws:
            pgw.stop()


def front_parts(mode: str, front) -> dict[str, list[int]]:
    """The front's processes: nginx workers (proxy; Kong's: every child of its master) and, with
    the plugin, the plugin server (Kong's runs under worker 0, not among the master's children)."""
    if mode == "direct":
        return {"proxy": [], "server": []}
    if mode == "native":
        return {"proxy": child_pids(front.proc.pid), "server": []}
    if mode in ("kong", "kong-hash"):
        master = front.kong.master_pid()
        # kong-hash: Kong still spawns the plugin server (same kong.conf), which serves no request
        # there; what it spends is its own start, which short trials would count per push
        server = front.kong.plugin_server_pids() if mode == "kong" else []
        return {"proxy": child_pids(master) if master else [], "server": server}
    return {"proxy": child_pids(front.host.proc.pid), "server": [front.server.proc.pid]}


def start_front(mode: str, pgws: list[Pushgateway], kong_membership: str = "upstream"):
    if mode == "direct":
        return pgws[0]
    if mode == "native":
        return NativeHashNginx([p.address for p in pgws]).start()
    if mode == "plugin":
        from kong_plugin_pgwshard.harness.nginx import PluginHostStack
        return PluginHostStack([p.address for p in pgws]).start()
    if mode in ("kong", "kong-hash"):
        return KongFront([p.address for p in pgws], plugin=mode == "kong", membership=kong_membership).start()
    raise ValueError(mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", default="100,2000,4000,10000")
    parser.add_argument("--shards", default="1,2,4")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--modes", default="direct,native,plugin")
    parser.add_argument("--repeat", type=int, default=3,
                        help="trials per case, interleaved across modes; the figures are their medians")
    parser.add_argument("--no-consistency-check", dest="check", action="store_false",
                        help="measure with the pushgateways' check off (it is on in production): pushes then cost "
                             "them little, and the front's own cost decides the throughput")
    parser.add_argument("--kong-membership", choices=("upstream", "static"), default="upstream",
                        help="kong mode: the plugin reads the upstream's targets from the node's Status API "
                             "(the shipped kong.yml, DB-less) or is given the pushgateways in its config")
    args = parser.parse_args()
    for tool in ("wrk", "nginx", "prometheus-pushgateway"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: apt-get install wrk nginx-light libnginx-mod-http-lua prometheus-pushgateway")
    modes = args.modes.split(",")
    if {"kong", "kong-hash"} & set(modes):
        from kong_plugin_pgwshard.harness.kong import KONG_ENV, kong_binary
        if kong_binary() is None:
            sys.exit(f"no Kong for the kong modes: `bash .ci/build-kong.sh` builds Kong 3.9.3, or set {KONG_ENV} "
                     "to the `kong` of a Kong 3.9 install")
    trials: dict[tuple[int, str, int], list[dict]] = {}
    load_before = os.getloadavg()[0]  # how shared the machine is: say so beside the figures
    print(f"{'groups':>6} {'mode':>7} {'N':>2} {'pushes/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'preload s':>9}"
          f" {'proxy µs':>8} {'server µs':>9} {'pgw µs':>7}   (CPU per push)")
    for groups in map(int, args.groups.split(",")):
        # Interleaved, so that a slow spell of a shared machine does not land on one mode only.
        for _ in range(args.repeat):
            for mode in modes:
                for shards in ([1] if mode == "direct" else map(int, args.shards.split(","))):
                    r = run_case(mode, groups, shards, args.seconds, args.connections, args.check, args.kong_membership)
                    trials.setdefault((groups, mode, shards), []).append(r)
                    print(f"{groups:>6} {mode:>7} {shards:>2} {r['rps']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                          f"{r['errors']:>6} {r['preload_s']:>9.1f} {r['proxy_us']:>8.0f} {r['server_us']:>9.0f} {r['pgw_us']:>7.0f}",
                          flush=True)
    print(f"\nload average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores")
    print(f"medians of {args.repeat} trials, pushgateways' consistency check {'on' if args.check else 'off'} (pushes/s, with the lowest and highest)")
    by = {}
    for (groups, mode, shards), runs in trials.items():
        rates = sorted(r["rps"] for r in runs)
        by[groups, mode, shards] = statistics.median(rates)
        print(f"  G={groups:<6} {mode:>7} N={shards}: {by[groups, mode, shards]:>7.0f}   ({rates[0]:.0f}-{rates[-1]:.0f}), "
              f"p99 {statistics.median(r['p99_ms'] for r in runs):.1f} ms, CPU per push: "
              + ", ".join(f"{label} {statistics.median(r[part + '_us'] for r in runs):.0f} µs" for part, label in
                          (("proxy", "proxy"), ("server", "plugin server"), ("pgw", "pushgateways"))))
    print("\nratios")
    for groups in sorted({g for g, *_ in by}):
        for shards in sorted({n for _, _, n in by}):
            if (groups, "plugin", shards) in by and (groups, "native", shards) in by:
                print(f"  G={groups:<6} N={shards}: plugin/native = {by[groups, 'plugin', shards] / by[groups, 'native', shards]:.2f}"
                      "   (goal >= 0.8 while pushgateways are not the bottleneck)")
            if (groups, "kong", shards) in by and (groups, "kong-hash", shards) in by:
                # each round's two trials ran back to back, so their ratio shares the machine's mood
                paired = sorted(k["rps"] / h["rps"] for k, h in zip(trials[groups, "kong", shards],
                                                                    trials[groups, "kong-hash", shards], strict=True))
                print(f"  G={groups:<6} N={shards}: Kong + pgwshard / Kong hash_on path = "
                      f"{by[groups, 'kong', shards] / by[groups, 'kong-hash', shards]:.2f}"
                      f"   (per round: median {statistics.median(paired):.2f}, {paired[0]:.2f}-{paired[-1]:.2f};"
                      f" membership: {args.kong_membership})")
        for mode in ("native", "plugin"):
            if (groups, mode, 4) in by and (groups, "direct", 1) in by:
                # What N=4 would reach if its pushgateways had every core to themselves: the most
                # this machine allows, whatever the front.
                pgw_us = statistics.median(r["pgw_us"] for r in trials[groups, mode, 4])
                ceiling = os.cpu_count() * 1e6 / pgw_us / by[groups, "direct", 1]
                print(f"  G={groups:<6} {mode} N=4 / direct = {by[groups, mode, 4] / by[groups, 'direct', 1]:.2f}x"
                      + ("   (goal >= 8x at 4000 groups)" if groups == 4000 else "")
                      + f"   ceiling on {os.cpu_count()} cores: {ceiling:.1f}x")


if __name__ == "__main__":
    main()
