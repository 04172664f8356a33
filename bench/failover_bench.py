"""Failover benchmark: seconds from a pushgateway's death to the membership the plugin reads
leaving it out, with a real Consul (HTTP check every 1 s) and the real pgwshard-sync process.

Prints each trial, p50/p99 (goal: p99 <= 3 s), and the daemon's idle CPU over a quiet window,
read from /proc/<pid>/stat.

    python bench/failover_bench.py [--trials 20] [--idle-seconds 30]

The clock stops when the file_sd file (which the plugin's file membership reads) no longer
lists the killed instance; the Kong Admin sink is written in the same pass.
"""
from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kong_plugin_pgwshard.harness.processes import (
    Consul,
    Pushgateway,
    cpu_seconds,
    free_port,
    wait_until,
)


def members(path: Path) -> set[str] | None:
    try:
        return set(json.loads(path.read_text())[0]["targets"])
    except (OSError, ValueError, IndexError):
        return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--hold-down", type=float, default=2.0, help="rejoin damping (does not delay failover)")
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pgwshard-failover-"))
    sd = work / "sd.json"
    consul = Consul().start()
    pgws = [Pushgateway().start() for _ in range(args.instances)]
    config = work / "pgwshard.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "pushgateways": [p.address for p in pgws],
        "consul": {"address": consul.url, "wait": "30s",
                   "register": {"enabled": True, "check_interval": "1s", "check_timeout": "1s"}},
        "membership": {"hold_down": args.hold_down},
        "file_sd": {"path": str(sd)},
        "rebalance": {"enabled": False},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "log": {"level": "warning"},
    }))
    daemon_log = open(work / "daemon.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "kong_plugin_pgwshard.sync.daemon", "--config", str(config)],
                              stdout=daemon_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    everyone = {p.address for p in pgws}
    seconds: list[float] = []
    try:
        wait_until(lambda: members(sd) == everyone, 30, what="all instances registered and healthy")
        for trial in range(args.trials):
            victim = pgws[trial % len(pgws)]
            victim.kill()
            died = time.monotonic()
            wait_until(lambda: victim.address not in (members(sd) or everyone), 30, interval=0.01,
                       what="the dead instance leaves")
            seconds.append(time.monotonic() - died)
            print(f"trial {trial + 1:2d}: {victim.address} left after {seconds[-1]:.2f} s", flush=True)
            pgws[trial % len(pgws)] = Pushgateway(port=victim.port, data_dir=victim.data_dir).start()
            wait_until(lambda: members(sd) == everyone, 30 + args.hold_down, what="it rejoins")

        print(f"\nfailover over {len(seconds)} trials: p50 {statistics.median(seconds):.2f} s, "
              f"p99 {percentile(seconds, 0.99):.2f} s, max {max(seconds):.2f} s (goal p99 <= 3 s)")
        before = cpu_seconds(daemon.pid)
        time.sleep(args.idle_seconds)  # the measured quiet window itself, not a synchronization
        used = cpu_seconds(daemon.pid) - before
        print(f"daemon idle CPU: {used:.2f} s over {args.idle_seconds:.0f} s = {100 * used / args.idle_seconds:.2f} %")
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(5)
        daemon_log.close()
        for pgw in pgws:
            pgw.stop()
        consul.stop()


if __name__ == "__main__":
    main()
