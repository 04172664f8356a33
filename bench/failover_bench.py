"""Failover benchmark: a pushgateway is killed under push load; how long until the last push
answered 502, through the OpenResty host, at the shipped defaults.

Real processes on loopback, per health source (`--source probes`, `consul` or both): three
pushgateways, pgwshard-sync as its own process (its own probes, or a real Consul agent where it
registers the pushgateways with 1 s HTTP checks) writing the file_sd file, the plugin server
behind the nginx host following that file (the plugin's shipped `refresh_interval` and
`watch_interval`), and `--clients` threads pushing groups through the host as fast as they are
answered. Each trial kills one pushgateway (SIGKILL) and measures

- death to membership: until the file_sd file no longer lists it (pgwshard-sync's part);
- death to last 502: until the last push the host answered 502 (nothing listens at its owner);
  pushes to every other group go on meanwhile. Trailing answers are awaited for
  `--window` seconds after the file changed (longer than the plugin's 2 s periodic read);

then restarts it and waits until it is back in the ring. Prints each trial, p50/p99 of both
(goal: death to last 502 p99 <= 1 s), the 502s per kill, and pgwshard-sync's idle CPU.

    python bench/failover_bench.py [--source both] [--trials 10] [--clients 4] [--idle-seconds 20]
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

from kong_plugin_pgwshard.harness.nginx import NginxHost
from kong_plugin_pgwshard.harness.processes import (
    Consul,
    ManagedProcess,
    PluginServer,
    Pushgateway,
    cpu_seconds,
    free_port,
    temp_dir,
    wait_until,
)


def members(path: Path) -> set[str] | None:
    try:
        return set(json.loads(path.read_text())[0]["targets"])
    except (OSError, ValueError, IndexError, KeyError):
        return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


class Load:
    """Threads pushing random groups through the host; failed answers kept with their time."""

    def __init__(self, port: int, clients: int, groups: int = 300):
        self.port, self.clients, self.groups = port, clients, groups
        self.sent = 0
        self.failures: list[tuple[float, int]] = []  # (monotonic time of the answer, status; 0: none)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(clients)]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def _run(self, n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        i = n
        while not self._stop.is_set():
            i = (i + 7919) % self.groups
            body = f"bench_value {i}\n".encode()
            try:
                conn.request("PUT", f"/metrics/job/failover/instance/{i}", body)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
            self.sent += 1
            if status != 200:
                self.failures.append((time.monotonic(), status))


def daemon_config(work: Path, pgws: list[Pushgateway], sd: Path, consul: Consul | None) -> Path:
    """pgwshard-sync at its shipped defaults (kong/pgwshard.yml), rebalancing off (not measured)."""
    config: dict = {
        "pushgateways": [p.address for p in pgws],
        "file_sd": {"path": str(sd)},
        "rebalance": {"enabled": False},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "log": {"level": "warning"},
    }
    if consul is not None:
        config["consul"] = {"address": consul.url, "register": {"enabled": True}}
    path = work / "pgwshard.yml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def run(source: str, trials: int, clients: int, window: float, idle_seconds: float) -> None:
    work = Path(temp_dir("pgwshard-failover-"))
    sd = work / "sd.json"
    consul = Consul().start() if source == "consul" else None
    pgws = [Pushgateway().start() for _ in range(3)]
    daemon = ManagedProcess("pgwshard-sync", [sys.executable, "-m", "kong_plugin_pgwshard.sync.daemon",
                                              "--config", str(daemon_config(work, pgws, sd, consul))])
    server = PluginServer()
    host: NginxHost | None = None
    load: Load | None = None
    everyone = {p.address for p in pgws}
    to_membership: list[float] = []
    to_last_502: list[float] = []
    per_kill: list[int] = []
    others: dict[int, int] = {}
    try:
        daemon.start()
        wait_until(lambda: members(sd) == everyone, 60, what="every pushgateway in the ring")
        server.start()
        host = NginxHost(server.socket_path, {"membership": "file", "membership_file": str(sd)},
                         [p.address for p in pgws]).start()
        load = Load(host.port, clients).start()
        wait_until(lambda: load.sent > 1000, 30, what="load running")
        for trial in range(trials):
            victim = pgws[trial % len(pgws)]
            # a random phase against the probes' and Consul's checks' schedules (a rejoin lands on one)
            time.sleep(random.uniform(0.0, 1.0))
            failures_before = len(load.failures)
            sent_before = load.sent
            died = time.monotonic()  # SIGKILL is sent now; kill() returns once the process is reaped
            victim.kill()
            gone = victim.address
            wait_until(lambda: gone not in (members(sd) or everyone), 30, interval=0.005,
                       what="the dead instance leaves")
            left = time.monotonic()
            time.sleep(window)  # the measured window for trailing 502s, not a synchronization
            failed = [(t, status) for t, status in load.failures[failures_before:] if t >= died]
            bad = [t for t, status in failed if status == 502]
            for _, status in failed:
                if status != 502:
                    others[status] = others.get(status, 0) + 1
            to_membership.append(left - died)
            to_last_502.append(max(bad) - died if bad else 0.0)
            per_kill.append(len(bad))
            rate = (load.sent - sent_before) / (time.monotonic() - died)
            print(f"  trial {trial + 1:2d}: {victim.address} out of the ring after {to_membership[-1]:.2f} s, "
                  f"last 502 at {to_last_502[-1]:.2f} s ({len(bad)} 502s at {rate:.0f} pushes/s)", flush=True)
            pgws[trial % len(pgws)] = Pushgateway(port=victim.port, data_dir=victim.data_dir).start()
            wait_until(lambda: members(sd) == everyone, 60, what="it rejoins")

        print(f"{source}: death to membership p50 {statistics.median(to_membership):.2f} s, "
              f"p99 {percentile(to_membership, 0.99):.2f} s; death to last 502 p50 "
              f"{statistics.median(to_last_502):.2f} s, p99 {percentile(to_last_502, 0.99):.2f} s, "
              f"max {max(to_last_502):.2f} s (goal p99 <= 1 s); 502s per kill p50 "
              f"{statistics.median(per_kill):.0f}, max {max(per_kill)}"
              + (f"; other failed answers {others}" if others else ""), flush=True)
        load.stop()
        load = None
        assert daemon.proc is not None
        before = cpu_seconds(daemon.proc.pid)
        time.sleep(idle_seconds)  # the measured quiet window itself, not a synchronization
        used = cpu_seconds(daemon.proc.pid) - before
        print(f"{source}: pgwshard-sync idle CPU {used:.2f} s over {idle_seconds:.0f} s "
              f"= {100 * used / idle_seconds:.2f} %", flush=True)
    finally:
        if load is not None:
            load.stop()
        for part in (host, server, daemon, *pgws, consul):
            if part is not None:
                part.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=("probes", "consul", "both"), default="both")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4, help="pushing threads")
    parser.add_argument("--window", type=float, default=3.0,
                        help="seconds after the file changed during which a 502 still counts")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    args = parser.parse_args()
    for source in (("probes", "consul") if args.source == "both" else (args.source,)):
        print(f"{source}:", flush=True)
        run(source, args.trials, args.clients, args.window, args.idle_seconds)


if __name__ == "__main__":
    main()
