"""pgwshard-sync survives its inputs: a bad declarative file, a hung Kong, a sink that crashes.
Real pushgateways, the Kong Admin API double, a Kong that accepts and never answers."""
from __future__ import annotations

import dataclasses

import pytest

from kong_plugin_pgwshard.clients.kong import KongAdmin
from kong_plugin_pgwshard.core.ring import Ring
from kong_plugin_pgwshard.harness.processes import wait_until
from kong_plugin_pgwshard.sync.daemon import Daemon, Damper
from kong_plugin_pgwshard.sync.settings import FileSdSettings, parse_settings
from kong_plugin_pgwshard.sync.sinks import AdminApiSink, FileSdSink
from tests.support.daemon import file_members, running
from tests.support.raw_servers import RawServer

PROBES = {"interval": 0.2, "timeout": 1.0, "rise": 1, "fall": 1}


def errors_of(daemon: Daemon, sink: str) -> float:
    return daemon.registry.get_sample_value("pgwshard_sync_errors_total", {"sink": sink}) or 0


def test_a_bad_declarative_file_does_not_stop_the_daemon(pushgateways, kong_admin, tmp_path):
    """`upstreams: [pushgateways]` (a list of names, not of upstreams) raised AttributeError in the
    declarative sink, which ended pgwshard-sync. Now it is that sink's error, counted and retried,
    and the file_sd sink follows health meanwhile."""
    pgws = pushgateways(2)
    kong = kong_admin(db_less=True)
    declarative = tmp_path / "kong.yml"
    declarative.write_text("_format_version: '3.0'\nupstreams: [{name: pushgateways}]\n")
    sd = tmp_path / "sd.json"
    settings = parse_settings({
        "pushgateways": [p.address for p in pgws],
        "health": {"probes": PROBES},
        "kong": {"mode": "declarative", "declarative_file": str(declarative), "nodes": [kong.url]},
        "file_sd": {"path": str(sd)},
        "rebalance": {"enabled": False},
    }, "test")
    daemon = Daemon(settings)
    kong_sink = next(s.name for s in daemon.sinks if s.name.startswith("kong"))
    with running(daemon) as daemon:
        wait_until(lambda: file_members(sd) == {p.address for p in pgws}, 10, what="both members")
        declarative.write_text("_format_version: '3.0'\nupstreams: [pushgateways]\n")  # a hand edit gone wrong
        pgws[0].kill()
        wait_until(lambda: file_members(sd) == {pgws[1].address}, 10, what="file_sd follows health")
        wait_until(lambda: errors_of(daemon, kong_sink) >= 1, 10, what="the bad file counted as the sink's error")
        declarative.write_text("_format_version: '3.0'\nupstreams: [{name: pushgateways}]\n")  # fixed
        wait_until(lambda: kong.target_names("pushgateways") == [pgws[1].address], 20,
                   what="the sink's retry lands once the file is fixed")


def test_a_hung_kong_never_delays_the_file_sd_write(pushgateways, tmp_path):
    """Sinks ran one after another, Kong first: a Kong that accepts and never answers held the
    file_sd write for the whole Kong timeout. Each sink now has its own worker."""
    pgws = pushgateways(2)
    sd = tmp_path / "sd.json"
    settings = parse_settings({
        "pushgateways": [p.address for p in pgws],
        "health": {"probes": PROBES},
        "rebalance": {"enabled": False},
    }, "test")
    with RawServer("hang") as hung:
        kong = AdminApiSink(KongAdmin(hung.url, timeout=120), "pushgateways")
        daemon = Daemon(settings, sinks=[kong, FileSdSink(FileSdSettings(str(sd)))])
        with running(daemon):
            wait_until(lambda: file_members(sd) == {p.address for p in pgws}, 20, what="file_sd written")
            # written while the Kong call still hangs: no Kong error yet, its connection open
            assert errors_of(daemon, kong.name) == 0 and hung.connections >= 1
            pgws[0].kill()
            wait_until(lambda: file_members(sd) == {pgws[1].address}, 20, what="and it keeps following health")


class _Crashing:
    name = "crashing"

    def __init__(self) -> None:
        self.calls = 0

    def apply(self, members) -> None:
        self.calls += 1
        raise RuntimeError("a bug in a sink")


