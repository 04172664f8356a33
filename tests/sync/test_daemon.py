"""pgwshard-sync against real pushgateways and a real Consul: membership follows health."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from kong_plugin_pgwshard.core.grouping import GroupingKey
from kong_plugin_pgwshard.core.ring import Member, Ring
from kong_plugin_pgwshard.harness.processes import (
    Consul,
    Pushgateway,
    free_port,
    http_get,
    wait_until,
)
from kong_plugin_pgwshard.sync.daemon import Daemon, Damper
from kong_plugin_pgwshard.sync.settings import parse_settings
from tests.support.daemon import file_members, registering_settings, running

CONSUL_TOKEN = "consul-token-never-logged"
KONG_TOKEN = "kong-admin-token-never-logged"


@pytest.fixture
def restart():
    """restart(pgw): the same instance (port, data) started again; stopped when the test ends."""
    started: list[Pushgateway] = []

    def start_again(pgw: Pushgateway) -> Pushgateway:
        started.append(Pushgateway(port=pgw.port, data_dir=pgw.data_dir))
        return started[-1].start()

    yield start_again
    for pgw in started:
        pgw.stop()


def probe_settings(pgws, sd_path, hold_down=1.5):
    return parse_settings({
        "pushgateways": [p.address for p in pgws],
        "health": {"probes": {"interval": 0.2, "timeout": 2.0, "rise": 2, "fall": 1}},
        "membership": {"hold_down": hold_down},
        "file_sd": {"path": str(sd_path)},
        "rebalance": {"enabled": False},
    }, "test")


def test_probes_kill_leaves_restart_rejoins_after_hold_down(pushgateways, restart, tmp_path):
    pgws = pushgateways(3)
    sd = tmp_path / "sd.json"
    everyone = {p.address for p in pgws}
    with running(Daemon(probe_settings(pgws, sd))) as daemon:
        wait_until(lambda: file_members(sd) == everyone, 10, what="all three members")
        pgws[0].kill()
        wait_until(lambda: file_members(sd) == everyone - {pgws[0].address}, 5, what="dead one leaves")
        pgws[0] = restart(pgws[0])
        member = Member.parse(pgws[0].address)
        wait_until(lambda: daemon.source._healthy.get(member) is True, 10, what="the probes see it up")
        assert pgws[0].address not in file_members(sd)  # held down, not re-added at its first success
        wait_until(lambda: file_members(sd) == everyone, 10, what="it rejoins")


def test_flapping_member_stays_out_until_stable(pushgateways, restart, tmp_path):
    pgws = pushgateways(3)
    sd = tmp_path / "sd.json"
    with running(Daemon(probe_settings(pgws, sd, hold_down=2.0))) as daemon:
        wait_until(lambda: len(file_members(sd) or ()) == 3, 10, what="three members")
        flapper = pgws[2]
        member = Member.parse(flapper.address)
        for _ in range(3):  # down and up again faster than the hold-down
            flapper.kill()
            wait_until(lambda: daemon.source._healthy.get(member) is False, 5,
                       what="the probes see it down")
            wait_until(lambda: member.name not in file_members(sd), 5, what="it leaves at once")
            flapper = restart(flapper)
            wait_until(lambda: daemon.source._healthy.get(member) is True, 5, what="the probes see it up")
            assert flapper.address not in file_members(sd)  # healthy again, but held down
            pgws[2] = flapper
        wait_until(lambda: flapper.address in file_members(sd), 10, what="stable flapper rejoins")
        # start, one leave, one rejoin: 3. Undamped, the three flaps would have made 1 + 3 + 3; a
        # probe slow enough on a loaded machine to count as a failure (fall: 1) may add a leave
        # and a rejoin, which is why this is a bound and not an exact count
        assert daemon.registry.get_sample_value("pgwshard_membership_changes_total") < 7


def test_a_truly_empty_set_is_written_after_the_hold_down(pushgateways, tmp_path):
    pgws = pushgateways(2)
    sd = tmp_path / "sd.json"
    with running(Daemon(probe_settings(pgws, sd, hold_down=1.0))):
        wait_until(lambda: len(file_members(sd) or ()) == 2, 10, what="two members")
        for p in pgws:
            p.kill()
        wait_until(lambda: file_members(sd) == set(), 10, what="empty membership")


@pytest.fixture
def consul_stack(consul, pushgateways, kong_admin, tmp_path):
    pgws = pushgateways(3)
    kong = kong_admin()
    settings = parse_settings({
        "pushgateways": [p.address for p in pgws],
        "consul": {"address": consul.url, "token": CONSUL_TOKEN, "wait": "2s", "backoff": [0.2, 0.5],
                   "register": {"enabled": True, "check_interval": "1s", "check_timeout": "1s"}},
        "membership": {"hold_down": "1s"},
        "kong": {"admin_url": kong.url, "upstream": "pushgateways"},
        "file_sd": {"path": str(tmp_path / "sd.json")},
        "rebalance": {"enabled": False},
    }, "test")
    return consul, pgws, kong, settings


def test_consul_membership_follows_health_and_survives_an_outage(consul_stack, restart, caplog):
    consul, pgws, kong, settings = consul_stack
    everyone = sorted(p.address for p in pgws)
    caplog.set_level(logging.INFO)
    daemon = Daemon(settings)
    with running(daemon):
        wait_until(lambda: kong.target_names("pushgateways") == everyone, 20, what="registered and healthy")
        services = json.loads(urllib.request.urlopen(consul.url + "/v1/agent/services", timeout=5).read())
        assert {s["Meta"]["managed-by"] for s in services.values()} == {"pgwshard"}

        pgws[1].kill()
        wait_until(lambda: kong.target_names("pushgateways") == sorted(set(everyone) - {pgws[1].address}), 15,
                   what="killed instance leaves")
        pgws[1] = restart(pgws[1])
        wait_until(lambda: kong.target_names("pushgateways") == everyone, 15, what="restarted instance returns")

        consul.proc.send_signal(signal.SIGSTOP)  # Consul hangs: unreachable is not "nobody is healthy"
        try:
            wait_until(lambda: daemon.registry.get_sample_value("pgwshard_health_source_up") == 0, 30,
                       what="outage reported")
            assert kong.target_names("pushgateways") == everyone
            assert daemon.registry.get_sample_value("pgwshard_health_source_errors_total") >= 1
            # the metric flips just before the line is logged, in the daemon's thread
            wait_until(lambda: "keeping 3 members" in caplog.text, 5, what="outage logged")
        finally:
            consul.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: daemon.registry.get_sample_value("pgwshard_health_source_up") == 1, 30,
                   what="sync resumes")
        pgws[2].kill()  # and changes flow again
        wait_until(lambda: kong.target_names("pushgateways") == sorted(set(everyone) - {pgws[2].address}), 15,
                   what="sync resumed")
    assert CONSUL_TOKEN not in caplog.text


def test_consul_down_at_start_writes_nothing(consul_stack):
    consul, pgws, kong, settings = consul_stack
    consul.stop()
    kong.add_upstream("pushgateways", ["10.9.9.9:9091"])  # what Kong had before the daemon started
    daemon = Daemon(settings)
    with running(daemon):
        wait_until(lambda: (daemon.registry.get_sample_value("pgwshard_health_source_errors_total") or 0) >= 2, 15,
                   what="errors counted")
        assert kong.target_names("pushgateways") == ["10.9.9.9:9091"]
        assert kong.writes == []


def test_consul_restarted_empty_is_re_registered_and_nothing_is_removed(consul_stack):
    consul, pgws, kong, settings = consul_stack
    everyone = sorted(p.address for p in pgws)
    daemon = Daemon(settings)
    with running(daemon):
        wait_until(lambda: kong.target_names("pushgateways") == everyone, 20, what="registered and healthy")
        consul.stop()  # a dev agent comes back with no services: the daemon must register them again
        wait_until(lambda: daemon.registry.get_sample_value("pgwshard_health_source_up") == 0, 15,
                   what="outage reported")
        writes_before = len(kong.writes)
        again = Consul(http_port=consul.http_port)
        try:
            again.start()
            wait_until(lambda: daemon.registry.get_sample_value("pgwshard_health_source_up") == 1, 20,
                       what="sync resumes")
            wait_until(lambda: len(daemon.damper._healthy) == 3, 20, what="re-registered and passing again")
            assert kong.target_names("pushgateways") == everyone
            assert kong.writes[writes_before:] == []  # not emptied while the new registrations were critical
        finally:
            again.stop()


def test_a_restarted_agent_is_noticed_before_a_long_wait_elapses(consul, pushgateways, tmp_path):
    """A blocking query that kept the old agent's index waited the new agent's whole `wait`
    (FIELD-NOTES: ~38 s), with the pushgateways unregistered meanwhile. After an error the query
    starts without an index, and the pushgateways are registered again at its first answer."""
    pgws = pushgateways(2)
    settings = registering_settings(consul, pgws, tmp_path / "sd.json", wait="120s")
    daemon = Daemon(settings)
    with running(daemon):
        wait_until(lambda: len(daemon.damper._healthy) == 2, 20, what="registered and passing")
        consul.stop()
        again = Consul(http_port=consul.http_port)
        try:
            again.start()
            # far less than the 120 s wait an old index would block on
            wait_until(lambda: len(json.loads(http_get(again.url + "/v1/agent/services")[1])) == 2, 30,
                       what="registered again on the new agent")
            wait_until(lambda: len(daemon.damper._healthy) == 2, 30, what="passing again, seen by the daemon")
        finally:
            again.stop()


def sync_process(config_path, *extra, env_token: str) -> subprocess.Popen:
    env = {**os.environ, "KONG_ADMIN_TOKEN": env_token}
    return subprocess.Popen([sys.executable, "-m", "kong_plugin_pgwshard.sync.daemon", "--config", str(config_path), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
                            text=True)


@pytest.fixture
def process_stack(pushgateways, kong_admin, tmp_path):
    pgws = pushgateways(2)
    kong = kong_admin(token=KONG_TOKEN)
    port = free_port()
    config = tmp_path / "pgwshard.yml"
    config.write_text(json.dumps({
        "pushgateways": [p.address for p in pgws],
        "health": {"probes": {"interval": "200ms", "timeout": "500ms"}},
        "kong": {"admin_url": kong.url},
        "file_sd": {"path": str(tmp_path / "sd.json")},
        "rebalance": {"enabled": False},
        "metrics": {"listen": f"127.0.0.1:{port}"},
    }))
    return pgws, kong, config, port


def test_the_process_serves_metrics_logs_json_without_tokens_and_stops_on_sigterm(process_stack, tmp_path):
    pgws, kong, config, port = process_stack
    proc = sync_process(config, env_token=KONG_TOKEN)
    try:
        everyone = sorted(p.address for p in pgws)
        wait_until(lambda: kong.target_names("pushgateways") == everyone, 15, what="targets written")
        wait_until(lambda: b"pgwshard_members 2.0" in http_get(f"http://127.0.0.1:{port}/metrics")[1], 10,
                   what="metrics served")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    assert proc.returncode == 0
    lines = [json.loads(line) for line in err.splitlines()]  # every line is a JSON object
    assert any("membership change" in entry["msg"] for entry in lines) and lines[-1]["msg"] == "stopped"
    assert KONG_TOKEN not in out + err


def test_once_syncs_and_exits(process_stack, tmp_path):
    pgws, kong, config, _ = process_stack
    proc = sync_process(config, "--once", env_token=KONG_TOKEN)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert kong.target_names("pushgateways") == sorted(p.address for p in pgws)
    assert file_members(tmp_path / "sd.json") == {p.address for p in pgws}
    assert KONG_TOKEN not in out + err


def test_damper_rules_on_a_clock():
    now = [0.0]
    damper = Damper(hold_down=5.0, clock=lambda: now[0])
    a, b, c = (Member("127.0.0.1", port) for port in (1, 2, 3))
    damper.observe(frozenset({a, b, c}))
    damper.applied = damper.decide()
    assert damper.applied == {a, b, c}  # the first set applies at once

    damper.observe(frozenset({a, b}))
    damper.applied = damper.decide()
    assert damper.applied == {a, b}  # a failure leaves at once

    damper.observe(frozenset({a, b, c}))
    now[0] = 4.9
    assert damper.decide() == {a, b}  # back, but not for hold_down yet
    now[0] = 5.0
    damper.applied = damper.decide()
    assert damper.applied == {a, b, c}

    damper.settle()  # the source just came back from an outage
    damper.observe(frozenset({a}))
    now[0] = 9.9
    assert damper.decide() == {a, b, c} and damper.next_deadline() == 10.0  # partial view: held
    now[0] = 10.0
    assert damper.decide() == {a}

    damper.observe(frozenset())
    now[0] = 14.9
    assert damper.decide() == damper.applied  # empty: held for hold_down
    now[0] = 15.0
    assert damper.decide() == frozenset()


def test_a_failing_sink_is_counted_and_does_not_hold_back_the_others(pushgateways, kong_admin, tmp_path):
    pgws = pushgateways(2)
    kong = kong_admin()
    kong.stop()  # Kong's Admin API is down for the whole test
    sd = tmp_path / "sd.json"
    settings = parse_settings({
        "pushgateways": [p.address for p in pgws],
        "health": {"probes": {"interval": 0.2, "timeout": 0.5, "rise": 1, "fall": 1}},
        "kong": {"admin_url": kong.url},
        "file_sd": {"path": str(sd)},
        "rebalance": {"enabled": False},
    }, "test")
    daemon = Daemon(settings)
    kong_sink = next(s.name for s in daemon.sinks if s.name.startswith("kong"))
    with running(daemon):
        wait_until(lambda: file_members(sd) == {p.address for p in pgws}, 10, what="file_sd written")
        pgws[0].kill()
        wait_until(lambda: file_members(sd) == {pgws[1].address}, 10, what="file_sd follows health")
        wait_until(lambda: (daemon.registry.get_sample_value("pgwshard_sync_errors_total", {"sink": kong_sink})
                            or 0) >= 2, 10, what="kong failures counted")
        assert daemon.registry.get_sample_value("pgwshard_seconds_since_last_good_sync") == -1


def test_an_applied_change_triggers_a_reconciliation_that_drains_the_leaver(pushgateways, restart, tmp_path):
    pgws = pushgateways(2)
    sd = tmp_path / "sd.json"
    settings = parse_settings({
        "pushgateways": [p.address for p in pgws],
        "health": {"probes": {"interval": 0.2, "timeout": 0.5, "rise": 1, "fall": 1}},
        "membership": {"hold_down": 0.5},
        "file_sd": {"path": str(sd)},
        "rebalance": {"enabled": True, "quiet": "1s", "interval": "60s", "max_ops_per_second": 200},
    }, "test")
    keys = [GroupingKey.from_labels({"job": "batch", "instance": f"i{n}"}) for n in range(32)]
    with running(Daemon(settings)) as daemon:
        wait_until(lambda: file_members(sd) == {p.address for p in pgws}, 10, what="both members")
        pgws[1].kill()
        wait_until(lambda: file_members(sd) == {pgws[0].address}, 10, what="one member left")
        for key in keys:  # pushed while only pgws[0] owns everything
            req = urllib.request.Request(pgws[0].url + key.path(), data=b"batch_done 1\n", method="PUT")
            urllib.request.urlopen(req, timeout=5).close()
        pgws[1] = restart(pgws[1])
        wait_until(lambda: file_members(sd) == {p.address for p in pgws}, 10, what="it rejoins")
        ring = Ring(Member.parse(p.address) for p in pgws)
        theirs = {str(k) for k in keys if ring.owner(k).name == pgws[1].address}
        assert theirs  # 32 keys over two owners of random ports: both own some

        def held_by(pgw) -> set[str]:
            return {str(GroupingKey.from_labels(g["labels"])) for g in pgw.groups()}

        # the rejoin alone triggers the pass (the periodic one is 60 s away)
        wait_until(lambda: held_by(pgws[1]) == theirs and not held_by(pgws[0]) & theirs, 15,
                   what="groups moved to their new owner")
        assert daemon.registry.get_sample_value("pgwshard_rebalance_groups_moved_total") == len(theirs)


def test_drift_in_kong_is_repaired_without_a_membership_change(pushgateways, kong_admin, tmp_path):
    """A Kong node that restarts reloads its declarative file with every target, and targets
    can be edited by hand: the periodic resync puts the healthy set back."""
    pgws = pushgateways(2)
    kong = kong_admin()
    settings = parse_settings({
        "pushgateways": [p.address for p in pgws],
        "health": {"probes": {"interval": 0.2, "timeout": 0.5}},
        "kong": {"admin_url": kong.url},
        "rebalance": {"enabled": False},
    }, "test")
    daemon = Daemon(settings)
    daemon.resync_interval = 0.5
    everyone = sorted(p.address for p in pgws)
    with running(daemon):
        wait_until(lambda: kong.target_names("pushgateways") == everyone, 10, what="targets written")
        kong.add_target("pushgateways", "10.9.9.9:9091")  # stale target
        kong.targets["pushgateways"] = [t for t in kong.targets["pushgateways"] if t["target"] != everyone[0]]
        wait_until(lambda: kong.target_names("pushgateways") == everyone, 10, what="drift repaired")
        writes = len(kong.writes)
        reads = sum(1 for method, *_ in kong.requests if method == "GET")
        # resyncs of an equal set write nothing: wait for two more (each reads the targets)
        wait_until(lambda: sum(1 for method, *_ in kong.requests if method == "GET") >= reads + 4, 10,
                   what="two more resyncs")
        assert len(kong.writes) == writes


def test_a_copy_recreated_on_the_old_owner_after_a_change_is_moved_by_the_follow_up(pushgateways, restart,
                                                                                    tmp_path):
    """Issue 14: a push from a gateway that still routes by the old membership recreated a copy on
    the old owner after the change's pass; it stayed until the periodic pass (60 s here). The
    pass that moves it must be the follow-up (quiet 0: no pass waits for a client's silence)."""
    pgws = pushgateways(2)
    sd = tmp_path / "sd.json"
    settings = parse_settings({
        "pushgateways": [p.address for p in pgws],
        "health": {"probes": {"interval": 0.2, "timeout": 0.5, "rise": 1, "fall": 1}},
        "membership": {"hold_down": 0.5},
        "file_sd": {"path": str(sd)},
        "rebalance": {"enabled": True, "quiet": "0s", "interval": "60s", "max_ops_per_second": 200,
                      "settle": "1s", "follow_up": "3s"},
    }, "test")
    keys = [GroupingKey.from_labels({"job": "batch", "instance": f"i{n}"}) for n in range(8)]

    def put(pgw, key, value):
        req = urllib.request.Request(pgw.url + key.path(), data=f"batch_done {value}\n".encode(), method="PUT")
        urllib.request.urlopen(req, timeout=5).close()

    def held(pgw) -> dict[str, float]:
        return {str(GroupingKey.from_labels(g["labels"])): float(g["batch_done"]["metrics"][0]["value"])
                for g in pgw.groups()}

    with running(Daemon(settings)) as daemon:
        wait_until(lambda: file_members(sd) == {p.address for p in pgws}, 10, what="both members")
        pgws[1].kill()
        wait_until(lambda: file_members(sd) == {pgws[0].address}, 10, what="one member left")
        for key in keys:
            put(pgws[0], key, 1)
        pgws[1] = restart(pgws[1])
        wait_until(lambda: file_members(sd) == {p.address for p in pgws}, 10, what="it rejoins")
        ring = Ring(Member.parse(p.address) for p in pgws)
        theirs = [k for k in keys if ring.owner(k).name == pgws[1].address]
        assert theirs
        wait_until(lambda: [(why, r.moved) for why, r in daemon.passes][-1:] == [("change", len(theirs))], 15,
                   what="the change's pass")
        before = len(daemon.passes)
        put(pgws[0], theirs[0], 2)  # a gateway still on the old membership
        wait_until(lambda: held(pgws[1]).get(str(theirs[0])) == 2 and str(theirs[0]) not in held(pgws[0]),
                   15, what="the late push moved to the owner")
        movers = [why for why, report in list(daemon.passes)[before:] if report.moved]
        assert movers == ["follow-up"]


def test_a_sink_worker_gives_a_drifted_sink_its_last_set_again_between_changes():
    import threading

    from prometheus_client import CollectorRegistry

    from kong_plugin_pgwshard.harness.processes import wait_until
    from kong_plugin_pgwshard.sync.daemon import SinkWorker
    from kong_plugin_pgwshard.sync.metrics import DaemonMetrics

    class Drifting:
        name = "drifting"

        def __init__(self):
            self.applied: list[list[str]] = []
            self.drift = threading.Event()

        def apply(self, members):
            self.applied.append([m.name for m in members])

        def drifted(self) -> bool:
            if self.drift.is_set():
                self.drift.clear()
                return True
            return False

    sink, stop = Drifting(), threading.Event()
    worker = SinkWorker(sink, DaemonMetrics(CollectorRegistry()), stop)
    worker.start()
    try:
        worker.offer(frozenset({Member.parse("a:1")}))
        wait_until(lambda: sink.applied == [["a:1"]], 10, what="the set applied")
        sink.drift.set()  # e.g. a Kong node that reloaded its own file
        wait_until(lambda: sink.applied == [["a:1"], ["a:1"]], 10, what="the set applied again")
    finally:
        stop.set()
        worker.join(5)
