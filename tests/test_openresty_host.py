"""The OpenResty host: real nginx, the real plugin server, real pushgateways."""
from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from kong_plugin_pgwshard.grouping import parse_push_path
from kong_plugin_pgwshard.ring import Member, Ring
from tests.support.nginx_host import NginxHost
from tests.support.processes import PluginServer, wait_until

BODY = b"# TYPE job_items counter\njob_items 3\n"


def call(url: str, method: str = "PUT", body: bytes | None = BODY, timeout: float = 10) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body if method in ("PUT", "POST") else None, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture
def stack(pushgateways):
    pgws = pushgateways(3)
    server = PluginServer("gevent").start()
    nodes = [p.address for p in pgws]
    host = NginxHost(server.socket_path, {"membership": "static", "nodes": nodes}, nodes).start()
    yield pgws, server, host
    host.stop()
    server.stop()


def holders(pgws, key) -> list[str]:
    from kong_plugin_pgwshard.grouping import GroupingKey
    return [p.address for p in pgws if any(GroupingKey.from_labels(g["labels"]) == key for g in p.groups())]


def test_pushes_land_on_their_owner_and_spread(stack):
    pgws, _, host = stack
    ring = Ring(Member.parse(p.address) for p in pgws)
    paths = [f"/metrics/job/nightly/instance/host-{i}" for i in range(60)]
    for path in paths:
        assert call(host.url + path)[0] == 200
    for path in paths:
        key = parse_push_path(path)
        assert holders(pgws, key) == [ring.owner(key).name]
    assert all(p.groups() for p in pgws)  # every instance took some


def test_reads_go_to_the_upstream(stack):
    pgws, _, host = stack
    assert call(host.url + "/-/healthy", "GET")[0] == 200
    status, body = call(host.url + "/api/v1/status", "GET")
    assert status == 200 and json.loads(body)["status"] == "success"


def test_bad_path_is_400_from_the_gateway_and_reaches_no_pushgateway(stack):
    pgws, _, host = stack
    status, body = call(host.url + "/metrics/job/x/__reserved/1")
    assert status == 400
    assert "improper label name" in json.loads(body)["message"]
    assert all(p.groups() == [] for p in pgws)


def test_delete_reaches_the_owner(stack):
    pgws, _, host = stack
    assert call(host.url + "/metrics/job/gone/a/1")[0] == 200
    assert call(host.url + "/metrics/job/gone/a/1", "DELETE")[0] == 202
    wait_until(lambda: all(p.groups() == [] for p in pgws), 5, what="group deleted")


def test_dead_plugin_server_is_503_with_a_body_and_recovery_restarts_the_instance(stack):
    pgws, server, host = stack
    assert call(host.url + "/metrics/job/a")[0] == 200
    server.kill()
    started = time.monotonic()
    status, body = call(host.url + "/metrics/job/a")
    assert status == 503 and "plugin server is unavailable" in json.loads(body)["message"]
    assert time.monotonic() - started < 5  # answered, not hung until a client timeout
    revived = PluginServer("gevent")
    revived.prefix = server.prefix  # the same socket path
    revived.argv[revived.argv.index("-p") + 1] = server.prefix
    revived.start()
    try:
        # the new server knows no instance: "no plugin instance" makes the host start one again
        statuses = {call(host.url + "/metrics/job/a")[0] for _ in range(6)}
        assert statuses == {200}
        assert "no plugin instance" not in host.error_log() or "started instance" in host.error_log()
    finally:
        revived.stop()


def test_connections_to_the_plugin_server_are_reused(stack):
    _, server, host = stack
    for i in range(300):
        assert call(host.url + f"/metrics/job/k/i/{i % 10}")[0] == 200
    out = subprocess.run(["ss", "-xH", "state", "connected", "src", server.socket_path],
                         capture_output=True, text=True, timeout=10).stdout
    open_connections = len(out.splitlines())
    # 300 requests made ~900 RPCs; with the keepalive pool a handful of connections carry them all
    assert 1 <= open_connections <= 2 * 64, out


def test_a_config_change_starts_a_new_instance_and_closes_the_old(stack):
    pgws, server, host = stack
    assert call(host.url + "/metrics/job/before")[0] == 200
    only = pgws[1].address
    host.set_plugin_config({"membership": "static", "nodes": [only]})
    counter = iter(range(10_000))

    def all_on_the_new_member() -> bool:  # every worker switched (each checks its config file)
        paths = [f"/metrics/job/moved/i/{next(counter)}" for _ in range(20)]
        for path in paths:
            assert call(host.url + path)[0] == 200
        return all(holders(pgws, parse_push_path(p)) == [only] for p in paths)

    wait_until(all_on_the_new_member, 15, interval=0.2, what="new config in use by every worker")
    assert host.error_log().count("started instance") >= 3
    from tests.support.kong_rpc import KongRPC
    status = KongRPC(server.socket_path).call("plugin.GetStatus")
    assert 1 <= len(status["Plugins"]["pgwshard"]["Instances"]) <= 2  # one per worker: old ones closed