def test_a_sink_that_crashes_is_logged_counted_and_retried_and_the_others_go_on(pushgateways, tmp_path, caplog):
    pgws = pushgateways(1)
    sd = tmp_path / "sd.json"
    settings = parse_settings({"pushgateways": [pgws[0].address], "health": {"probes": PROBES},
                               "rebalance": {"enabled": False}}, "test")
    crashing = _Crashing()
    daemon = Daemon(settings, sinks=[crashing, FileSdSink(FileSdSettings(str(sd)))])
    with running(daemon):
        wait_until(lambda: file_members(sd) == {pgws[0].address}, 10, what="file_sd written")
        wait_until(lambda: crashing.calls >= 2 and errors_of(daemon, "crashing") >= 2, 10, what="retried")
    assert "RuntimeError: a bug in a sink" in caplog.text  # with its traceback


def test_the_damper_reads_a_clock_of_zero_as_a_time():
    """`_empty_since or now` took 0.0 for "not empty yet": an empty set seen at 0.0 restarted its
    hold-down at every later observation and was never applied."""
    now = [0.0]
    damper = Damper(hold_down=5.0, clock=lambda: now[0])
    damper.observe(frozenset())
    assert damper.decide() is None  # empty from the start: held for hold_down
    now[0] = 3.0
    damper.observe(frozenset())
    now[0] = 5.0
    assert damper.decide() == frozenset()


def test_the_rebalancer_reads_one_immutable_membership(pushgateways, tmp_path):
    """A pass reads daemon.placement once: a membership change must replace it whole, never
    change the snapshot a running pass holds, and nothing may change that snapshot in place."""
    pgws = pushgateways(2)
    settings = parse_settings({"pushgateways": [p.address for p in pgws], "health": {"probes": PROBES},
                               "file_sd": {"path": str(tmp_path / "sd.json")},
                               "rebalance": {"enabled": False}}, "test")
    daemon = Daemon(settings)
    with running(daemon):
        wait_until(lambda: len(daemon.placement.ring.members) == 2, 10, what="the ring")
        held = daemon.placement  # what a pass started now would read
        members, instances, outages = held.ring.members, held.instances, dict(held.history.outages)
        with pytest.raises(AttributeError):
            held.ring = Ring()  # type: ignore[misc]
        with pytest.raises(TypeError):
            held.history.outages["10.9.9.9:9091"] = ()  # type: ignore[index]
        with pytest.raises(dataclasses.FrozenInstanceError):
            held.history.outages = {}  # type: ignore[misc]
        assert isinstance(held.instances, tuple)
        pgws[1].kill()
        wait_until(lambda: len(daemon.placement.ring.members) == 1, 10, what="the change")
        # the change built a new placement, with the leaver's outage; the held one is untouched
        now = daemon.placement
        assert now is not held and now.history.out_since(pgws[1].address) is not None
        assert (held.ring.members, held.instances, dict(held.history.outages)) == (members, instances, outages)
        assert held.history.out_since(pgws[1].address) is None


def test_a_failed_rebalance_copy_is_logged_with_its_group_and_the_answer(pushgateways, tmp_path, caplog):
    """PgwshardRebalanceFailures sends operators to the log for "the group and the answer": the
    log had the counts only (failed=1)."""
    import logging

    from kong_plugin_pgwshard.clients.pushgateway import PushgatewayClient
    from kong_plugin_pgwshard.core.grouping import GroupingKey
    from kong_plugin_pgwshard.core.ring import Member, Ring
    from kong_plugin_pgwshard.sync.daemon import Placement

    pgws = pushgateways(2)
    ring = Ring(Member.parse(p.address) for p in pgws)
    key = GroupingKey.from_labels({"job": "clash", "instance": "x"})
    owner = ring.owner(key).name
    stray = next(p.address for p in pgws if p.address != owner)
    # on the owner, another group holds `jobs` as a counter: the copy of a gauge `jobs` is refused
    PushgatewayClient(owner).put_group(GroupingKey.from_labels({"job": "other"}), "# TYPE jobs counter\njobs 1\n")
    PushgatewayClient(stray).put_group(key, "# TYPE jobs gauge\njobs 2\n")
    settings = parse_settings({"pushgateways": [p.address for p in pgws], "health": {"probes": PROBES},
                               "file_sd": {"path": str(tmp_path / "sd.json")},
                               "rebalance": {"enabled": True, "quiet": "0s"}}, "test")
    caplog.set_level(logging.INFO)

    daemon = Daemon(settings)
    # the daemon's own history: a pass whose history is not the daemon's latest stops (abandoned)
    daemon._reconcile(Placement(ring, tuple(ring.members), daemon.placement.history), "test")

    assert "failed=0" not in caplog.text
    failure = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("clash" in line and "400" in line for line in failure), caplog.text
