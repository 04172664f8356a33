#!/usr/bin/env python3
"""pgwshard's local stack: the OpenResty host (or, with --gateway kong, a DB-less Kong node) in
front of three pushgateways, membership kept by pgwshard-sync on its own probes, DELETEs through
pgwshard-sync's delete API, Prometheus scraping every pushgateway with pgwshard's alert rules. Run
it through local-stack.sh, which installs what it needs first.

Ports (defaults chosen to stay clear of Debian's own services): gateway 18000 (Kong: its proxy;
Admin API 18001, Status API 18007), pushgateways 19091-19093, Prometheus 19090, pgwshard-sync
metrics 19550 and delete API 19552. --free-ports picks free ones (for a second stack, or when
something else holds one of these).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kong_plugin_pgwshard.harness.kong import KONG_ENV, Kong, kong_binary, shipped_declarative
from kong_plugin_pgwshard.harness.nginx import NginxHost
from kong_plugin_pgwshard.harness.processes import (
    ManagedProcess,
    PluginServer,
    Pushgateway,
    Respawner,
    free_port,
    http_get,
    wait_until,
)
from kong_plugin_pgwshard.harness.prometheus import Prometheus

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "monitoring" / "pgwshard.rules.yml"
DASHBOARD = REPO / "monitoring" / "pgwshard.dashboard.json"
# The venv's own scripts, so that printed commands run as printed (the venv need not be on PATH).
# Not resolved: the venv's python is a symlink to the system one, whose bin/ has no pgwshard.
BIN = Path(sys.executable).absolute().parent

SAMPLES = ["/metrics/job/backup/instance/db-1", "/metrics/job/backup/instance/db-2",
           "/metrics/job/backup/instance/db-3", "/metrics/job/etl/stage/extract", "/metrics/job/etl/stage/load",
           "/metrics/job/nightly-report", "/metrics/job/cleanup/host/web-1/path@base64/L3Zhci90bXA",
           "/metrics/job/billing/region/eu/shard/1", "/metrics/job/billing/region/us/shard/1"]
BODY = b"# TYPE demo_last_success_timestamp_seconds gauge\ndemo_last_success_timestamp_seconds 1.7e9\n"


class StackError(Exception):
    """Why the stack cannot start, in one line for the user (no traceback)."""


@dataclass
class Ports:
    gateway: int = 18000
    pushgateways: tuple[int, ...] = (19091, 19092, 19093)
    prometheus: int = 19090
    sync_metrics: int = 19550
    sync_deletes: int = 19552
    kong_admin: int = 18001
    kong_status: int = 18007

    @classmethod
    def free(cls) -> Ports:
        return cls(free_port(), (free_port(), free_port(), free_port()), free_port(), free_port(), free_port(),
                   free_port(), free_port())

    def named(self, gateway: str) -> list[tuple[str, int]]:
        kong = [("Kong's Admin API", self.kong_admin), ("Kong's Status API", self.kong_status)] if gateway == "kong" else []
        return [("the gateway", self.gateway), *kong,
                *((f"pushgateway {i + 1}", p) for i, p in enumerate(self.pushgateways)),
                ("Prometheus", self.prometheus), ("pgwshard-sync's metrics", self.sync_metrics),
                ("pgwshard-sync's delete API", self.sync_deletes)]

    def check_free(self, gateway: str) -> None:
        """Every port can be listened on now: a busy one is named before anything starts, instead
        of a process failing to bind and the stack timing out waiting for it."""
        for what, port in self.named(gateway):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError as err:
                    why = "is in use" if err.errno == errno.EADDRINUSE else f"cannot be used ({err.strerror})"
                    raise StackError(f"port {port} ({what}) {why}: stop what listens there, or run with "
                                     "--free-ports to use free ports") from None


@dataclass
class Stack:
    """The running parts (stopped in reverse order) and what the printed pointers name."""

    work: Path
    ports: Ports
    parts: list = field(default_factory=list)
    pushgateways: list[Pushgateway] = field(default_factory=list)
    gateway_url: str = ""
    gateway_log: str = ""
    gateway_pointers: list[str] = field(default_factory=list)
    kong: Kong | None = None  # --gateway kong
    prometheus: Prometheus | None = None

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    @property
    def config(self) -> Path:
        return self.work / "pgwshard.yml"

    @property
    def members_file(self) -> Path:
        return self.work / "members.json"

    def start(self, process):
        """Start a part (a process, or a Respawner watching one) with its output in the stack's
        log directory; stopped by stop()."""
        watched = process.process if isinstance(process, Respawner) else process
        watched.log_path = self.logs / f"{watched.name}.log"
        self.parts.append(process.start())
        return process

    def stop(self) -> None:
        for part in reversed(self.parts):
            part.stop()


def start_backends(stack: Stack) -> None:
    """Pushgateways, pgwshard-sync (probes, file_sd, delete API, rebalancing; with Kong, its
    targets too) and Prometheus: everything a gateway routes to or reads."""
    ports = stack.ports
    stack.pushgateways = [stack.start(Pushgateway(port=p)) for p in ports.pushgateways]
    addresses = [p.address for p in stack.pushgateways]
    kong = stack.kong and {"kong": {"mode": "declarative", "declarative_file": str(stack.work / "kong.yml"),
                                    "upstream": "pushgateways", "nodes": [stack.kong.admin_url]}}
    stack.config.write_text(json.dumps({  # JSON is YAML
        **(kong or {}),
        "pushgateways": addresses,
        "health": {"source": "probes", "probes": {"interval": "1s", "timeout": "1s"}},
        "file_sd": {"path": str(stack.members_file)},
        "rebalance": {"enabled": True, "interval": "30s"},
        "metrics": {"listen": f"127.0.0.1:{ports.sync_metrics}"},
        # README "Deletes": the gateway sends every DELETE here, which keeps a tombstone
        "deletes": {"listen": f"127.0.0.1:{ports.sync_deletes}", "tombstone_file": str(stack.work / "tombstones")},
    }, indent=2))
    daemon = stack.start(ManagedProcess("pgwshard-sync", [str(BIN / "pgwshard-sync"), "--config", str(stack.config)]))

    def membership_written() -> bool:
        if not daemon.running:
            last = (daemon.log().strip().splitlines() or ["no output"])[-1]
            raise StackError(f"pgwshard-sync exited: {last} (its log: {daemon.log_path})")
        return stack.members_file.exists() and len(json.loads(stack.members_file.read_text())[0]["targets"]) == 3

    wait_until(membership_written, 20, what="pgwshard-sync to write the membership")
    stack.prometheus = stack.start(Prometheus(addresses, port=ports.prometheus,
                                              sync_targets=[f"127.0.0.1:{ports.sync_metrics}"], rule_files=[RULES]))


def start_openresty_gateway(stack: Stack) -> None:
    """The OpenResty host and its plugin server, following pgwshard-sync's file."""
    server = PluginServer()
    stack.start(Respawner(server))  # as Kong respawns a plugin server that dies
    host = stack.start(NginxHost(server.socket_path, {"membership": "file", "membership_file": str(stack.members_file),
                                                      "refresh_interval": 1},
                                 [p.address for p in stack.pushgateways], port=stack.ports.gateway,
                                 deletes=f"127.0.0.1:{stack.ports.sync_deletes}"))
    stack.gateway_url, stack.gateway_log = host.url, str(Path(host.prefix) / "error.log")


