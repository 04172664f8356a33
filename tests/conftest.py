"""Fixtures that start real processes; each is stopped when its test ends."""
from __future__ import annotations

import contextlib
import os
import threading

import pytest

from kong_plugin_pgwshard.harness.processes import Consul, Pushgateway, consul_binary
from kong_plugin_pgwshard.harness.prometheus import Prometheus


def pytest_collection_modifyitems(config, items):
    """Soak tests run where PGWSHARD_SOAK=1 (CI, README's test command); a plain run skips them."""
    if os.environ.get("PGWSHARD_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="soak test: set PGWSHARD_SOAK=1 to run it")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def stop():
    """A stop event for a watch loop, set when the test ends."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def pushgateways():
    """Factory: pushgateways(n) starts n real pushgateways; all are stopped afterwards."""
    started: list[Pushgateway] = []

    def start(n: int = 1, extra_args: list[str] | None = None) -> list[Pushgateway]:
        new = [Pushgateway(extra_args=extra_args) for _ in range(n)]
        for pgw in new:
            started.append(pgw)
            pgw.start()
        return new

    yield start
    for pgw in started:
        with contextlib.suppress(Exception):
            pgw.stop()


@pytest.fixture
def consul():
    """A real Consul dev agent on loopback; skipped when no binary was built."""
    if consul_binary() is None:
        pytest.skip("no consul binary (run .ci/build-consul.sh)")
    agent = Consul().start()
    yield agent
    agent.stop()


@pytest.fixture
def plugin_server_factory():
    """Factory: plugin_server_factory() starts the real pgwshard-plugin; stopped afterwards."""
    from kong_plugin_pgwshard.harness.processes import PluginServer

    started = []

    def start() -> PluginServer:
        server = PluginServer()
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def kong_admin():
    """Factory: kong_admin(db_less=False, token=None) starts a Kong Admin API double."""
    from tests.support.kong_admin_double import KongAdminDouble

    started = []

    def start(**kwargs) -> KongAdminDouble:
        double = KongAdminDouble(**kwargs).start()
        started.append(double)
        return double

    yield start
    for double in started:
        double.stop()


@pytest.fixture
def prometheus():
    """Factory: prometheus(targets) starts a real Prometheus; it is stopped afterwards."""
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        prom = Prometheus(targets)
        started.append(prom)
        return prom.start()

    yield start
    for prom in started:
        prom.stop()


def pytest_terminal_summary(terminalreporter):
    """How many tests ran in real Kong: CI must show they ran, not that they skipped."""
    counts: dict[str, int] = {}
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            if report.nodeid.startswith("tests/kong/") and (report.when == "call" or outcome != "passed"):
                counts[outcome] = counts.get(outcome, 0) + 1
    if counts:
        detail = ", ".join(f"{outcome} {n}" for outcome, n in counts.items())
        terminalreporter.write_line(f"tests in real Kong (tests/kong): {detail}")
