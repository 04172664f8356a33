"""Every HTTP client of the control path against remotes that misbehave: bytes that are not HTTP,
an answer that never comes, and an `http_proxy` in the environment that must receive nothing.

The clients: Kong's Admin API client (pgwshard-sync's sinks, the CLI), the plugin's reader of
Kong's targets, the pushgateway client (rebalancer, CLI), the health probes, and Consul (py-consul,
mapped into the same error tree)."""
from __future__ import annotations

import threading

import pytest

from kong_plugin_pgwshard.clients.http import HttpClient
from kong_plugin_pgwshard.clients.kong import KongAdmin
from kong_plugin_pgwshard.clients.pushgateway import PushgatewayClient
from kong_plugin_pgwshard.core.ring import Member
from kong_plugin_pgwshard.errors import (
    ClientStatusError,
    ProtocolError,
    ServerStatusError,
    TransportError,
    UpstreamError,
    UpstreamTimeout,
    status_error,
)
from kong_plugin_pgwshard.harness.processes import free_port
from kong_plugin_pgwshard.plugin.membership import read_upstream_targets
from kong_plugin_pgwshard.sync.health.consul import ConsulHealth
from kong_plugin_pgwshard.sync.health.probes import ProbeHealth
from kong_plugin_pgwshard.sync.settings import ConsulSettings, ProbeSettings
from tests.support.raw_servers import RawServer

TOKEN = "admin-token-never-to-a-proxy"


def _consul(address: str) -> None:
    source = ConsulHealth(ConsulSettings(address=f"http://{address}", token=TOKEN))
    source.client.http.connections_timeout = 0.5
    source.query(0)


# each: a call that raises the mapped UpstreamError (the probe's own call is its client's request)
CALLS = {
    "kong-admin": lambda a: KongAdmin(f"http://{a}", TOKEN, timeout=0.5).targets("pushgateways"),
    "plugin-membership": lambda a: read_upstream_targets(f"http://{a}", "pushgateways", TOKEN, timeout=0.5),
    "pushgateway": lambda a: PushgatewayClient(a, timeout=0.5).groups(),
    "probe": lambda a: ProbeHealth([Member.parse(a)], ProbeSettings(timeout=0.5))._clients[Member.parse(a)].request(
        "GET", "/-/healthy", ok=(200,)),
    "consul": _consul,
}


@pytest.mark.parametrize("client", CALLS)
def test_an_answer_that_is_not_http_is_a_protocol_error(client):
    with RawServer("garbage") as server, pytest.raises(ProtocolError) as err:
        CALLS[client](server.address)
    assert err.value.__cause__ is not None  # the library's own error stays chained
    assert TOKEN not in str(err.value)


@pytest.mark.parametrize("client", CALLS)
def test_an_answer_that_never_comes_is_a_timeout(client):
    with RawServer("hang") as server, pytest.raises(UpstreamTimeout):
        CALLS[client](server.address)


@pytest.mark.parametrize("client", CALLS)
def test_an_environment_proxy_receives_nothing(client, monkeypatch):
    """urllib (and requests by default) honour http_proxy even for 127.0.0.1: the Admin API
    token went to whatever proxy the shell had set. Nothing may reach it now."""
    with RawServer("record") as proxy:
        for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.setenv(name, proxy.url)
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        with pytest.raises(TransportError):  # straight to the (closed) port: refused
            CALLS[client](f"127.0.0.1:{free_port()}")
        assert proxy.connections == 0 and TOKEN.encode() not in proxy.received


def test_the_probe_of_a_garbage_answer_is_unhealthy_and_the_round_goes_on(stop):
    """One target answering non-HTTP bytes used to raise out of ProbeHealth.watch: no health was
    applied again for any pushgateway."""
    with RawServer("garbage") as bad, RawServer("hang") as hung:
        members = [Member.parse(bad.address), Member.parse(hung.address)]
        snapshot = next(ProbeHealth(members, ProbeSettings(interval=0.1, timeout=0.5)).watch(stop))
    assert snapshot.members == frozenset()


def test_a_configured_proxy_is_used_and_gets_no_token_unless_asked(kong_admin):
    """`kong.proxy` is the one way through a proxy: explicit, and then the proxy sees the call."""
    with RawServer("record") as proxy:
        with pytest.raises(UpstreamError):
            KongAdmin("http://kong.invalid:8001", timeout=0.5, proxy=proxy.url).targets("u")
        assert b"GET http://kong.invalid:8001/upstreams/u/targets" in bytes(proxy.received)


def test_statuses_map_to_their_types(kong_admin):
    kong = kong_admin()
    client = HttpClient(kong.url, retries=0)
    with pytest.raises(ClientStatusError) as err:
        client.request("GET", "/upstreams/nope")
    assert err.value.status == 404 and err.value.target == kong.url
    assert isinstance(status_error("x", status=503), ServerStatusError)


def test_a_read_is_retried_after_a_refused_connection_but_a_write_is_not():
    port = free_port()
    calls: list[str] = []
    client = HttpClient(f"http://127.0.0.1:{port}", retries=2, backoff=(0.01,))
    original = client._session.request

    def counting(method, url, **kw):
        calls.append(method)
        return original(method, url, **kw)

    client._session.request = counting  # type: ignore[method-assign]
    with pytest.raises(TransportError):
        client.request("GET", "/")
    with pytest.raises(TransportError):
        client.request("PUT", "/", data=b"x")
    assert calls == ["GET", "GET", "GET", "PUT"]


def test_one_client_serves_threads_over_pooled_connections(pushgateways):
    """80 requests from 4 threads through one client: served, over at most its pool of
    connections (4), as the pushgateway's side sees them (a relay counts them)."""
    pgw, = pushgateways(1)
    relay = RawServer("relay", upstream=pgw.address).start()
    client = PushgatewayClient(relay.address)
    errors: list[BaseException] = []
    served = []

    def work():
        try:
            for _ in range(20):
                client.groups()
                served.append(1)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        relay.stop()
    assert not errors
    assert len(served) == 80
    assert 1 <= relay.connections <= 4  # a client without keep-alive opens one per request: 80
