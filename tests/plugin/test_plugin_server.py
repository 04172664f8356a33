"""The real plugin server, driven over its unix socket exactly as Kong drives it."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import msgpack
import pytest
from kong_pdk.exception import PluginServerException

from kong_plugin_pgwshard.core.grouping import parse_push_path
from kong_plugin_pgwshard.core.ring import Member, Ring
from kong_plugin_pgwshard.harness.kong_rpc import KongRPC, Request, RPCError, kong_config, run_access
from kong_plugin_pgwshard.harness.processes import proc_stat, wait_until
from kong_plugin_pgwshard.plugin.handler import KONG_SCHEMA
from tests.support import REPO

NODES = ["127.0.0.1:9101", "127.0.0.1:9102", "127.0.0.1:9103"]
RING = Ring(Member.parse(n) for n in NODES)
ROUTE_ID = "7f3c0d1e-0000-4000-8000-000000000001"
PLUGIN_ID = "b1a0c3d2-0000-4000-8000-000000000002"


@pytest.fixture
def server(plugin_server_factory):
    return plugin_server_factory()


@pytest.fixture
def rpc(server):
    client = KongRPC(server.socket_path)
    yield client
    client.close()


def start(rpc, seq=3, **config):
    """An instance started with the config as Kong sends it (defaults filled, injected keys)."""
    conf = kong_config(KONG_SCHEMA, {"nodes": NODES, **config}, plugin_id=PLUGIN_ID, seq=seq, route_id=ROUTE_ID)
    return rpc.start_instance("pgwshard", conf)


def test_dump_lists_what_kong_asks_for():
    out = subprocess.run([sys.executable, "-m", "kong_plugin_pgwshard.plugin.start", "--dump"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    (info,) = json.loads(out)
    assert info["Name"] == "pgwshard" and info["Phases"] == ["access"]
    assert isinstance(info["Priority"], int) and info["Version"]
    fields = info["Schema"]["fields"][0]["config"]["fields"]
    assert {name for f in fields for name in f} >= {"membership", "nodes", "upstream", "route_prefix"}


def test_push_goes_to_the_owner_of_its_group(rpc):
    iid = start(rpc)
    for path in ["/metrics/job/batch", "/metrics/job/batch/instance/a", "/metrics/job/nightly/shard/7/dc/x"]:
        req = run_access(rpc, iid, Request(path))
        owner = RING.owner(parse_push_path(path))
        assert req.target == (owner.host, owner.port), path
        assert req.exit is None


def test_every_spelling_of_a_group_reaches_one_owner(rpc):
    iid = start(rpc)
    spellings = ["/metrics/job/j/a/1/b/2", "/metrics/job/j/b/2/a/1", "/metrics/job@base64/ag/a@base64/MQ==/b/2",
                 "/metrics/job/j/job/other/a/1/b/2", "/metrics/job/j/a/0/a/1/b/2?x=y", "/metrics/job/%6A/a/1/b/%32",
                 # Pushgateway's router matches the decoded path: these are pushes too (issue 14)
                 "/%6detrics/job/j/a/1/b/2", "/metrics/%6Aob/j/a/1/b/2", "/metrics/job%2Fj%2Fa/1/b/2"]
    targets = {run_access(rpc, iid, Request(p)).target for p in spellings}
    assert len(targets) == 1 and None not in targets


def test_reads_are_left_to_the_route(rpc):
    iid = start(rpc)
    for path, method in [("/metrics", "GET"), ("/api/v1/metrics", "GET"), ("/-/healthy", "GET"), ("/", "GET")]:
        req = run_access(rpc, iid, Request(path, method))
        assert req.target is None and req.exit is None
        assert [c[0] for c in req.calls] == ["kong.request.get_raw_path"]


def test_push_costs_two_pdk_calls(rpc):
    iid = start(rpc)
    req = run_access(rpc, iid, Request("/metrics/job/x/a/b"))
    assert [c[0] for c in req.calls] == ["kong.request.get_raw_path", "kong.service.set_target"]


@pytest.mark.parametrize("path, problem", [
    ("/metrics/job/x/a", "odd number of components"),
    ("/metrics/job/", "job name is required"),
    ("/metrics/job/x/__a/1", 'improper label name "__a"'),
    ("/metrics/job/x/a@base64/gA", "not valid UTF-8"),
    ("/metrics/job/x/a/%zz", "invalid URL escape"),
])
def test_bad_push_path_is_answered_400_by_the_gateway(rpc, path, problem):
    iid = start(rpc)
    req = run_access(rpc, iid, Request(path))
    assert req.target is None
    status, body = req.exit
    assert status == 400 and problem in body["message"]


def test_no_members_is_503(rpc, tmp_path):
    sd = tmp_path / "members.json"
    sd.write_text("[]")
    iid = rpc.start_instance("pgwshard", {"membership": "file", "membership_file": str(sd)})
    req = run_access(rpc, iid, Request("/metrics/job/x"))
    assert req.exit[0] == 503 and "no healthy pushgateway" in req.exit[1]["message"]


def test_route_prefix(rpc):
    iid = start(rpc, route_prefix="/pgw")
    assert run_access(rpc, iid, Request("/pgw/metrics/job/x")).target == _owner("/metrics/job/x")
    assert run_access(rpc, iid, Request("/metrics/job/x")).target is None  # not under the prefix


def test_unknown_instance_says_no_plugin_instance(rpc):
    with pytest.raises(RPCError, match="no plugin instance"):
        rpc.call("plugin.HandleEvent", {"InstanceId": 987654, "EventName": "access"})


@pytest.mark.parametrize("config, field", [
    ({"nodes": ["not-a-node"]}, "nodes[0]"),
    ({"membership": "dns"}, "membership"),
    ({"membership": "upstream"}, "upstream"),
    ({"refresh_interval": -1}, "refresh_interval"),
])
def test_bad_config_fails_instance_start_naming_the_field(rpc, config, field):
    with pytest.raises(RPCError, match=f"at '{field}'" .replace("[", r"\[").replace("]", r"\]")):
        start(rpc, **config)
    # the server still serves
    iid = start(rpc)
    assert run_access(rpc, iid, Request("/metrics/job/x")).target is not None


def test_step_on_another_connection_than_its_event(rpc):
    iid = start(rpc)
    req = run_access(rpc, iid, Request("/metrics/job/x/i/1"), rotate_connections=True)
    assert req.target == _owner("/metrics/job/x/i/1")
    assert rpc.connections_opened >= 2


def test_instances_restart_after_a_config_change(rpc):
    old = start(rpc)
    new = start(rpc, nodes=["127.0.0.1:9201"])
    rpc.call("plugin.CloseInstance", old)
    assert run_access(rpc, new, Request("/metrics/job/x")).target == ("127.0.0.1", 9201)
    with pytest.raises(RPCError, match="no plugin instance"):
        rpc.call("plugin.HandleEvent", {"InstanceId": old, "EventName": "access"})


def _owner(path):
    owner = RING.owner(parse_push_path(path))
    return owner.host, owner.port


def test_malformed_and_unknown_rpcs_get_errors_and_the_server_goes_on(rpc, server):
    with pytest.raises(RPCError, match="not supported"):
        rpc.call("plugin.NoSuchThing")
    with pytest.raises(RPCError, match="not supported"):
        rpc.call("other.HandleEvent", {})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:  # not even msgpack RPC
        raw.settimeout(5)
        raw.connect(server.socket_path)
        raw.sendall(msgpack.packb([0, 1, ["not", "a", "name"], "no list"]))
        kind, msgid, error, result = msgpack.Unpacker(io.BytesIO(raw.recv(4096))).unpack()
        assert (kind, msgid, result) == (1, 1, None) and "malformed RPC" in error
        raw.sendall(b"\xc1garbage")  # never valid msgpack: the server drops this connection only
        assert raw.recv(4096) == b""
    for not_rpc in (msgpack.packb(5), msgpack.packb({(1, 2): 1}), msgpack.packb([0, 1])):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.settimeout(5)
            raw.connect(server.socket_path)
            raw.sendall(not_rpc)
            assert raw.recv(4096) == b""
    iid = start(rpc)
    assert run_access(rpc, iid, Request("/metrics/job/x")).target == _owner("/metrics/job/x")


def test_a_raising_plugin_gets_kong_an_error_not_a_hang():
    from kong_pdk.module import Module

    from kong_plugin_pgwshard.plugin.events import PgwshardPluginServer

    class Raises:
        def __init__(self, config):
            pass

        def access(self, kong):
            kong.request.get_raw_path()
            raise RuntimeError("boom")

    ours = PgwshardPluginServer()
    ours.plugins["p"] = Module("p", module=type("m", (), {"Plugin": Raises}))
    iid = ours.start_instance({"Name": "p", "Config": "{}"})["Id"]
    event = ours.handle_event({"InstanceId": iid, "EventName": "access"})
    assert event["Data"]["Method"] == "kong.request.get_raw_path"
    with pytest.raises(PluginServerException, match="boom"):
        ours.step({"EventId": event["EventId"], "Data": "/x"})
    assert ours.events == {}


def test_the_server_exits_when_kong_is_gone(tmp_path):
    # A parent that starts the server and exits once it listens: init adopts the server, as when
    # Kong dies. (A server whose parent is init from the start has no Kong to follow: see
    # test_plugin_supervision.py.)
    log = tmp_path / "server.log"
    launcher = ("import os, subprocess, sys, time; p = subprocess.Popen([sys.executable, '-m', "
                f"'kong_plugin_pgwshard.plugin.start', '-p', {str(tmp_path)!r}], start_new_session=True, "
                f"stdin=subprocess.DEVNULL, stdout=open({str(log)!r}, 'w'), stderr=subprocess.STDOUT)\n"
                f"for _ in range(200):\n    if os.path.exists({str(tmp_path / 'pgwshard.sock')!r}): break\n"
                "    time.sleep(0.1)\nprint(p.pid)")
    pid = int(subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=30,
                             check=True, cwd=REPO).stdout)
    try:
        wait_until(lambda: not os.path.exists(f"/proc/{pid}") or _is_zombie(pid), 20, what="the orphaned server to exit")
        assert "server started" in log.read_text() and "Kong exits" in log.read_text()
    finally:
        if os.path.exists(f"/proc/{pid}") and not _is_zombie(pid):
            os.kill(pid, signal.SIGKILL)


def _is_zombie(pid):
    try:
        return proc_stat(pid)[0] == "Z"
    except FileNotFoundError:
        return True


def test_events_kong_stopped_stepping_are_dropped_after_their_ttl():
    from kong_plugin_pgwshard.plugin.events import EVENT_TTL_SECONDS
    from kong_plugin_pgwshard.plugin.server import build_server

    ours = build_server()
    iid = ours.start_instance({"Name": "pgwshard", "Config": json.dumps({"nodes": NODES})})["Id"]
    abandoned = ours.handle_event({"InstanceId": iid, "EventName": "access"})["EventId"]  # its worker died
    live = ours.handle_event({"InstanceId": iid, "EventName": "access"})["EventId"]
    later = time.monotonic() + EVENT_TTL_SECONDS - 1
    ours.events[live] = (ours.events[live][0], later)  # answered recently

    ours.expire_events(later + 2)

    assert list(ours.events) == [live]
    with pytest.raises(PluginServerException, match="not found"):
        ours.step({"EventId": abandoned, "Data": "/metrics/job/x"})
    assert ours.step({"EventId": live, "Data": "/metrics/job/x"})["Data"]["Method"] == "kong.service.set_target"


def test_a_path_that_is_not_utf8_gets_400_not_a_dropped_connection(rpc, server):
    # Kong packs the raw path as a msgpack str whatever its bytes.
    iid = start(rpc)
    pack = msgpack.Packer(unicode_errors="surrogateescape").pack
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(5)
        raw.connect(server.socket_path)
        unpacker = msgpack.Unpacker(strict_map_key=False, unicode_errors="surrogateescape")

        def call(msgid, method, arg):
            raw.sendall(pack([0, msgid, method, [arg]]))
            while True:
                for message in unpacker:
                    return message[3]
                chunk = raw.recv(4096)
                assert chunk, "the server dropped the connection"
                unpacker.feed(chunk)

        event = call(1, "plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
        answer = call(2, "plugin.Step", {"EventId": event["EventId"], "Data": b"/metrics/job/x/a/\xff".decode(
            "utf-8", "surrogateescape")})
    assert answer["Data"]["Method"] == "kong.response.exit"
    status, body = answer["Data"]["Args"][:2]
    assert status == 400 and "not valid UTF-8" in body["message"]


def test_out_of_file_descriptors_the_server_waits_instead_of_spinning(tmp_path):
    from kong_plugin_pgwshard.harness.processes import ManagedProcess

    server = ManagedProcess("plugin-server-lowfd", ["prlimit", "--nofile=24", sys.executable, "-m",
                                                    "kong_plugin_pgwshard.plugin.start", "-p", str(tmp_path)], cwd=str(REPO))
    server.start()
    held = []
    try:
        wait_until(lambda: os.path.exists(tmp_path / "pgwshard.sock"), 20, what="the socket")
        for _ in range(30):  # more than the server may open
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(tmp_path / "pgwshard.sock"))
            held.append(s)
        wait_until(lambda: "cannot accept" in server.log(), 10, what="the server to run out of descriptors")
        before = server.log().count("cannot accept")
        started = time.monotonic()
        wait_until(lambda: server.log().count("cannot accept") >= before + 2, 10, what="it keeps trying")
        assert time.monotonic() - started >= 0.8  # about one a second, not a flood
        for s in held:
            s.close()
        held.clear()
        rpc = KongRPC(str(tmp_path / "pgwshard.sock"))  # it accepts again once descriptors are free
        iid = rpc.start_instance("pgwshard", {"nodes": NODES})
        assert run_access(rpc, iid, Request("/metrics/job/x")).target == _owner("/metrics/job/x")
        rpc.close()
    finally:
        for s in held:
            s.close()
        server.stop()


def test_a_step_answers_the_rpc_that_carried_it():
    # Kong's Step may come on another connection than its event; were connections served by
    # greenlets of their own (as kong-pdk's gevent listener does), the answer must still go to
    # the one that carried the Step.
    from greenlet import greenlet

    from kong_plugin_pgwshard.plugin.server import build_server

    ours = build_server()
    iid = ours.start_instance({"Name": "pgwshard", "Config": json.dumps({"nodes": NODES})})["Id"]
    main = greenlet.getcurrent()

    def connection_a():
        main.switch(ours.handle_event({"InstanceId": iid, "EventName": "access"}))
        return "connection A's next request"

    event = greenlet(connection_a).switch()
    answer = ours.step({"EventId": event["EventId"], "Data": "/metrics/job/x"})  # on connection B
    assert answer["Data"]["Method"] == "kong.service.set_target"


def test_the_plugin_accepts_every_key_kong_injects(rpc):
    """kong/runloop/plugins_iterator.lua get_plugin_config adds these to every config it sends,
    and process_auto_fields adds $refs when it resolved a vault reference."""
    conf = kong_config(KONG_SCHEMA, {"nodes": NODES}, plugin_id=PLUGIN_ID, seq=9, route_id=ROUTE_ID,
                       service_id="5e1f0000-0000-4000-8000-000000000003",
                       consumer_id="c0000000-0000-4000-8000-000000000004", instance_name="pgw-shard")
    conf["$refs"] = {"admin_token": "{vault://env/kong-admin-token}"}
    assert {"route_id", "service_id", "consumer_id", "plugin_instance_name", "__plugin_id", "__ws_id",
            "__key__", "__seq__"} <= set(conf)
    iid = rpc.start_instance("pgwshard", conf)
    assert run_access(rpc, iid, Request("/metrics/job/x")).target == _owner("/metrics/job/x")


def test_the_driver_sends_defaults_filled_and_unset_fields_absent():
    conf = kong_config(KONG_SCHEMA, {"nodes": NODES}, plugin_id=PLUGIN_ID, seq=1)
    assert conf["membership"] == "static" and conf["route_prefix"] == "" and conf["refresh_interval"] == 2
    # cjson.encode drops nil keys: never null for an unset field or a missing route/service
    assert not {"upstream", "admin_token", "membership_file", "route_id", "service_id"} & set(conf)
    assert conf["__key__"] == f"plugins:pgwshard:::::{conf['__ws_id']}"


def test_a_restarted_server_hands_out_ids_a_stale_one_cannot_reach(tmp_path):
    """Kong workers keep instance ids across a plugin-server restart (process.lua respawns it):
    the new process's ids must not meet the old ones, so a stale id gets "no plugin instance"
    (Kong then starts an instance again) instead of another config's instance."""
    from kong_plugin_pgwshard.harness.processes import PluginServer

    first = PluginServer().start()
    try:
        rpc = KongRPC(first.socket_path)
        old_ids = [start(rpc, seq=s, nodes=[f"127.0.0.1:{9300 + s}"]) for s in range(3)]
        rpc.close()
    finally:
        first.stop()
    second = PluginServer(prefix=first.prefix).start()
    try:
        rpc = KongRPC(second.socket_path)
        new_ids = [start(rpc, seq=s, nodes=["127.0.0.1:9401"]) for s in range(3)]
        assert not set(old_ids) & set(new_ids)
        assert all(0 <= i < 2**32 for i in old_ids + new_ids)  # a msgpack uint32 at most
        for stale in old_ids:
            with pytest.raises(RPCError, match="no plugin instance"):
                rpc.call("plugin.HandleEvent", {"InstanceId": stale, "EventName": "access"})
        rpc.close()
    finally:
        second.stop()


