"""The shipped files in a running Kong 3.9.3 (DB-less): kong.conf passes `kong check`, kong.yml
and docker/kong.yml load, Kong takes the plugin's schema from `--dump` and refuses a bad config
with it, and pushes through Kong land on their owner only."""
from __future__ import annotations

import json

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, delete_from_gateway, push_to_gateway, pushadd_to_gateway

from kong_plugin_pgwshard.core.grouping import GroupingKey, parse_push_path
from kong_plugin_pgwshard.harness.kong import Kong, read_conf_lines
from kong_plugin_pgwshard.harness.processes import http_request, wait_until
from tests.support import REPO

from .conftest import KONG_CONF

pytestmark = pytest.mark.kong

BODY = b"# TYPE kong_items counter\nkong_items 3\n"


def test_the_shipped_kong_conf_passes_kong_check(kong_bin, tmp_path):
    kong = Kong({"database": "off"}, KONG_CONF, kong_bin)
    done = kong.cli("check", str(kong.conf_path))
    assert "configuration at" in done.stdout + done.stderr and "is valid" in done.stdout + done.stderr
    # every line users copy is in what Kong checked
    assert read_conf_lines(KONG_CONF).keys() <= kong.settings.keys()


def test_kong_starts_on_the_shipped_kong_yml_and_loads_the_plugin(gateway):
    log = gateway.kong.error_log()
    assert "loading protocol MsgPack:1 for plugin pgwshard" in log or "pgwshard" in log
    # worker 0 spawns it from a timer, which may run after /status/ready answered
    wait_until(gateway.kong.plugin_server_pids, 20, what="Kong to start the plugin server")
    assert gateway.kong.error_lines() == []
    # the plugin Kong knows is the one pgwshard-plugin --dump describes
    status, body = http_request(f"{gateway.kong.admin_url}/schemas/plugins/pgwshard")
    assert status == 200, body
    fields = {next(iter(f)) for f in json.loads(body)["fields"]}
    assert {"config", "protocols"} <= fields


@pytest.mark.parametrize("kong_yml", ["kong/kong.yml", "docker/kong.yml"])
def test_kong_takes_each_shipped_kong_yml_through_post_config(gateway, kong_yml):
    doc = yaml.safe_load((REPO / kong_yml).read_text())
    status, body = _post_config(gateway, doc)
    assert status == 201, body
    # put the world's own config back for the other tests
    status, body = _post_config(gateway, gateway.declarative)
    assert status == 201, body
    gateway.wait_targets({p.address for p in gateway.pgws})


def _post_config(gateway, doc: dict) -> tuple[int, bytes]:
    """POST /config; a 429 (pgwshard-sync's own load of the node still running: "Currently
    loading previous configuration") is waited out, as pgwshard-sync waits it out."""
    answers: list[tuple[int, bytes]] = []

    def posted() -> bool:
        answers.append(http_request(f"{gateway.kong.admin_url}/config", "POST", json.dumps(doc).encode(),
                                    headers={"Content-Type": "application/json"}, timeout=10))
        return answers[-1][0] != 429
    wait_until(posted, 30, interval=0.5, what="Kong to take a config")
    return answers[-1]


@pytest.mark.parametrize("config, field", [
    ({"membership": "bogus"}, "membership"),
    ({"membership": "upstream"}, "upstream"),
    ({"membership": "static", "refresh_interval": -1}, "refresh_interval"),
])
def test_kong_refuses_a_bad_plugin_config_with_the_plugins_schema(gateway, config, field):
    doc = json.loads(json.dumps(gateway.declarative))
    doc["services"][0]["plugins"][0]["config"] = config
    status, body = _post_config(gateway, doc)
    assert status == 400, body
    assert field in body.decode()


def test_pushes_through_kong_land_on_their_owner_only(gateway):
    paths = [f"/metrics/job/kong-fleet/instance/i{n}" for n in range(60)]
    for path in paths:
        status, body = http_request(gateway.kong.proxy_url + path, "PUT", BODY, timeout=10)
        assert status == 200, (path, status, body)
    owners = set()
    for path in paths:
        key = parse_push_path(path)
        owner = gateway.owner(path)
        owners.add(owner)
        assert gateway.holders(key) == [owner], path
    assert len(owners) == len(gateway.pgws)  # 60 groups reach every shard


def test_prometheus_clients_push_pushadd_and_delete_through_kong(gateway):
    registry = CollectorRegistry()
    Counter("kong_client_jobs", "jobs", registry=registry).inc(5)
    gateway_address = gateway.kong.proxy_url
    keys = []
    for n in range(12):
        grouping = {"instance": f"client-{n}", "zone": "ü-é"}
        push_to_gateway(gateway_address, job="kong-client", registry=registry, grouping_key=grouping)
        pushadd_to_gateway(gateway_address, job="kong-client", registry=registry, grouping_key=grouping)
        keys.append(GroupingKey.from_labels({"job": "kong-client", **grouping}))
    for key in keys:
        assert len(gateway.holders(key)) == 1
        assert gateway.holders(key) == [gateway.ring().owner(key).name]
    for n in range(6):
        delete_from_gateway(gateway_address, job="kong-client", grouping_key={"instance": f"client-{n}", "zone": "ü-é"})
    wait_until(lambda: all(not gateway.holders(k) for k in keys[:6]), 10, what="deleted groups gone")
    assert all(len(gateway.holders(k)) == 1 for k in keys[6:])
