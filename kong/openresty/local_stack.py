#!/usr/bin/env python3
"""pgwshard's local stack: the OpenResty host in front of three pushgateways, membership kept by
pgwshard-sync on its own probes, Prometheus scraping every pushgateway. Run it through
local-stack.sh, which installs what it needs first.

Ports (defaults chosen to stay clear of Debian's own services): gateway 18000, pushgateways
19091-19093, Prometheus 19090, pgwshard-sync metrics 19550. --free-ports picks free ones.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "monitoring" / "pgwshard.rules.yml"

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--free-ports", action="store_true", help="use free ports instead of the defaults")
    parser.add_argument("--once", action="store_true", help="start, push, print, then stop (a smoke test)")
    args = parser.parse_args()
    port = free_port if args.free_ports else None
    parts: list = []
    work = Path(temp_dir("pgwshard-stack-"))
    try:
        pgws = [Pushgateway(port=port() if port else 19091 + i) for i in range(3)]
        for pgw in pgws:
            parts.append(pgw.start())
        members_file = work / "members.json"
        config = work / "pgwshard.yml"
        metrics_port = port() if port else 19550
        config.write_text(json.dumps({  # JSON is YAML
            "pushgateways": [p.address for p in pgws],
            "health": {"source": "probes", "probes": {"interval": "1s", "timeout": "1s"}},
            "file_sd": {"path": str(members_file)},
            "rebalance": {"enabled": True, "interval": "30s"},
            "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        }))
        daemon = ManagedProcess("pgwshard-sync", [sys.executable, "-m", "kong_plugin_pgwshard.sync.daemon",
                                                  "--config", str(config)])
        parts.append(daemon.start())
        wait_until(lambda: members_file.exists() and len(json.loads(members_file.read_text())[0]["targets"]) == 3,
                   20, what="pgwshard-sync to write the membership")
        server = PluginServer()
        parts.append(Respawner(server).start())  # as Kong respawns a plugin server that dies
        host = NginxHost(server.socket_path, {"membership": "file", "membership_file": str(members_file),
                                              "refresh_interval": 1}, [p.address for p in pgws],
                         port=port() if port else 18000)
        parts.append(host.start())
        prometheus = Prometheus([p.address for p in pgws], port=port() if port else 19090,
                                sync_targets=[f"127.0.0.1:{metrics_port}"], rule_files=[RULES])
        parts.append(prometheus.start())
        rules = json.loads(http_get(prometheus.url + "/api/v1/rules")[1])["data"]["groups"]

        print(f"gateway      {host.url}  (push here: {host.url}/metrics/job/<job>/<label>/<value>)")
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