def test_the_driver_restarts_the_instance_when_seq_changes_and_after_a_server_restart():
    """kong/runloop/plugin_servers/plugin.lua get_instance_id and mp_rpc.lua handle_event, driven
    by harness KongPlugin: a new __seq__ starts a new instance and closes the old; a respawned
    server answers the cached id "no plugin instance", and Kong starts one again and retries."""
    from kong_plugin_pgwshard.harness.kong_rpc import KongPlugin
    from kong_plugin_pgwshard.harness.processes import PluginServer

    first = PluginServer().start()
    try:
        plugin = KongPlugin(KongRPC(first.socket_path), KONG_SCHEMA, {"nodes": ["127.0.0.1:9501"]})
        assert plugin.access(Request("/metrics/job/x")).target == ("127.0.0.1", 9501)
        plugin.access(Request("/metrics/job/y"))
        assert len(plugin.started) == 1  # one instance while __seq__ stays
        old = plugin.instance
        plugin.reconfigure({"nodes": ["127.0.0.1:9502"]})  # DB-less: every POST /config
        assert plugin.access(Request("/metrics/job/x")).target == ("127.0.0.1", 9502)
        assert len(plugin.started) == 2
        with pytest.raises(RPCError, match="no plugin instance"):  # Kong closed the old one
            plugin.rpc.call("plugin.HandleEvent", {"InstanceId": old, "EventName": "access"})
    finally:
        first.stop()
    second = PluginServer(prefix=first.prefix).start()
    try:
        plugin.rpc.close()
        plugin.rpc = KongRPC(second.socket_path)
        req = plugin.access(Request("/metrics/job/x"))
        assert req.target == ("127.0.0.1", 9502)
        assert [level for level, _ in req.logs] == ["warn"] and len(plugin.started) == 3
    finally:
        second.stop()


def test_the_driver_answers_500_for_a_failed_start_and_leaves_a_failed_event_to_the_route(tmp_path):
    from kong_plugin_pgwshard.harness.kong_rpc import KongPlugin
    from kong_plugin_pgwshard.harness.processes import PluginServer

    server = PluginServer().start()
    try:
        bad = KongPlugin(KongRPC(server.socket_path), KONG_SCHEMA, {"membership": "upstream"})
        req = bad.access(Request("/metrics/job/x"))
        assert req.exit[0] == 500 and "starting instance" in req.logs[0][1]
        good = KongPlugin(KongRPC(server.socket_path), KONG_SCHEMA, {"nodes": ["127.0.0.1:9501"]})
        good.access(Request("/metrics/job/x"))
    finally:
        server.stop()
    req = good.access(Request("/metrics/job/x"))  # refused: Kong logs it and balances as usual
    assert req.target is None and req.exit is None and req.logs[0][0] == "err"
