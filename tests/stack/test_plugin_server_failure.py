"""When the plugin server fails, the nginx host answers as Kong 3.9.3 does
(kong/runloop/plugin_servers/rpc/mp_rpc.lua, plugin.lua; kong/init.lua), or 503 with fail_fast.

Kong mode (the host's defaults): a failed HandleEvent lets the request go on to the upstream's
own balancing, here a hash on the path as in the shipped kong.yml; a failed StartInstance, a
malformed answer or a throwing PDK call is 500. Real nginx, real pushgateways; the real
pgwshard-plugin killed or stopped, or a scripted fake peer for RPC errors and garbage.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest
import yaml

from kong_plugin_pgwshard.core.grouping import GroupingKey, parse_push_path
from kong_plugin_pgwshard.core.ring import Member, Ring
from kong_plugin_pgwshard.harness.nginx import NginxHost
from kong_plugin_pgwshard.harness.processes import ManagedProcess, PluginServer, http_request, temp_dir, wait_until
from tests.support.scripted_plugin_server import (
    Notified,
    Raw,
    RPCError,
    ScriptedPluginServer,
    pdk_call,
    ret,
    started_instance,
)

REPO = Path(__file__).resolve().parents[2]
UNEXPECTED = {"message": "An unexpected error occurred"}  # Kong's 500 body (kong/init.lua)
UNAVAILABLE = "pgwshard: the plugin server is unavailable"  # the host's fail_fast 503


def push(url: str, value: int = 1, method: str = "PUT", timeout: float = 15) -> tuple[int, bytes]:
    return http_request(url, method, f"# TYPE failover_seq gauge\nfailover_seq {value}\n".encode(), timeout)


def holders(pgws, path: str) -> list[str]:
    key = parse_push_path(path)
    return [p.address for p in pgws if any(GroupingKey.from_labels(g["labels"]) == key for g in p.groups())]


def owner(pgws, path: str) -> str:
    return Ring(Member.parse(p.address) for p in pgws).owner(parse_push_path(path)).name


def restart(server: PluginServer) -> PluginServer:
    """A new pgwshard-plugin on the dead one's socket, as Kong respawns it (process.lua)."""
    revived = PluginServer()
    revived.prefix = server.prefix
    revived.argv[revived.argv.index("-p") + 1] = server.prefix
    return revived.start()


@contextlib.contextmanager
def stopped(server: PluginServer):
    """The plugin server hung: alive, its socket accepting, nothing answered."""
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


@contextlib.contextmanager
def real_stack(pushgateways, **host_settings):
    pgws = pushgateways(3)
    server = PluginServer().start()
    nodes = [p.address for p in pgws]
    read_timeout_ms = host_settings.pop("read_timeout_ms", 5000)
    host = NginxHost(server.socket_path, {"membership": "static", "nodes": nodes}, nodes,
                     read_timeout_ms=read_timeout_ms, host_settings=host_settings).start()
    try:
        yield pgws, server, host
    finally:
        host.stop()
        server.stop()


PATHS = [f"/metrics/job/outage/instance/i-{i}" for i in range(12)]


def test_a_dead_plugin_server_lets_pushes_through_to_one_target_per_path(pushgateways):
    with real_stack(pushgateways) as (pgws, server, host):
        assert push(host.url + "/metrics/job/before")[0] == 200
        server.kill()
        for _ in range(3):  # round robin would spread each group over the three
            assert [push(host.url + p)[0] for p in PATHS] == [200] * len(PATHS)
        assert all(len(holders(pgws, p)) == 1 for p in PATHS)
        assert len({holders(pgws, p)[0] for p in PATHS}) > 1  # hashed, not all to one
        assert "the request goes on without the plugin" in host.error_log()


def test_a_hung_plugin_server_holds_pushes_for_the_read_timeout_then_lets_them_through(pushgateways):
    with real_stack(pushgateways, read_timeout_ms=1000) as (pgws, server, host):
        assert push(host.url + "/metrics/job/before")[0] == 200
        with stopped(server):
            paths = PATHS[:3]
            for _ in range(2):
                assert [push(host.url + p)[0] for p in paths] == [200] * 3
            assert all(len(holders(pgws, p)) == 1 for p in paths)
        # answering again: pushes go to their owners
        after = "/metrics/job/after/instance/x"
        wait_until(lambda: push(host.url + after)[0] == 200 and holders(pgws, after) == [owner(pgws, after)],
                   15, what="the plugin routing again")


