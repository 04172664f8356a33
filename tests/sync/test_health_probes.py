"""Own probes against real pushgateways: rise/fall counts flip state, a refused connection takes
a member out at once, a hung instance is down."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time

from kong_plugin_pgwshard.core.ring import Member
from kong_plugin_pgwshard.harness.processes import Pushgateway, free_port, wait_until
from kong_plugin_pgwshard.sync.health.deathwatch import DeathWatch
from kong_plugin_pgwshard.sync.health.probes import REPROBE_DIVISOR, Probe, ProbeHealth
from kong_plugin_pgwshard.sync.settings import ProbeSettings


def members(pgws) -> list[Member]:
    return [Member.parse(p.address) for p in pgws]


def test_first_probe_decides_then_fall_and_rise_counts_apply(pushgateways, stop):
    pgws = pushgateways(2)
    dead = Member("127.0.0.1", free_port())
    a, b = members(pgws)
    # the first snapshot: no waiting for `rise` at start; the dead one is out
    assert next(ProbeHealth([a, b, dead], ProbeSettings(interval=0.05, timeout=2)).watch(stop)).members == {a, b}

    source = ProbeHealth([a, b], ProbeSettings(timeout=1.0, rise=2, fall=2))  # a loaded machine answers late

    def one_round() -> frozenset[Member]:
        return source.observe({m: source.probe(m) for m in (a, b)})

    assert one_round() == {a, b}
    os.killpg(pgws[1].proc.pid, signal.SIGSTOP)  # hung: its probe times out, as one lost probe may
    try:
        assert one_round() == {a, b}  # one failed probe is not enough (fall: 2)
        assert one_round() == {a}
    finally:
        os.killpg(pgws[1].proc.pid, signal.SIGCONT)
    assert one_round() == {a}  # one success is not enough (rise: 2)
    assert one_round() == {a, b}


def test_a_refused_probe_takes_the_member_out_at_the_first_failure(pushgateways):
    """A refused connection is no lost probe: nothing listens there, the process is gone (and
    every push sent to it fails), so `fall` does not apply."""
    pgws = pushgateways(2)
    a, b = members(pgws)
    source = ProbeHealth([a, b], ProbeSettings(rise=2, fall=3))
    assert source.observe({a: source.probe(a), b: source.probe(b)}) == {a, b}
    pgws[1].kill()
    assert source.probe(b) is Probe.GONE
    assert source.observe({a: source.probe(a), b: source.probe(b)}) == {a}


def test_a_killed_pushgateway_leaves_the_watch_at_its_first_probe(pushgateways, stop):
    """fall 1000 at 0.1 s would keep it in for 100 s; its first refused probe takes it out."""
    pgws = pushgateways(2)
    a, b = members(pgws)
    rounds = ProbeHealth([a, b], ProbeSettings(interval=0.1, timeout=0.5, rise=1, fall=1000)).watch(stop)
    assert next(rounds).members == {a, b}
    pgws[1].kill()
    deadline = time.monotonic() + 15  # a snapshot comes at least every interval: the loop is bounded
    for snapshot in rounds:
        if snapshot.members == {a}:
            break
        assert time.monotonic() < deadline, f"still {sorted(m.name for m in snapshot.members)}"


def test_a_member_whose_probe_failed_is_probed_again_within_the_interval(pushgateways):
    """The second failure that `fall: 2` waits for comes a quarter interval after the first,
    not a whole interval: a lost probe is confirmed or cleared quickly."""
    a, = members(pushgateways(1))
    source = ProbeHealth([a], ProbeSettings(interval=1.0, fall=2))
    source.observe({a: Probe.UP})
    assert source._next_probe(a, 100.0) == 101.0
    source.observe({a: Probe.DOWN})
    assert source._next_probe(a, 100.0) == 100.0 + 1.0 / REPROBE_DIVISOR
    source.observe({a: Probe.UP})
    assert source._next_probe(a, 100.0) == 101.0


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


def test_waiting_for_the_next_probe_costs_no_cpu(pushgateways, stop):
    """Between probes the watch sleeps: it once spun on an empty wait (half a core, idle)."""
    a, = members(pushgateways(1))
    rounds = ProbeHealth([a], ProbeSettings(interval=0.5)).watch(stop)
    next(rounds)
    cpu = time.thread_time()  # the generator runs in this thread
    for _ in range(3):  # three intervals, 1.5 s
        assert next(rounds).members == {a}
    assert time.thread_time() - cpu < 0.3


def test_a_killed_pushgateway_leaves_before_its_next_probe(pushgateways, stop):
    """A healthy member's idle connection closes with its process, and the new one is refused:
    out at once, not at the next probe (60 s here)."""
    pgws = pushgateways(2)
    a, b = members(pgws)
    source = ProbeHealth([a, b], ProbeSettings(interval=60, timeout=0.5, rise=1, fall=1000))
    rounds = source.watch(stop)
    assert next(rounds).members == {a, b}
    wait_until(lambda: source.deaths is not None and source.deaths.watching() == {a, b}, 10, what="both watched")
    pgws[1].kill()
    killed = time.monotonic()
    assert next(rounds).members == {a}  # the next snapshot: on a change, or after 60 s
    assert time.monotonic() - killed < 30  # long before the next probe


def test_the_death_watch_tells_a_death_from_a_closed_idle_connection(pushgateways):
    """A connection the server closes (an idle timeout) is reconnected silently; one whose
    reconnection is refused is a death; a member that accepts again is back."""
    pgw, = pushgateways(1)
    member, = members([pgw])
    closer = socket.socket()  # accepts, then closes every connection at once
    closer.bind(("127.0.0.1", 0))
    closer.listen(16)
    closing = Member("127.0.0.1", closer.getsockname()[1])
    stopped = threading.Event()

    def close_all() -> None:
        closer.settimeout(0.2)
        while not stopped.is_set():
            try:
                closer.accept()[0].close()
            except OSError:
                pass

    closing_thread = threading.Thread(target=close_all, daemon=True)
    closing_thread.start()
    gone: list[Member] = []
    back: list[Member] = []
    watch = DeathWatch(gone.append, back.append)
    try:
        watch.follow([member, closing])
        wait_until(lambda: member in watch.watching(), 10, what="watching the pushgateway")
        pgw.kill()
        wait_until(lambda: gone == [member], 10, what="its death reported")
        again = Pushgateway(port=pgw.port, data_dir=pgw.data_dir).start()
        try:
            wait_until(lambda: back == [member], 10, what="its return reported")
        finally:
            again.stop()
        assert closing not in gone  # closed and reconnected many times, never refused
    finally:
        watch.close()
        stopped.set()
        closing_thread.join(5)
        closer.close()
