"""The OpenResty host: real nginx, the real plugin server, real pushgateways."""
from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from kong_plugin_pgwshard.core.grouping import parse_push_path
from kong_plugin_pgwshard.core.ring import Member, Ring
from kong_plugin_pgwshard.harness.nginx import NginxHost
from kong_plugin_pgwshard.harness.processes import PluginServer, http_request, wait_until
from tests.support.nginx_host import ProbePluginServer, RPCRelay

BODY = b"# TYPE job_items counter\njob_items 3\n"


def call(url: str, method: str = "PUT", body: bytes | None = BODY, timeout: float = 10) -> tuple[int, bytes]:
    return http_request(url, method, body if method in ("PUT", "POST") else None, timeout)


@pytest.fixture
def stack(pushgateways):
    pgws = pushgateways(3)
    server = PluginServer().start()
    nodes = [p.address for p in pgws]
    host = NginxHost(server.socket_path, {"membership": "static", "nodes": nodes}, nodes).start()
    yield pgws, server, host
    host.stop()
    server.stop()


def holders(pgws, key) -> list[str]:
    from kong_plugin_pgwshard.core.grouping import GroupingKey
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


def test_dead_plugin_server_lets_pushes_through_and_recovery_restarts_the_instance(stack):
    pgws, server, host = stack
    assert call(host.url + "/metrics/job/a")[0] == 200
    server.kill()
    # as Kong does (mp_rpc.lua): logged, and on to the upstream's own balancing (a hash on the
    # path); tests/stack/test_plugin_server_failure.py has the other failures and fail_fast
    assert call(host.url + "/metrics/job/a", timeout=5)[0] == 200  # a hang would raise here
    assert "plugin server unreachable" in host.error_log()
    revived = PluginServer()
    revived.prefix = server.prefix  # the same socket path
    revived.argv[revived.argv.index("-p") + 1] = server.prefix
    revived.start()
    try:
        # the new server knows no instance: "no plugin instance" makes the host start one again
        paths = [f"/metrics/job/back/i/{i}" for i in range(6)]
        assert [call(host.url + p)[0] for p in paths] == [200] * 6
        assert on_their_owners(pgws, paths)
        assert "no plugin instance" in host.error_log() and host.error_log().count("started instance") >= 3
    finally:
        revived.stop()


@contextlib.contextmanager
def relayed_stack(pushgateways, workers: int, **relay_options):
    """3 pushgateways, the plugin server, and the host reaching it through an RPCRelay."""
    pgws = pushgateways(3)
    server = PluginServer().start()
    relay = RPCRelay(server.socket_path, **relay_options).start()
    nodes = [p.address for p in pgws]
    host = NginxHost(relay.path, {"membership": "static", "nodes": nodes}, nodes, workers=workers).start()
    try:
        yield pgws, relay, host
    finally:
        host.stop()
        relay.stop()
        server.stop()


def on_their_owners(pgws, paths) -> bool:
    ring = Ring(Member.parse(p.address) for p in pgws)
    return all(holders(pgws, parse_push_path(p)) == [ring.owner(parse_push_path(p)).name] for p in paths)


def test_500_requests_on_2_workers_reuse_connections_and_steps_move_between_them(pushgateways):
    # the relay hangs up after every 25th answer asking for a PDK call: that event's Step must
    # move to another connection while the others keep theirs
    with relayed_stack(pushgateways, workers=2, close_every=25) as (pgws, relay, host):
        paths = [f"/metrics/job/k/i/{i % 50}" for i in range(500)]
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda path: call(host.url + path, timeout=15)[0], paths))
        assert statuses == [200] * 500
        assert sum(len(p.groups()) for p in pgws) == 50  # each key in one place
        # 500 requests are >= 1500 RPCs (HandleEvent + a Step per PDK call), carried by at most
        # a pool's worth of connections per worker
        assert relay.rpcs >= 1500
        # reused: at most a pool's worth per worker, plus one for each connection hung up on
        assert 1 <= relay.connections <= 2 * 64 + relay.hang_ups
        assert relay.calls_asked >= 1000 and relay.hang_ups == relay.calls_asked // 25  # 2 PDK calls a push
        assert relay.steps_elsewhere >= relay.hang_ups  # each hang-up moved its event's next Step


def test_a_step_on_another_connection_than_its_event_works(pushgateways):
    with relayed_stack(pushgateways, workers=1, close_after_calls=True) as (pgws, relay, host):
        paths = [f"/metrics/job/moving/i/{i}" for i in range(20)]
        for path in paths:
            assert call(host.url + path)[0] == 200, host.error_log()[-1500:]
        assert on_their_owners(pgws, paths)
        assert relay.steps_elsewhere >= 40  # get_raw_path and set_target, each on a new connection


def test_answers_arriving_in_pieces_are_read_to_their_end(pushgateways):
    with relayed_stack(pushgateways, workers=1, split_answers=True) as (pgws, relay, host):
        paths = [f"/metrics/job/slow/i/{i}" for i in range(10)]
        for path in paths:
            assert call(host.url + path)[0] == 200, host.error_log()[-1500:]
        assert on_their_owners(pgws, paths)
        assert call(host.url + "/metrics/job/slow/odd")[0] == 400  # an exit's answer, in pieces too
        assert relay.rpcs >= 32


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
    from kong_plugin_pgwshard.harness.kong_rpc import KongRPC
    status = KongRPC(server.socket_path).call("plugin.GetStatus")
    assert 1 <= len(status["Plugins"]["pgwshard"]["Instances"]) <= 2  # one per worker: old ones closed