def test_a_dead_or_hung_plugin_server_is_503_with_fail_fast(pushgateways):
    with real_stack(pushgateways, fail_fast=True, read_timeout_ms=1000) as (pgws, server, host):
        assert push(host.url + "/metrics/job/before")[0] == 200
        with stopped(server):
            status, body = push(host.url + "/metrics/job/hung")
            assert (status, json.loads(body)["message"]) == (503, UNAVAILABLE)
        server.kill()
        status, body = push(host.url + "/metrics/job/dead")
        assert (status, json.loads(body)["message"]) == (503, UNAVAILABLE)
        assert holders(pgws, "/metrics/job/hung") == holders(pgws, "/metrics/job/dead") == []


@contextlib.contextmanager
def scripted_host(pushgateways, script: dict, **host_settings):
    """One worker (one instance) in front of a scripted plugin server and one pushgateway."""
    pgw = pushgateways(1)[0]
    with ScriptedPluginServer(script) as peer:
        host = NginxHost(peer.path, {"membership": "static"}, [pgw.address], workers=1,
                         read_timeout_ms=2000, host_settings=host_settings).start()
        try:
            yield pgw, peer, host
        finally:
            host.stop()


@pytest.mark.parametrize("fail_fast", [False, True])
def test_an_rpc_error_from_handle_event_lets_the_request_through_or_503(pushgateways, fail_fast):
    script = {"plugin.StartInstance": [started_instance()], "plugin.HandleEvent": [RPCError("boom")]}
    with scripted_host(pushgateways, script, fail_fast=fail_fast) as (pgw, _, host):
        status, body = push(host.url + "/metrics/job/rpc-error")
        if fail_fast:
            assert (status, json.loads(body)["message"]) == (503, UNAVAILABLE)
            assert pgw.groups() == []
        else:
            assert status == 200
            assert [g["labels"]["job"] for g in pgw.groups()] == ["rpc-error"]
        assert "boom" in host.error_log()


@pytest.mark.parametrize("answer", [Raw(b"\xc1 not msgpack"), Raw(b"\x94\x01"),
                                    Raw(msgpack.packb([1, 4_000_000, None, None]))],
                         ids=["garbage", "truncated", "another-call's-answer"])
def test_a_malformed_answer_is_500_as_kong_raises(pushgateways, answer):
    script = {"plugin.StartInstance": [started_instance()], "plugin.HandleEvent": [answer]}
    with scripted_host(pushgateways, script) as (pgw, _, host):
        status, body = push(host.url + "/metrics/job/garbage")
        assert (status, json.loads(body)) == (500, UNEXPECTED)
        assert pgw.groups() == []


def test_a_notification_before_an_answer_is_passed_over_as_kong_does(pushgateways):
    # mp_rpc.lua Rpc:call handles [2, label, args] and reads on (the host answered 500)
    script = {"plugin.StartInstance": [Notified(started_instance())],
              "plugin.HandleEvent": [Notified(pdk_call("kong.service.set_target", "127.0.0.1", 1))],
              "plugin.Step": [ret()]}
    with scripted_host(pushgateways, script) as (pgw, peer, host):
        status, _ = push(host.url + "/metrics/job/notified")
        # the plugin's target was taken (nothing listens on port 1), not the upstream's hash
        assert status == 502 and pgw.groups() == []
        assert "plugin.Step" in [method for method, _ in peer.calls]  # the PDK call was answered


def test_a_notification_then_silence_is_no_data_and_the_request_goes_on(pushgateways):
    # Kong's unpacker protects a read at a message boundary: "no data", not a decoder error
    script = {"plugin.StartInstance": [started_instance()],
              "plugin.HandleEvent": [Raw(msgpack.packb([2, "serverPid", 1]))]}
    with scripted_host(pushgateways, script) as (pgw, _, host):
        status, _ = push(host.url + "/metrics/job/notified-then-closed")
        assert status == 200 and [g["labels"]["job"] for g in pgw.groups()] == ["notified-then-closed"]


@pytest.mark.parametrize("fail_fast", [False, True])
def test_a_failed_start_instance_is_500_or_503(pushgateways, fail_fast):
    script = {"plugin.StartInstance": [RPCError("bad config")]}
    with scripted_host(pushgateways, script, fail_fast=fail_fast) as (pgw, _, host):
        status, body = push(host.url + "/metrics/job/no-instance")
        if fail_fast:
            assert (status, json.loads(body)["message"]) == (503, UNAVAILABLE)
        else:
            assert (status, json.loads(body)) == (500, UNEXPECTED)
        assert pgw.groups() == []
        assert "starting instance: bad config" in host.error_log()


def test_a_server_that_keeps_forgetting_instances_is_retried_three_times_then_passed(pushgateways):
    script = {"plugin.StartInstance": [started_instance()],
              "plugin.HandleEvent": [RPCError("no plugin instance 7")]}
    with scripted_host(pushgateways, script) as (pgw, peer, host):
        before = peer.methods().count("plugin.StartInstance")
        assert push(host.url + "/metrics/job/forgetful")[0] == 200
        # Kong would loop without end (mp_rpc.lua); the host bounds it (pgwshard_host.lua)
        assert peer.methods().count("plugin.StartInstance") - before == 3
        assert [g["labels"]["job"] for g in pgw.groups()] == ["forgetful"]