def prepare_kong(stack: Stack) -> None:
    """A DB-less Kong node as README "Kong topologies" sets one up: the kong.conf lines of
    kong/kong.conf and the shipped kong.yml, the plugin reading the targets from the node's Status
    API, DELETEs routed to pgwshard-sync's delete API as kong.yml's comment says. pgwshard-sync
    (start_backends) keeps the targets through the node's /config."""
    ports = stack.ports
    kong_yml = stack.work / "kong.yml"
    kong = Kong({"database": "off", "declarative_config": str(kong_yml)}, REPO / "kong" / "kong.conf")
    kong.use_ports(proxy=ports.gateway, admin=ports.kong_admin, status=ports.kong_status)
    kong_yml.write_text(yaml.safe_dump(shipped_declarative(
        REPO / "kong" / "kong.yml", [f"127.0.0.1:{p}" for p in ports.pushgateways], kong.status_url,
        deletes_url=f"http://127.0.0.1:{ports.sync_deletes}")))
    stack.kong = kong


def start_kong_gateway(stack: Stack) -> None:
    kong = stack.kong
    assert kong is not None, "prepare_kong first"
    stack.parts.append(kong.start())
    # Kong answers 500 to a push until the plugin server it spawned has made its socket
    wait_until(lambda: Path(kong.socket_path).exists(), 30, what="Kong's plugin server socket")
    stack.gateway_url, stack.gateway_log = kong.proxy_url, str(Path(kong.prefix) / "logs" / "error.log")
    stack.gateway_pointers = [
        f"kong admin    {kong.admin_url}/status  (Kong's Admin API: pgwshard-sync POSTs /config here)",
        f"kong status   {kong.status_url}/upstreams/pushgateways/targets  (Kong's Status API: the plugin reads them)",
    ]


GATEWAYS = {"host": start_openresty_gateway, "kong": start_kong_gateway}


def kong_or_exit() -> None:
    """One line saying how to get Kong, before anything starts, when there is none."""
    if kong_binary() is None:
        named = os.environ.get(KONG_ENV)
        sys.exit(f"--gateway kong: {f'{KONG_ENV}={named} is not an executable' if named else 'no `kong` on PATH'}; "
                 f"set {KONG_ENV} to the `kong` of a Kong 3.9 install, or build Kong 3.9.3 with "
                 f"`bash .ci/build-kong.sh` (it prints the path)")