def test_a_config_the_plugin_refuses_fails_the_hosts_requests_until_it_is_fixed(stack):
    """Kong starts an instance for a new config on every request (plugin.lua, a new __seq__) and
    a failed start raises: 500, not the old config's routing (the host kept the old instance)."""
    pgws, server, host = stack
    assert call(host.url + "/metrics/job/before")[0] == 200
    host.set_plugin_config({"membership": "static", "nodes": ["pgw-without-port"]})
    counter = iter(range(10_000))

    def every_push_refused() -> bool:  # every worker noticed (each checks its config file)
        return all(call(host.url + f"/metrics/job/bad/i/{next(counter)}")[0] == 500 for _ in range(10))

    wait_until(every_push_refused, 15, interval=0.2, what="the refused config in force in every worker")
    only = pgws[1].address
    host.set_plugin_config({"membership": "static", "nodes": [only]})

    def all_on_the_fixed_member() -> bool:
        paths = [f"/metrics/job/fixed/i/{next(counter)}" for _ in range(10)]
        return (all(call(host.url + path)[0] == 200 for path in paths)
                and all(holders(pgws, parse_push_path(p)) == [only] for p in paths))

    wait_until(all_on_the_fixed_member, 15, interval=0.2, what="the fixed config in force in every worker")
    from kong_plugin_pgwshard.harness.kong_rpc import KongRPC
    status = KongRPC(server.socket_path).call("plugin.GetStatus")
    assert 1 <= len(status["Plugins"]["pgwshard"]["Instances"]) <= 2  # one per worker: the old ones closed


@contextlib.contextmanager
def probe_host(pushgateways, ours: bool):
    """The host in front of the test-only probe plugin (tests/support/pdk_probe_plugin.py)."""
    pgw = pushgateways(1)[0]
    server = ProbePluginServer(ours=ours).start()
    host = NginxHost(server.socket_path, {"tag": "t-42"}, [pgw.address], workers=1, read_timeout_ms=1000).start()
    try:
        yield host
    finally:
        host.stop()
        server.stop()


@pytest.fixture(params=["kong-pdk", "pgwshard-plugin"])
def probe(request, pushgateways):
    """The PDK answers must reach the plugin alike under kong-pdk's own server and pgwshard-plugin."""
    with probe_host(pushgateways, ours=request.param == "pgwshard-plugin") as host:
        yield host


@pytest.fixture
def stock_probe(pushgateways):
    # Only kong-pdk's threads mode survives a phase that blocks; pgwshard-plugin runs phases on
    # one thread, and a phase must not block (its docstring).
    with probe_host(pushgateways, ours=False) as host:
        yield host


def test_an_unknown_pdk_method_reaches_the_plugin_as_nil(probe):
    # Kong's call_pdk_method (mp_rpc.lua) finds no method, logs it and answers a plain Step
    status, body = call(probe.url + "/probe/unknown", "GET")
    assert (status, json.loads(body)) == (200, {"result_is_none": True})
    assert "could not find pdk method: kong.nope.nothing" in probe.error_log()


def test_request_pdk_answers_and_nil_results(probe):
    req = urllib.request.Request(probe.url + "/probe/nil?a=1&b=two", headers={"X-Probe": "p1"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        answer = json.loads(resp.read())
    assert answer == {"absent_is_none": True, "method": "GET", "query": {"a": "1", "b": "two"}, "header": "p1"}


def test_exit_sends_a_table_as_json_with_headers_and_log_reaches_the_error_log(probe):
    req = urllib.request.Request(probe.url + "/probe/log", method="GET")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 201
        assert resp.headers["Content-Type"].startswith("application/json")
        assert resp.headers["X-Probe"] == "yes"
        assert json.loads(resp.read()) == {"logged": True}
    wait_until(lambda: "probe-marker t-42 7" in probe.error_log(), 5, what="kong.log line in the error log")
    assert call(probe.url + "/probe/text", "GET") == (418, b"plain text body")


def test_a_hung_plugin_lets_the_request_through_and_other_requests_still_work(stock_probe):
    # read timeout 1 s, then on to the upstream as Kong does: the pushgateway has no /probe/hang
    status, _ = call(stock_probe.url + "/probe/hang", "GET", timeout=10)
    assert status == 404
    assert "plugin server read failed: timeout" in stock_probe.error_log()
    assert call(stock_probe.url + "/probe/nil", "GET")[0] == 200
    # a request the plugin leaves alone goes to the upstream
    assert call(stock_probe.url + "/-/healthy", "GET")[0] == 200


def test_a_restart_under_concurrent_requests_starts_one_instance_per_worker(stack):
    pgws, server, host = stack
    assert call(host.url + "/metrics/job/a")[0] == 200
    server.stop()
    revived = PluginServer()
    revived.prefix = server.prefix  # the same socket path
    revived.argv[revived.argv.index("-p") + 1] = server.prefix
    revived.start()
    try:
        # every request of a burst meets "no plugin instance"; only one per worker may start one
        started_before = host.error_log().count("started instance")
        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(lambda i: call(host.url + f"/metrics/job/burst/i/{i}")[0], range(64)))
        assert statuses == [200] * 64
        # counted where they start (the host logs each start), not by what survives: an
        # instance started and closed again would not show in GetStatus
        started = host.error_log().count("started instance") - started_before
        assert 1 <= started <= 2, host.error_log()[-3000:]  # 2 workers
        from kong_plugin_pgwshard.harness.kong_rpc import KongRPC
        instances = KongRPC(revived.socket_path).call("plugin.GetStatus")["Plugins"]["pgwshard"]["Instances"]
        assert len(instances) == started, instances  # and none left behind
    finally:
        revived.stop()
