"""Configured weights are what Kong and the file get: a source that knows no weights (Consul
lists a pushgateway by address only) cannot reset them, and a weight changed by hand in Kong is
put back at the next resync (pgwshard.yml is where weights are set)."""
from __future__ import annotations

import json
import threading

from kong_plugin_pgwshard.core.file_sd import read_file_sd
from kong_plugin_pgwshard.core.ring import Member
from kong_plugin_pgwshard.harness.processes import wait_until
from kong_plugin_pgwshard.sync.daemon import Daemon
from kong_plugin_pgwshard.sync.health import HealthSnapshot
from kong_plugin_pgwshard.sync.settings import parse_settings
from tests.support.daemon import running

A, B, C = "10.0.0.1:9091", "10.0.0.2:9091", "10.0.0.3:9091"


class WeightlessSource:
    """Every configured pushgateway healthy, each of weight 100, as Consul reports them."""

    def watch(self, stop: threading.Event):
        while not stop.is_set():
            yield HealthSnapshot(frozenset(Member.parse(n) for n in (A, B, C)))
            stop.wait(0.2)


def weights(kong) -> dict[str, int]:
    return {t["target"]: t["weight"] for t in kong.targets.get("pushgateways", [])}


def test_configured_weights_reach_kong_and_the_file_and_stay(kong_admin, tmp_path):
    kong = kong_admin()
    sd = tmp_path / "sd.json"
    settings = parse_settings({
        "pushgateways": [A, {"address": B, "weight": 0}, {"address": C, "weight": 40}],
        "health": {"source": "consul"}, "consul": {},
        "kong": {"admin_url": kong.url},
        "file_sd": {"path": str(sd)},
        "membership": {"hold_down": "1s"},
        "rebalance": {"enabled": False},
    }, "test")
    daemon = Daemon(settings, source=WeightlessSource())
    daemon.resync_interval = 0.3
    with running(daemon):
        wait_until(lambda: weights(kong) == {A: 100, B: 0, C: 40}, 10, what="configured weights in Kong")
        # B drained: listed with weight 0, so Prometheus scrapes it while its groups move away
        assert sorted(read_file_sd(str(sd))) == sorted([Member.parse(A), Member.parse(B, 0), Member.parse(C, 40)])
        assert [g["labels"] for g in json.loads(sd.read_text())[1:]] == [{"__meta_pgwshard_weight": "0"},
                                                                         {"__meta_pgwshard_weight": "40"}]
        b = next(t for t in kong.targets["pushgateways"] if t["target"] == B)
        b["weight"] = 100  # set by hand in Kong, or by an older pgwshard-sync: undone at the resync
        wait_until(lambda: weights(kong) == {A: 100, B: 0, C: 40}, 10, what="the configured weight back")
        patches = sum(1 for method, *_ in kong.writes if method == "PATCH")
        reads = sum(1 for method, *_ in kong.requests if method == "GET")
        wait_until(lambda: sum(1 for method, *_ in kong.requests if method == "GET") >= reads + 4, 10,
                   what="two more resyncs")
        # nothing fights over the weights: resyncs of the same weights write nothing
        assert sum(1 for method, *_ in kong.writes if method == "PATCH") == patches
        assert weights(kong) == {A: 100, B: 0, C: 40}
