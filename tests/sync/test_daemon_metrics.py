"""What pgwshard-sync's metrics tell an operator (and monitoring/pgwshard.rules.yml alerts on),
against the real daemon, pushgateways and Consul."""
from __future__ import annotations

import signal
import time

from kong_plugin_pgwshard.harness.processes import wait_until
from kong_plugin_pgwshard.sync.daemon import Daemon
from kong_plugin_pgwshard.sync.settings import parse_settings
from tests.support.daemon import registering_settings, running


def value(daemon: Daemon, name: str, **labels) -> float | None:
    return daemon.registry.get_sample_value(name, labels)


def test_a_consul_outage_stops_the_last_success_timestamp_while_the_sinks_stay_in_sync(consul, pushgateways, tmp_path):
    pgws = pushgateways(2)
    settings = registering_settings(consul, pgws, tmp_path / "sd.json", wait="1s")
    daemon = Daemon(settings)
    stamp = "pgwshard_health_source_last_success_timestamp_seconds"
    assert value(daemon, stamp) == 0  # never succeeded yet: the staleness alert counts from 1970
    with running(daemon):
        wait_until(lambda: value(daemon, "pgwshard_members") == 2, 20, what="both registered and passing")
        first = value(daemon, stamp)
        wait_until(lambda: value(daemon, stamp) > first, 10, what="each answered query moves it on")
        consul.proc.send_signal(signal.SIGSTOP)  # Consul hangs
        try:
            wait_until(lambda: value(daemon, "pgwshard_health_source_up") == 0, 30, what="outage reported")
            frozen = value(daemon, stamp)
            errors = value(daemon, "pgwshard_health_source_errors_total")
            # the outage lasts (two more failed queries): the stamp must not move, the sinks stay "in sync"
            wait_until(lambda: value(daemon, "pgwshard_health_source_errors_total") >= errors + 2, 30,
                       what="two more failed queries")
            assert value(daemon, stamp) == frozen < time.time() - 1
            assert 0 <= value(daemon, "pgwshard_seconds_since_last_good_sync") < 1.5
        finally:
            consul.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: value(daemon, stamp) > frozen, 30, what="the stamp moves once Consul answers")


def test_every_known_pushgateway_has_a_health_and_a_ring_series(pushgateways, tmp_path):
    pgws = pushgateways(2)
    settings = parse_settings({
        "pushgateways": [p.address for p in pgws],
        "health": {"probes": {"interval": 0.2, "timeout": 0.5, "rise": 1, "fall": 1}},
        "membership": {"hold_down": 1},
        "file_sd": {"path": str(tmp_path / "sd.json")},
        "rebalance": {"enabled": False},
    }, "test")
    daemon = Daemon(settings)
    [file_sink] = [s.name for s in daemon.sinks]
    assert value(daemon, "pgwshard_sync_errors_total", sink=file_sink) == 0  # so increase() sees the 1st error
    alive, dead = (p.address for p in pgws)
    with running(daemon):
        wait_until(lambda: value(daemon, "pgwshard_member_in_ring", pushgateway=dead) == 1, 10, what="both in")
        pgws[1].kill()
        wait_until(lambda: value(daemon, "pgwshard_member_in_ring", pushgateway=dead) == 0, 10, what="it leaves")
        assert value(daemon, "pgwshard_member_healthy", pushgateway=dead) == 0
        assert value(daemon, "pgwshard_member_healthy", pushgateway=alive) == 1
        assert value(daemon, "pgwshard_member_in_ring", pushgateway=alive) == 1
