"""Consul fault benchmark: how soon pgwshard-sync sees its Consul agent hang or restart, and
how soon it follows the agent again, at the shipped defaults (wait 30 s, backoff up to 10 s).

Real processes on loopback: a Consul dev agent, three pushgateways pgwshard-sync registers
there, and pgwshard-sync as its own process; its `pgwshard_health_source_up` is read from its
/metrics every 20 ms. Trials alternate:

- hang: SIGSTOP the agent; seconds until source_up is 0 (goal <= 2 s); SIGCONT; seconds until
  it is 1 again;
- restart: SIGKILL the agent and start a new one on the same port (a dev agent: it comes back
  empty); seconds from the kill until source_up is 0, and from the new agent's first answer
  with a leader until source_up is 1 (goal <= 2 s; pgwshard-sync registers the pushgateways
  again then).

    python bench/consul_fault_bench.py [--trials 10]
"""
from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from pathlib import Path

from kong_plugin_pgwshard.harness.processes import (
    Consul,
    ManagedProcess,
    Pushgateway,
    free_port,
    http_get,
    temp_dir,
    wait_until,
)


def source_up(metrics_url: str) -> float | None:
    try:
        status, body = http_get(metrics_url, timeout=1)
    except OSError:
        return None
    for line in body.decode().splitlines():
        if line.startswith("pgwshard_health_source_up "):
            return float(line.split()[1])
    return None


def seconds_until(predicate, timeout: float) -> float:
    started = time.monotonic()
    wait_until(predicate, timeout, interval=0.02, what="the daemon's view")
    return time.monotonic() - started


def summary(name: str, values: list[float]) -> str:
    return f"{name} p50 {statistics.median(values):.2f} s, max {max(values):.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    work = Path(temp_dir("pgwshard-consul-faults-"))
    consul = Consul().start()
    pgws = [Pushgateway().start() for _ in range(3)]
    metrics_port = free_port()
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    config = work / "pgwshard.yml"
    config.write_text(json.dumps({  # JSON is YAML; everything else at its default
        "pushgateways": [p.address for p in pgws],
        "consul": {"address": consul.url, "register": {"enabled": True}},
        "file_sd": {"path": str(work / "sd.json")},
        "rebalance": {"enabled": False},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "log": {"level": "warning"},
    }))
    daemon = ManagedProcess("pgwshard-sync", [sys.executable, "-m", "kong_plugin_pgwshard.sync.daemon",
                                              "--config", str(config)]).start()
    hang_seen, hang_back, restart_seen, restart_back = [], [], [], []
    try:
        wait_until(lambda: source_up(metrics_url) == 1, 30, what="pgwshard-sync following Consul")
        for trial in range(args.trials):
            assert consul.proc is not None
            if trial % 2 == 0:
                consul.proc.send_signal(signal.SIGSTOP)
                try:
                    hang_seen.append(seconds_until(lambda: source_up(metrics_url) == 0, 60))
                finally:
                    consul.proc.send_signal(signal.SIGCONT)
                hang_back.append(seconds_until(lambda: source_up(metrics_url) == 1, 60))
                print(f"  hang {trial // 2 + 1}: seen after {hang_seen[-1]:.2f} s, "
                      f"followed again {hang_back[-1]:.2f} s after SIGCONT", flush=True)
            else:
                consul.kill()
                restart_seen.append(seconds_until(lambda: source_up(metrics_url) == 0, 60))
                consul = Consul(http_port=consul.http_port).start()  # returns once it has a leader
                restart_back.append(seconds_until(lambda: source_up(metrics_url) == 1, 60))
                print(f"  restart {trial // 2 + 1}: seen after {restart_seen[-1]:.2f} s, "
                      f"followed {restart_back[-1]:.2f} s after the new agent had a leader", flush=True)
            time.sleep(2)  # let the registrations settle between trials (not a synchronization)
        print(f"hung agent: {summary('seen', hang_seen)}; {summary('followed after SIGCONT', hang_back)}")
        print(f"restarted agent: {summary('seen', restart_seen)}; "
              f"{summary('followed after its leader', restart_back)} (goal <= 2 s)")
    finally:
        daemon.stop()
        for pgw in pgws:
            pgw.stop()
        consul.stop()


if __name__ == "__main__":
    main()
