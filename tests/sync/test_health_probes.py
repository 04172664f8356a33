"""Own probes against real pushgateways: rise/fall counts flip state, a hung instance is down."""
from __future__ import annotations

import socket
import threading
import time

from kong_plugin_pgwshard.core.ring import Member
from kong_plugin_pgwshard.harness.processes import Pushgateway, free_port
from kong_plugin_pgwshard.sync.health.probes import ProbeHealth
from kong_plugin_pgwshard.sync.settings import ProbeSettings


def members(pgws) -> list[Member]:
    return [Member.parse(p.address) for p in pgws]


def test_first_probe_decides_then_fall_and_rise_counts_apply(pushgateways, stop):
    pgws = pushgateways(2)
    dead = Member("127.0.0.1", free_port())
    a, b = members(pgws)
    source = ProbeHealth([a, b, dead], ProbeSettings(interval=0.05, timeout=0.5, rise=2, fall=2))
    rounds = source.watch(stop)
    assert next(rounds).members == {a, b}  # no waiting for `rise` at start; the dead one is out

    pgws[1].kill()
    assert next(rounds).members == {a, b}  # one failed probe is not enough (fall: 2)
    assert next(rounds).members == {a}

    again = Pushgateway(port=pgws[1].port, data_dir=pgws[1].data_dir)
    try:
        again.start()
        assert next(rounds).members == {a}  # one success is not enough (rise: 2)
        assert next(rounds).members == {a, b}
    finally:
        again.stop()


def test_a_success_resets_a_failure_streak(pushgateways):
    a, = members(pushgateways(1))
    source = ProbeHealth([a], ProbeSettings(rise=2, fall=2))
    assert source.observe({a: True}) == {a}
    assert source.observe({a: False}) == {a}
    assert source.observe({a: True}) == {a}
    assert source.observe({a: False}) == {a}  # not two failures in a row: still healthy
    assert source.observe({a: False}) == frozenset()


def test_a_hung_instance_is_down_within_the_timeout(pushgateways, stop):
    a, = members(pushgateways(1))
    hung = socket.socket()  # accepts connections (kernel backlog) but never answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    try:
        stuck = Member("127.0.0.1", hung.getsockname()[1])
        source = ProbeHealth([a, stuck], ProbeSettings(interval=0.1, timeout=0.3, rise=1, fall=1))
        started = time.monotonic()
        snapshot = next(source.watch(stop))
        assert snapshot.members == {a}
        assert time.monotonic() - started < 2.0  # bounded by the probe timeout, not hung with it
    finally:
        hung.close()


def test_watch_ends_when_stop_is_set(pushgateways):
    a, = members(pushgateways(1))
    stop = threading.Event()
    source = ProbeHealth([a], ProbeSettings(interval=0.05, timeout=0.5))
    seen = 0
    for _ in source.watch(stop):
        seen += 1
        if seen == 3:
            stop.set()
        assert seen <= 3
    assert seen == 3