def test_an_unknown_pdk_method_is_answered_by_a_step_without_data(pushgateways):
    script = {"plugin.StartInstance": [started_instance()],
              "plugin.HandleEvent": [pdk_call("kong.nope.nothing", 1)], "plugin.Step": [ret()]}
    with scripted_host(pushgateways, script) as (pgw, peer, host):
        assert push(host.url + "/metrics/job/unknown")[0] == 200  # then "ret": on to the upstream
        steps = [args for method, args in peer.calls if method.startswith("plugin.Step")]
        assert steps and all(m == "plugin.Step" for m, _ in peer.calls if m.startswith("plugin.Step"))
        assert steps[-1] == [{"EventId": 1}]  # no Data, as Kong's call_pdk_method returns nothing
        assert "could not find pdk method: kong.nope.nothing" in host.error_log()


@pytest.mark.parametrize("args", [("only-a-host",), ("127.0.0.1", 9091.5), ("127.0.0.1", 70000), (9091, 9091)])
def test_a_throwing_pdk_call_is_500(pushgateways, args):
    # set_target raises as kong/pdk/service.lua does: a host that is not a string, a port that is
    # not an integer in 0..65535 (the host let 9091.5 and 70000 through to a 502 at the balancer)
    script = {"plugin.StartInstance": [started_instance()],
              "plugin.HandleEvent": [pdk_call("kong.service.set_target", *args)], "plugin.Step": [ret()]}
    with scripted_host(pushgateways, script) as (pgw, peer, host):
        status, body = push(host.url + "/metrics/job/throws")
        assert (status, json.loads(body)) == (500, UNEXPECTED)
        assert pgw.groups() == []


def _nginx_ms(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m)?", value).groups()
    return int(number) * {"ms": 1, "s": 1000, "m": 60_000, None: 1000}[unit]


def shipped_kong_settings() -> dict:
    """The host settings that make it fail as Kong does with the shipped kong/kong.conf and
    kong/kong.yml: the upstream's hash_on, the plugin-server socket timeouts."""
    conf = {}
    for line in (REPO / "kong" / "kong.conf").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = (part.strip() for part in line.split("=", 1))
            conf[key] = value
    (upstream,) = yaml.safe_load((REPO / "kong" / "kong.yml").read_text())["upstreams"]
    return {"fail_fast": False, "hash_on": upstream.get("hash_on", "none"),
            **{f"{phase}_timeout_ms": _nginx_ms(conf.get(f"nginx_proxy_lua_socket_{phase}_timeout", "60s"))
               for phase in ("connect", "send", "read")}}


@pytest.mark.parametrize("declarative", ["kong/kong.yml", "docker/kong.yml"])
def test_the_shipped_kong_configs_hash_pushes_on_the_path_and_bound_the_waits(declarative):
    # Kong's upstream: hash_on path turns the algorithm to consistent-hashing
    # (kong/db/schema/entities/upstreams.lua); round robin would spread a group's pushes.
    upstreams = yaml.safe_load((REPO / declarative).read_text())["upstreams"]
    assert [u.get("hash_on") for u in upstreams] == ["path"]
    settings = shipped_kong_settings()
    # nginx_proxy_* reaches the proxy server block, where Kong calls the plugin server
    # (kong/templates/nginx_kong.lua); nginx's own default would be 60 s
    assert all(1000 <= settings[f"{phase}_timeout_ms"] <= 10_000 for phase in ("connect", "send", "read"))


def test_the_rendered_host_waits_on_the_plugin_server_as_the_shipped_kong_conf():
    from kong_plugin_pgwshard.host.render import render

    prefix = Path(temp_dir("pgwshard-render-"))
    os.chmod(prefix, 0o755)  # nginx workers (never root) must reach it
    render(str(prefix), "127.0.0.1:1", str(prefix / "absent.sock"), {"nodes": ["127.0.0.1:9091"]},
           ["127.0.0.1:9091"])
    rendered = json.loads((prefix / "host.json").read_text())
    shipped = shipped_kong_settings()
    assert {k: rendered[k] for k in shipped if k.endswith("_timeout_ms")} == \
        {k: v for k, v in shipped.items() if k.endswith("_timeout_ms")}


