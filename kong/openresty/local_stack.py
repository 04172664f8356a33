#!/usr/bin/env python3
"""pgwshard's local stack: the OpenResty host (or, with --gateway kong, a DB-less Kong node) in
front of three pushgateways, membership kept by pgwshard-sync on its own probes, Prometheus
scraping every pushgateway. Run it through local-stack.sh, which installs what it needs first.

Ports (defaults chosen to stay clear of Debian's own services): gateway 18000 (Kong: its proxy,
Admin API 18001, Status API 18007), pushgateways 19091-19093, Prometheus 19090, pgwshard-sync
metrics 19550. --free-ports picks free ones.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "monitoring" / "pgwshard.rules.yml"

from kong_plugin_pgwshard.harness.kong import KONG_ENV, Kong, kong_binary, shipped_declarative
from kong_plugin_pgwshard.harness.nginx import NginxHost
from kong_plugin_pgwshard.harness.processes import (
    ManagedProcess,
    PluginServer,
    Pushgateway,
    Respawner,
    free_port,
    http_get,
    temp_dir,
    wait_until,
)
from kong_plugin_pgwshard.harness.prometheus import Prometheus

SAMPLES = ["/metrics/job/backup/instance/db-1", "/metrics/job/backup/instance/db-2",
           "/metrics/job/backup/instance/db-3", "/metrics/job/etl/stage/extract", "/metrics/job/etl/stage/load",
           "/metrics/job/nightly-report", "/metrics/job/cleanup/host/web-1/path@base64/L3Zhci90bXA",
           "/metrics/job/billing/region/eu/shard/1", "/metrics/job/billing/region/us/shard/1"]
BODY = b"# TYPE demo_last_success_timestamp_seconds gauge\ndemo_last_success_timestamp_seconds 1.7e9\n"


@dataclass
class Gateway:
    """What a started gateway tells the user: where to push, and where else to look."""
    url: str
    pointers: list[str] = field(default_factory=list)


class Stack:
    """What every gateway is started with: the pushgateways, pgwshard-sync's file_sd file (which
    `pgwshard locate` and `status` read), the parts to stop, and whether ports are the defaults
    or free ones."""

    def __init__(self, pgws: list[Pushgateway], work: Path, free_ports: bool, parts: list):
        self.pgws, self.work, self.free_ports, self.parts = pgws, work, free_ports, parts
        self.members_file = work / "members.json"
        self.metrics_port = self.port(19550)

    def port(self, default: int) -> int:
        return free_port() if self.free_ports else default

    def start_sync(self, kong: dict | None = None) -> None:
        """pgwshard-sync on its own probes, writing the file_sd file (and, with `kong`, that
        section: a Kong node's targets), once it has written the membership."""
        config = self.work / "pgwshard.yml"
        settings: dict = {
            "pushgateways": [p.address for p in self.pgws],
            "health": {"source": "probes", "probes": {"interval": "1s", "timeout": "1s"}},
            "file_sd": {"path": str(self.members_file)},
            "rebalance": {"enabled": True, "interval": "30s"},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
        }
        if kong:
            settings["kong"] = kong
        config.write_text(json.dumps(settings))  # JSON is YAML
        daemon = ManagedProcess("pgwshard-sync", [sys.executable, "-m", "kong_plugin_pgwshard.sync.daemon",
                                                  "--config", str(config)])
        self.parts.append(daemon.start())
        members = self.members_file
        wait_until(lambda: members.exists() and len(json.loads(members.read_text())[0]["targets"]) == len(self.pgws),
                   20, what="pgwshard-sync to write the membership")


def start_host(stack: Stack) -> Gateway:
    """The plugin server and the OpenResty host, the plugin following pgwshard-sync's file."""
    stack.start_sync()
    server = PluginServer()
    stack.parts.append(Respawner(server).start())  # as Kong respawns a plugin server that dies
    host = NginxHost(server.socket_path, {"membership": "file", "membership_file": str(stack.members_file),
                                          "refresh_interval": 1}, [p.address for p in stack.pgws],
                     port=stack.port(18000))
    stack.parts.append(host.start())
    return Gateway(host.url)


def start_kong(stack: Stack) -> Gateway:
    """A DB-less Kong node as README "Kong topologies" sets one up: the kong.conf lines of
    kong/kong.conf, the shipped kong.yml (the plugin reading the targets from the node's Status
    API), pgwshard-sync in declarative mode keeping the targets through the node's /config."""
    kong_yml = stack.work / "kong.yml"
    kong = Kong({"database": "off", "declarative_config": str(kong_yml)}, REPO / "kong" / "kong.conf")
    kong.use_ports(proxy=stack.port(18000), admin=stack.port(18001), status=stack.port(18007))
    kong_yml.write_text(yaml.safe_dump(shipped_declarative(REPO / "kong" / "kong.yml",
                                                           [p.address for p in stack.pgws], kong.status_url)))
    stack.parts.append(kong.start())
    # Kong answers 500 to a push until the plugin server it spawned has made its socket.
    wait_until(lambda: Path(kong.socket_path).exists(), 30, what="Kong's plugin server socket")
    stack.start_sync({"mode": "declarative", "declarative_file": str(kong_yml), "upstream": "pushgateways",
                      "nodes": [kong.admin_url]})
    return Gateway(kong.proxy_url, [f"kong admin   {kong.admin_url}  (Kong's Admin API: pgwshard-sync POSTs /config here)",
                                    f"kong status  {kong.status_url}  (Kong's Status API: the plugin reads the targets here)",
                                    f"kong log     {Path(kong.prefix) / 'logs' / 'error.log'}"])


GATEWAYS = {"host": start_host, "kong": start_kong}


def kong_or_exit() -> None:
    """One line saying how to get Kong, before anything starts, when there is none."""
    if kong_binary() is None:
        named = os.environ.get(KONG_ENV)
        sys.exit(f"--gateway kong: {f'{KONG_ENV}={named} is not an executable' if named else 'no `kong` on PATH'}; "
                 f"set {KONG_ENV} to the `kong` of a Kong 3.9 install, or build Kong 3.9.3 with "
                 f"`bash .ci/build-kong.sh` (it prints the path)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--free-ports", action="store_true", help="use free ports instead of the defaults")
    parser.add_argument("--once", action="store_true", help="start, push, print, then stop (a smoke test)")
    parser.add_argument("--gateway", choices=sorted(GATEWAYS), default="host",
                        help="the OpenResty host (default), or a DB-less Kong node: a Kong 3.9 named by "
                             f"{KONG_ENV} or on PATH")
    args = parser.parse_args()
    if args.gateway == "kong":
        kong_or_exit()
    port = free_port if args.free_ports else None
    parts: list = []
    work = Path(temp_dir("pgwshard-stack-"))
    try:
        pgws = [Pushgateway(port=port() if port else 19091 + i) for i in range(3)]
        for pgw in pgws:
            parts.append(pgw.start())
        stack = Stack(pgws, work, args.free_ports, parts)
        members_file, metrics_port = stack.members_file, stack.metrics_port
        host = GATEWAYS[args.gateway](stack)  # the gateway: the OpenResty host or Kong
        prometheus = Prometheus([p.address for p in pgws], port=port() if port else 19090,
                                sync_targets=[f"127.0.0.1:{metrics_port}"], rule_files=[RULES])
        parts.append(prometheus.start())
        rules = json.loads(http_get(prometheus.url + "/api/v1/rules")[1])["data"]["groups"]

        print(f"gateway      {host.url}  (push here: {host.url}/metrics/job/<job>/<label>/<value>)")
        for line in host.pointers:
            print(line)
        print(f"pushgateways {', '.join(p.url for p in pgws)}")
        print(f"prometheus   {prometheus.url}")
        print(f"pgwshard-sync metrics http://127.0.0.1:{metrics_port}/metrics; membership file {members_file}")
        print(f"alerts       {prometheus.url}/alerts ({sum(len(g['rules']) for g in rules)} rules loaded from "
              f"{RULES.relative_to(REPO)})")
        print(f"dashboard    import {REPO / 'monitoring/pgwshard.dashboard.json'} into Grafana, this Prometheus "
              f"as its data source")
        print(f"status       pgwshard status --nodes-file {members_file}\n")
        for path in SAMPLES:
            req = urllib.request.Request(host.url + path, data=BODY, method="PUT")
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.status == 200, path
        located = subprocess.run([sys.executable, "-m", "kong_plugin_pgwshard.cli", "locate", "--nodes-file",
                                  str(members_file), *SAMPLES], capture_output=True, text=True, timeout=30).stdout
        print(f"{'pushed':58} {'landed on':17} {'pgwshard locate says'}")
        for line in located.splitlines():
            path, key, owner = line.split("\t")
            landed = [p.address for p in pgws if any(_matches(g, key) for g in p.groups())]
            print(f"{path:58} {','.join(landed):17} {owner}")
        if args.once:
            return
        print("\nThe stack is up. Ctrl-C stops it.")
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()
    finally:
        for part in reversed(parts):
            part.stop()


def _matches(group: dict, key_text: str) -> bool:
    from kong_plugin_pgwshard.core.grouping import GroupingKey
    return str(GroupingKey.from_labels(group["labels"])) == key_text


if __name__ == "__main__":
    main()