def push_samples(stack: Stack) -> None:
    """Push the samples through the gateway and print where each landed and what locate says."""
    for path in SAMPLES:
        req = urllib.request.Request(stack.gateway_url + path, data=BODY, method="PUT")
        with urllib.request.urlopen(req, timeout=10) as resp:
            if resp.status != 200:
                raise StackError(f"the gateway answered {resp.status} to PUT {path}")
    located = subprocess.run([str(BIN / "pgwshard"), "locate", "--nodes-file", str(stack.members_file), *SAMPLES],
                             capture_output=True, text=True, timeout=30)
    if located.returncode != 0:
        raise StackError(f"pgwshard locate failed: {located.stdout.strip()} {located.stderr.strip()}")
    print(f"{'pushed':58} {'landed on':17} {'pgwshard locate says'}")
    for line in located.stdout.splitlines():
        path, key, owner = line.split("\t")
        landed = [p.address for p in stack.pushgateways if any(_matches(g, key) for g in p.groups())]
        print(f"{path:58} {','.join(landed):17} {owner}")


def print_pointers(stack: Stack) -> None:
    """Where to look while the stack is up: every URL answers, every command runs as printed."""
    assert stack.prometheus is not None
    prom = stack.prometheus.url
    # Debian's Prometheus 2.42 serves its UI under /classic/; newer ones under /
    ui = next((p for p in ("/classic", "") if http_get(f"{prom}{p}/alerts")[0] == 200), "/classic")
    rules = json.loads(http_get(prom + "/api/v1/rules")[1])["data"]["groups"]
    gateway, pgw, example = stack.gateway_url, BIN / "pgwshard", SAMPLES[5]
    print(f"gateway       {gateway}  (push to {gateway}/metrics/job/<job>/<label>/<value>)")
    for line in stack.gateway_pointers:
        print(line)
    print(f"pushgateways  {', '.join(p.url for p in stack.pushgateways)}")
    print(f"prometheus    {prom}{ui}/graph  (targets: {prom}{ui}/targets)")
    print(f"alerts        {prom}{ui}/alerts  ({sum(len(g['rules']) for g in rules)} rules loaded from "
          f"{RULES.relative_to(REPO)})")
    print(f"dashboard     import {DASHBOARD} into Grafana, this Prometheus as its data source")
    print(f"pgwshard-sync metrics http://127.0.0.1:{stack.ports.sync_metrics}/metrics")
    print(f"config        {stack.config}  (pgwshard-sync's; membership file {stack.members_file})")
    print(f"logs          {stack.logs}  ({'Kong' if stack.kong else 'nginx'}: {stack.gateway_log})")
    print(f"status        {pgw} status --config {stack.config}")
    print(f"plan          {pgw} rebalance --config {stack.config} --dry-run")
    print(f"locate        {pgw} locate --config {stack.config} {example}")
    print(f"delete        curl -fsS -X DELETE {gateway}{example}  (through pgwshard-sync's delete API: README \"Deletes\")")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--free-ports", action="store_true", help="use free ports instead of the defaults")
    parser.add_argument("--once", action="store_true", help="start, push, print where each push went, then stop "
                                                            "(a smoke test; prints no addresses, they would be gone)")
    parser.add_argument("--gateway", choices=sorted(GATEWAYS), default="host",
                        help="the OpenResty host (default), or a DB-less Kong node: a Kong 3.9 named by "
                             f"{KONG_ENV} or on PATH")
    args = parser.parse_args()
    if args.gateway == "kong":
        kong_or_exit()
    # line by line even into a pipe or file (`| tee`): "The stack is up" must not wait in a buffer
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    ports = Ports.free() if args.free_ports else Ports()
    try:
        ports.check_free(args.gateway)
    except StackError as err:
        sys.exit(f"local-stack: {err}")
    # not a temp_dir(): the config and logs of a stack that failed to start stay for a look
    stack = Stack(Path(tempfile.mkdtemp(prefix="pgwshard-stack-")), ports)
    stack.logs.mkdir()
    failed = True
    try:
        if args.gateway == "kong":
            prepare_kong(stack)
        start_backends(stack)
        GATEWAYS[args.gateway](stack)
        push_samples(stack)
        if args.once:
            failed = False
            print("\n--once: the stack has stopped (without --once it stays up and prints where to look).")
            return
        print()
        print_pointers(stack)
        print("\nThe stack is up. Ctrl-C stops it (and removes its config and logs).")
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()
        failed = False
    except StackError as err:
        sys.exit(f"local-stack: {err}")
    except (TimeoutError, RuntimeError, OSError) as err:
        sys.exit(f"local-stack: {err} (its config and logs are kept in {stack.work})")
    except KeyboardInterrupt:
        failed = False
        sys.exit(130)
    finally:
        stack.stop()
        if not failed:
            shutil.rmtree(stack.work, ignore_errors=True)


def _matches(group: dict, key_text: str) -> bool:
    from kong_plugin_pgwshard.core.grouping import GroupingKey
    return str(GroupingKey.from_labels(group["labels"])) == key_text


if __name__ == "__main__":
    main()
