"""Registering pushgateways in a real Consul: checked on /-/healthy, idempotent, only our own
entries are removed when the config drops them."""
from __future__ import annotations

import json
import urllib.request

import pytest

from kong_plugin_pgwshard.core.ring import Member
from kong_plugin_pgwshard.errors import UpstreamError
from kong_plugin_pgwshard.harness.processes import free_port, wait_until
from kong_plugin_pgwshard.sync.health.consul import consul_client
from kong_plugin_pgwshard.sync.registration import sync_registrations
from kong_plugin_pgwshard.sync.settings import ConsulSettings, RegisterSettings


def get(consul, path: str):
    with urllib.request.urlopen(consul.url + path, timeout=5) as resp:
        return json.loads(resp.read())


def passing(consul) -> set[str]:
    return {f"{e['Service']['Address']}:{e['Service']['Port']}"
            for e in get(consul, "/v1/health/service/pushgateway?passing=true")}


def settings_for(consul) -> ConsulSettings:
    return ConsulSettings(address=consul.url, tag="sharded",
                          register=RegisterSettings(enabled=True, check_interval=1.0, check_timeout=1.0,
                                                    deregister_after=60.0))


def test_registered_pushgateways_are_checked_and_pass(consul, pushgateways):
    pgws = pushgateways(2)
    settings = settings_for(consul)
    sync_registrations(consul_client(settings), settings, [Member.parse(p.address) for p in pgws])
    wait_until(lambda: passing(consul) == {p.address for p in pgws}, 15, what="both pass their check")
    services = get(consul, "/v1/agent/services")
    assert {s["Meta"]["managed-by"] for s in services.values()} == {"pgwshard"}
    assert all(s["Tags"] == ["sharded"] for s in services.values())
    checks = sorted(get(consul, "/v1/agent/checks").values(), key=lambda c: c["Output"])
    assert [(c["Type"], c["Interval"], c["Timeout"]) for c in checks] == [("http", "1s", "1s")] * 2
    assert all(any(f"{p.url}/-/healthy" in c["Output"] for c in checks) for p in pgws)

    pgws[0].kill()
    wait_until(lambda: passing(consul) == {pgws[1].address}, 15, what="the dead one fails its check")


def test_idempotent_and_removes_only_its_own_dropped_entries(consul, pushgateways):
    pgws = pushgateways(3)
    settings = settings_for(consul)
    client = consul_client(settings)
    everyone = [Member.parse(p.address) for p in pgws]
    # registered by someone else, under the same service name: never ours to remove
    req = urllib.request.Request(consul.url + "/v1/agent/service/register", method="PUT", data=json.dumps(
        {"ID": "hand-made", "Name": "pushgateway", "Address": "127.0.0.1", "Port": 9999}).encode())
    urllib.request.urlopen(req, timeout=5).close()

    sync_registrations(client, settings, everyone)
    first = set(get(consul, "/v1/agent/services"))
    sync_registrations(client, settings, everyone)  # as after a daemon restart
    assert set(get(consul, "/v1/agent/services")) == first and len(first) == 4

    sync_registrations(client, settings, everyone[:2])
    left = get(consul, "/v1/agent/services")
    assert "hand-made" in left and len(left) == 3
    assert {f"{s['Address']}:{s['Port']}" for s in left.values()} == {p.address for p in pgws[:2]} | {"127.0.0.1:9999"}


def test_unreachable_consul_is_an_upstream_error_without_the_token():
    settings = ConsulSettings(address=f"http://127.0.0.1:{free_port()}", token="registration-secret",
                              register=RegisterSettings(enabled=True))
    with pytest.raises(UpstreamError, match="consul registration failed") as err:
        sync_registrations(consul_client(settings), settings, [Member("127.0.0.1", 9091)])
    assert "registration-secret" not in str(err.value)


def test_known_healthy_start_passing_and_a_dead_one_fails_at_its_first_check(consul, pushgateways):
    alive, = pushgateways(1)
    dead = Member("127.0.0.1", free_port())
    settings = settings_for(consul)
    sync_registrations(consul_client(settings), settings, [Member.parse(alive.address), dead],
                       known_healthy={Member.parse(alive.address), dead})
    assert passing(consul) == {alive.address, dead.name}  # at once, before any check has run
    wait_until(lambda: passing(consul) == {alive.address}, 10, what="the dead one fails its first check")
