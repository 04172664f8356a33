"""README's "When the plugin server fails", row by row, in real Kong 3.9.3 (DB-less, one worker,
the shipped kong.conf's 1 s / 5 s / 5 s plugin-server timeouts and kong.yml's hash_on path).

The plugin server is run by the test on the socket Kong is told (no start_cmd: Kong leaves an
external server alone and respawns nothing), so each failure lasts as long as the test wants:
the real pgwshard-plugin killed or stopped, or tests/support/scripted_plugin_server.py on the
same socket for RPC errors, garbage, truncated answers and a refused StartInstance. After each,
the real server comes back and pgwshard-sync's rebalancer puts every acknowledged push on its
owner only. tests/stack/test_plugin_server_failure.py holds the OpenResty host to the same rows.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time

import msgpack
import pytest

from kong_plugin_pgwshard.core.grouping import parse_push_path
from kong_plugin_pgwshard.harness.processes import PluginServer, http_request, temp_dir, wait_until
from tests.support.scripted_plugin_server import (
    Notified,
    Raw,
    RPCError,
    ScriptedPluginServer,
    ret,
    started_instance,
)

from .conftest import DblessGateway

pytestmark = pytest.mark.kong

UNEXPECTED = {"message": "An unexpected error occurred"}  # kong/init.lua's 500 body
BODY = b"# TYPE failure_seq gauge\nfailure_seq 1\n"


class World:
    def __init__(self, kong_bin: str):
        self.socket_dir = temp_dir("pgwshard-kong-external-")
        os.chmod(self.socket_dir, 0o711)  # Kong's workers (nobody) pass through to the socket
        self.server: PluginServer | None = None
        self.start_server()
        self.gateway = DblessGateway(
            kong_bin, plugin_socket=self.socket_path, rebalance=True,
            kong_settings={"nginx_worker_processes": "1"},
            sync_settings={"rebalance": {"enabled": True, "interval": "2s", "quiet": "1s", "settle": "1s",
                                         "follow_up": "0s", "max_ops_per_second": 200}})

    @property
    def socket_path(self) -> str:
        return os.path.join(self.socket_dir, "pgwshard.sock")

    def start_server(self) -> None:
        self.server = PluginServer(prefix=self.socket_dir).start()

    def push(self, path: str, timeout: float = 30) -> tuple[int, bytes]:
        return http_request(self.gateway.kong.proxy_url + path, "PUT", BODY, timeout=timeout)

    def stop(self) -> None:
        self.gateway.stop()
        if self.server:
            self.server.stop()


@pytest.fixture(scope="module")
def world(kong_bin):
    w = World(kong_bin)
    try:
        w.gateway.wait_targets({p.address for p in w.gateway.pgws})
        yield w
    finally:
        w.stop()


@pytest.fixture
def routing(world):
    """The real server is back and routing before and after each test."""
    def ensure() -> None:
        if world.server is None or not world.server.running:
            world.start_server()
        assert world.push("/metrics/job/routing-check")[0] == 200
    ensure()
    yield world
    ensure()


def paths(name: str, n: int = 12) -> list[str]:
    return [f"/metrics/job/{name}/instance/i{i}" for i in range(n)]


def test_kong_sends_pushes_on_without_the_plugin_while_its_server_is_dead(routing):
    world, gateway = routing, routing.gateway
    since = gateway.kong.log_offset()
    world.server.kill()
    sent = paths("dead")
    answers = [world.push(p) for p in sent]
    assert [status for status, _ in answers] == [200] * len(sent)  # the worker has its instance
    assert gateway.misplaced(sent)  # by hash_on path, not the ring
    errors = "\n".join(gateway.kong.error_lines(since))
    assert "mp_rpc.lua:178 [pgwshard] trying to connect: connection refused" in errors, errors
    world.start_server()
    gateway.wait_on_owners(sent)


def test_kong_answers_500_when_starting_an_instance_finds_its_server_dead(routing):
    world, gateway = routing, routing.gateway
    world.server.kill()
    assert gateway.post_config()[0] == 201  # a new __seq__: the worker needs a new instance
    # the worker applies the new config a moment after /config answers: until then its old
    # instance's requests go on without the plugin (connection refused)
    wait_until(lambda: world.push("/metrics/job/dead-at-start-warmup")[0] == 500, 15, what="the new config applied")
    since = gateway.kong.log_offset()
    sent = paths("dead-at-start", 3)
    answers = [world.push(p) for p in sent]
    assert [(status, message(body)) for status, body in answers] == [(500, UNEXPECTED)] * len(sent)
    errors = "\n".join(gateway.kong.error_lines(since))
    assert "plugin.lua:283 [pgwshard] starting instance: connection refused" in errors, errors
    assert not any(gateway.holders(parse_push_path(p)) for p in sent)


def test_kong_holds_pushes_for_the_read_timeout_while_its_server_hangs_then_sends_them_on(routing):
    world, gateway = routing, routing.gateway
    sent = paths("hung", 6)
    results: dict[str, tuple[int, float]] = {}

    def one(path: str) -> None:
        began = time.monotonic()
        status, _ = world.push(path)
        results[path] = (status, time.monotonic() - began)

    since = gateway.kong.log_offset()
    os.kill(world.server.proc.pid, signal.SIGSTOP)
    try:
        threads = [threading.Thread(target=one, args=(p,)) for p in sent]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        os.kill(world.server.proc.pid, signal.SIGCONT)
    held = sorted(round(took, 2) for _, took in results.values())
    print(f"pushes held by a hung plugin server: {held} s")
    assert [status for status, _ in results.values()] == [200] * len(sent)
    assert held[0] >= 4.9  # kong.conf's nginx_proxy_lua_socket_read_timeout = 5s, never less
    errors = "\n".join(gateway.kong.error_lines(since))
    assert "mp_rpc.lua:318 [pgwshard] no data" in errors, errors
    gateway.wait_on_owners(sent)


@contextlib.contextmanager
def scripted(world: World, script: dict):
    """The scripted server on Kong's socket instead of the real one (which notices and exits)."""
    world.server.stop()
    peer = ScriptedPluginServer(script, path=world.socket_path).start()
    try:
        yield peer
    finally:
        peer.stop()
        world.start_server()


