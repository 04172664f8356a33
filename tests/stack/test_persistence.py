"""The shipped stacks' pushgateways persist often enough that a kill loses seconds, not minutes."""
from __future__ import annotations

import signal
import urllib.request
from pathlib import Path

import yaml

from kong_plugin_pgwshard.harness.processes import PERSISTENCE_INTERVAL, Pushgateway, wait_until
from tests.support import REPO


def test_a_push_acknowledged_before_the_persistence_interval_survives_a_kill(pushgateways):
    """Issue 14: with Pushgateway's default 5 min interval, pushes acknowledged shortly before
    an owner was killed were lost (10 of 10). The harness (local stack, tests) and compose run
    pushgateways with --persistence.interval=5s: after that, a kill loses nothing acknowledged."""
    (pgw,) = pushgateways(1)
    request = urllib.request.Request(pgw.url + "/metrics/job/backup", data=b"backup_done 7\n", method="PUT")
    urllib.request.urlopen(request, timeout=5).close()
    data = Path(pgw.data_dir) / "pushgateway.data"
    wait_until(lambda: data.exists() and b"backup_done" in data.read_bytes(), 15, what="the push persisted")
    pgw.stop(sig=signal.SIGKILL)  # no clean shutdown: only what the interval wrote survives
    back = Pushgateway(port=pgw.port, data_dir=pgw.data_dir).start()
    try:
        assert [g["labels"] for g in back.groups()] == [{"job": "backup"}]
    finally:
        back.stop()


def test_compose_pushgateways_use_the_stated_interval():
    compose = yaml.safe_load((REPO / "docker" / "docker-compose.yml").read_text())
    for name in ("pushgateway-1", "pushgateway-2", "pushgateway-3"):
        command = compose["services"][name]["command"]
        assert f"--persistence.interval={PERSISTENCE_INTERVAL}" in command, name
        assert any(arg.startswith("--persistence.file=/") for arg in command), name
    assert f"--persistence.interval={PERSISTENCE_INTERVAL}" in (REPO / "README.md").read_text()