class PushLoad:
    """Threads pushing their own groups in turn, each push one higher than the group's last;
    records per group the last value a 2xx acknowledged, and every status seen."""

    def __init__(self, url: str, threads: int, groups_per_thread: int):
        self.url = url
        self.paths = [[f"/metrics/job/load/instance/t{t}-g{g}" for g in range(groups_per_thread)]
                      for t in range(threads)]
        self.acked: dict[str, int] = {}
        self.acked_at: dict[str, float] = {}
        self.statuses: dict[int | str, int] = {}
        self.pushes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(paths,), daemon=True) for paths in self.paths]

    def start(self) -> PushLoad:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self, paths: list[str]) -> None:
        value = 0
        while not self._stop.is_set():
            value += 1
            for path in paths:
                try:
                    status = push(self.url + path, value)[0]
                except OSError as exc:
                    status = type(exc).__name__
                with self._lock:
                    self.pushes += 1
                    self.statuses[status] = self.statuses.get(status, 0) + 1
                    if status == 200:
                        self.acked[path], self.acked_at[path] = value, time.monotonic()

    def all_acked_since(self, moment: float) -> bool:
        with self._lock:
            return all(self.acked_at.get(p, 0) > moment for paths in self.paths for p in paths)


def value_on(pgw, path: str) -> float | None:
    key = parse_push_path(path)
    for g in pgw.groups():
        if GroupingKey.from_labels(g["labels"]) == key:
            return float(g["failover_seq"]["metrics"][0]["value"])
    return None


def test_a_plugin_server_killed_under_push_load_loses_nothing_once_it_is_back(pushgateways):
    """The Kong path end to end: the plugin server dies under load, pushes go on to the path hash
    (each group to one target, often not its owner), Kong respawns the server, and one
    reconcile interval of pgwshard-sync later every acknowledged group is on its owner only,
    with the last value a 2xx acknowledged."""
    pgws = pushgateways(3)
    nodes = [p.address for p in pgws]
    work = temp_dir("pgwshard-failover-")
    members_file = f"{work}/members.json"
    interval = 3.0
    with open(f"{work}/pgwshard.yml", "w") as f:
        yaml.safe_dump({"pushgateways": nodes,
                        "health": {"source": "probes", "probes": {"interval": "0.5s", "timeout": "1s"}},
                        "file_sd": {"path": members_file},
                        "rebalance": {"enabled": True, "interval": f"{interval}s", "max_ops_per_second": 200},
                        "metrics": {"listen": "127.0.0.1:0"}}, f)
    daemon = ManagedProcess("pgwshard-sync", [sys.executable, "-m", "kong_plugin_pgwshard.sync.daemon",
                                              "--config", f"{work}/pgwshard.yml"]).start()
    server = PluginServer().start()
    host = None
    load = None
    try:
        def members() -> list[str]:
            with open(members_file) as f:
                return sorted(json.load(f)[0]["targets"])

        wait_until(lambda: members() == sorted(nodes), 30, what="pgwshard-sync to write all three members")
        host = NginxHost(server.socket_path, {"membership": "file", "membership_file": members_file,
                                              "refresh_interval": 0.5}, nodes,
                         host_settings=shipped_kong_settings()).start()
        load = PushLoad(host.url, threads=3, groups_per_thread=6).start()
        wait_until(lambda: len(load.acked) == 18, 30, what="every load group pushed once")

        server.kill()
        pushes_then = load.pushes
        # Groups only ever pushed while the server is dead: their one copy must be moved.
        lonely = [f"/metrics/job/lonely/instance/l{i}" for i in range(30)]
        assert [push(host.url + p, 1)[0] for p in lonely] == [200] * len(lonely)
        wait_until(lambda: load.pushes - pushes_then >= 60, 30, what="the load going on without the plugin")
        misplaced = [p for p in lonely if holders(pgws, p) != [owner(pgws, p)]]
        assert misplaced  # the path hash is not pgwshard's ring: some went elsewhere

        server = restart(server)
        back_at = time.monotonic()
        # Two rounds of every load group after the restart: the last push of each is to its owner,
        # after any reconciliation that listed the groups while the server was dead.
        wait_until(lambda: load.all_acked_since(back_at), 30, what="every load group pushed after the restart")
        second_round = time.monotonic()
        wait_until(lambda: load.all_acked_since(second_round), 30, what="a second round of the load")
        load.stop()
        assert set(load.statuses) == {200}, load.statuses  # Kong mode: no 5xx, not even at the kill

        acked = {**load.acked, **{p: 1 for p in lonely}}

        def converged() -> bool:
            return all(holders(pgws, p) == [owner(pgws, p)] for p in acked)

        wait_until(converged, 3 * interval + 15, interval=0.5, what="every acknowledged group on its owner only")
        by_address = {p.address: p for p in pgws}
        lost = {p: (v, value_on(by_address[owner(pgws, p)], p)) for p, v in acked.items()
                if value_on(by_address[owner(pgws, p)], p) != v}
        assert lost == {}
    finally:
        if load:
            load.stop()
        if host:
            host.stop()
        server.stop()
        daemon.stop()