ROWS = {
    # row: (script, new instance first, Kong's status, its error log says)
    "rpc-error": ({"plugin.HandleEvent": [RPCError("boom")]}, False, 200, "mp_rpc.lua:318 [pgwshard] boom"),
    "garbage": ({"plugin.HandleEvent": [Raw(b"\xc1 not msgpack")]}, False, 500,
                "MessagePack.lua:802: unpack '0xc1' is unimplemented"),
    "truncated": ({"plugin.HandleEvent": [Raw(b"\x94\x01")]}, False, 500, "MessagePack.lua:831: missing bytes"),
    "another-call's-answer": ({"plugin.HandleEvent": [Raw(msgpack.packb([1, 4_000_000, None, None]))]}, False, 500,
                              "mp_rpc.lua:208: unexpected RPC response ID from Go plugin server"),
    "start-instance-refused": ({"plugin.StartInstance": [RPCError("bad config")]}, True, 500,
                               "plugin.lua:283 [pgwshard] starting instance: bad config"),
    # the driver's cases (tests/plugin/test_kong_rpc_driver.py): nothing, or a notification and
    # nothing, before the connection closes
    "closed-before-answering": ({"plugin.HandleEvent": [Raw(b"")]}, False, 200, "mp_rpc.lua:318 [pgwshard] no data"),
    "notification-then-closed": ({"plugin.HandleEvent": [Raw(msgpack.packb([2, "serverPid", 1]))]}, False, 200,
                                 "mp_rpc.lua:318 [pgwshard] no data"),
    # not a failure: a notification before the answer is passed over (mp_rpc.lua Rpc:call)
    "notification-first": ({"plugin.HandleEvent": [Notified(ret())]}, False, 200, None),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_kongs_answer_when_its_plugin_server_misbehaves(routing, row):
    world, gateway = routing, routing.gateway
    script, new_instance, status, logged = ROWS[row]
    script = {"plugin.StartInstance": [started_instance()], **script}
    sent = paths(f"scripted-{row.replace(chr(39), '')}", 6)
    with scripted(world, script) as peer:
        if new_instance:
            assert gateway.post_config()[0] == 201
            # until the worker applied it, its old instance's HandleEvent gets "no method" (200)
            wait_until(lambda: world.push("/metrics/job/warmup")[0] == 500 and "plugin.StartInstance" in peer.methods(),
                       15, what="the new config applied")
        since = gateway.kong.log_offset()
        answers = [world.push(p) for p in sent]
        errors = "\n".join(gateway.kong.error_lines(since))
    assert [s for s, _ in answers] == [status] * len(sent), answers
    if status == 500:
        assert all(message(body) == UNEXPECTED for _, body in answers)
        assert all(not gateway.holders(parse_push_path(p)) for p in sent)
    else:
        gateway.wait_on_owners(sent)
    if logged is None:
        assert errors == "", errors
    else:
        assert logged in errors, errors


def message(body: bytes) -> dict:
    """Kong's error body without its request_id."""
    return {k: v for k, v in json.loads(body).items() if k != "request_id"}
