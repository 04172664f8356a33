"""Membership changes through pgwshard-sync's declarative mode, in real Kong 3.9.3 (DB-less):
a pushgateway drained with weight 0, one killed, one added. pgwshard-sync POSTs the config to
/config; once Kong's Status API lists the new targets and one plugin refresh_interval has passed,
no push lands off its owner. And what /config answers pgwshard-sync: 304 for a config Kong
has (`check_hash`), 429 + Retry-After while it is loading another (kong/api/routes/config.lua,
kong/db/declarative/import.lua: the reconfigure lock is held, `busy`).
"""
from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse

import pytest

from kong_plugin_pgwshard.clients.kong import KongAdmin, KongBusy
from kong_plugin_pgwshard.core.grouping import parse_push_path
from kong_plugin_pgwshard.harness.processes import Pushgateway, http_request, wait_until

from .conftest import DblessGateway

pytestmark = pytest.mark.kong

REFRESH = 2.0  # the plugin's refresh_interval in the shipped kong.yml (its default)
BODY = b"# TYPE member_items counter\nmember_items 1\n"


@pytest.fixture
def gateway(kong_bin):
    world = DblessGateway(kong_bin, sync_settings={"health": {"source": "probes",
                                                              "probes": {"interval": "0.5s", "fall": 2}}})
    try:
        world.wait_targets({p.address for p in world.pgws})
        yield world
    finally:
        world.stop()


def applied(gateway: DblessGateway, expected: dict[str, int]) -> None:
    """Kong lists exactly these targets and weights, and the plugin had one refresh to read them."""
    wait_until(lambda: gateway.targets() == expected, 30, what=f"Kong's targets to be {expected}")
    time.sleep(REFRESH + 0.5)  # the plugin's next read of the Status API (no signal to wait on)


def push_all_and_check(gateway: DblessGateway, name: str, n: int = 30) -> set[str]:
    """Push n groups through Kong; each lands on its owner by Kong's targets only. The owners."""
    ring = gateway.ring()
    owners = set()
    for i in range(n):
        path = f"/metrics/job/{name}/instance/i{i}"
        status, body = http_request(gateway.kong.proxy_url + path, "PUT", BODY, timeout=15)
        assert status == 200, (path, status, body)
        key = parse_push_path(path)
        owner = ring.owner(key).name
        assert gateway.holders(key) == [owner], path
        owners.add(owner)
    return owners


def restart_sync(gateway: DblessGateway, pushgateways: list) -> None:
    gateway.sync.stop()
    gateway.sync_settings["pushgateways"] = pushgateways
    gateway.sync = gateway.start_sync()


def test_kong_follows_a_drain_a_killed_pushgateway_and_an_added_one(gateway):
    a, b, c = (p.address for p in gateway.pgws)
    assert push_all_and_check(gateway, "before") == {a, b, c}

    # drained: weight 0 in pgwshard.yml; Kong keeps the target with weight 0, it takes no group
    restart_sync(gateway, [{"address": a, "weight": 0}, b, c])
    applied(gateway, {a: 0, b: 100, c: 100})
    assert push_all_and_check(gateway, "drained") == {b, c}

    # killed: the probes take it out; Kong lists it no more
    gateway.pgws[1].stop()
    applied(gateway, {a: 0, c: 100})
    assert push_all_and_check(gateway, "killed") == {c}

    # added: a new pushgateway in pgwshard.yml, the drained one back at full weight
    new = Pushgateway().start()
    gateway.pgws.append(new)
    restart_sync(gateway, [a, b, c, new.address])
    applied(gateway, {a: 100, c: 100, new.address: 100})
    assert push_all_and_check(gateway, "added") == {a, c, new.address}


@pytest.fixture(scope="module")
def quiet_gateway(kong_bin):
    """No pgwshard-sync: the test is the only one posting /config."""
    world = DblessGateway(kong_bin, sync=False)
    yield world
    world.stop()


def test_kong_answers_304_to_a_config_it_has_with_check_hash(quiet_gateway):
    admin = KongAdmin(quiet_gateway.kong.admin_url)
    try:
        assert admin.post_config(quiet_gateway.declarative) is True  # 201: loaded
        assert admin.post_config(quiet_gateway.declarative) is False  # 304: Kong has it
        changed = json.loads(json.dumps(quiet_gateway.declarative))
        changed["upstreams"][0]["targets"] = changed["upstreams"][0]["targets"][:2]
        assert admin.post_config(changed) is True
        assert len(quiet_gateway.targets()) == 2
        assert admin.post_config(quiet_gateway.declarative) is True
    finally:
        admin.close()


def big_config(base: dict, consumers: int) -> dict:
    """The world's config with many consumers: a load that holds Kong's reconfigure lock long."""
    doc = json.loads(json.dumps(base))
    doc["consumers"] = [{"username": f"load-{i}"} for i in range(consumers)]
    return doc


def post_raw(url: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    """POST /config keeping Kong's headers (Retry-After)."""
    split = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(split.hostname, split.port, timeout=300)
    try:
        conn.request("POST", "/config", body, {"Content-Type": "application/json"})
        answer = conn.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        conn.close()


def test_kong_answers_429_with_retry_after_while_another_load_holds_its_lock(quiet_gateway):
    """Kong's worker mutex (timeout 0) refuses a POST /config that comes while another worker
    loads one: 429 {"message": "Currently loading previous configuration"}, Retry-After <= 10.
    pgwshard's client posts meanwhile; when it meets one, it reads it as KongBusy with that
    Retry-After (whether it does is Kong's scheduling; the Admin API double's 429, which
    tests/clients/test_kong.py drives the client with, uses these words)."""
    big = json.dumps(big_config(quiet_gateway.declarative, 20_000)).encode()
    answers: list[tuple[int, dict[str, str], bytes]] = []
    busy: list[KongBusy] = []

    def load() -> None:
        answers.append(post_raw(quiet_gateway.kong.admin_url, big))

    admin = KongAdmin(quiet_gateway.kong.admin_url, timeout=300)
    try:
        # Whether two loads overlap on two workers is up to Kong's scheduling: a few rounds
        for attempt in range(4):
            loaders = [threading.Thread(target=load) for _ in range(6)]
            for thread in loaders:
                thread.start()
                time.sleep(0.05)
            for i in range(400):  # pgwshard's client meanwhile, until it meets a busy Kong
                if busy or not any(t.is_alive() for t in loaders):
                    break
                doc = json.loads(json.dumps(quiet_gateway.declarative))
                doc["services"][0]["tags"] = [f"try-{attempt}-{i}"]  # a new config each time: never 304
                try:
                    admin.post_config(doc)
                except KongBusy as err:
                    busy.append(err)
            for thread in loaders:
                thread.join(300)
            if busy and any(a[0] == 429 for a in answers):
                break
    finally:
        admin.close()
    refused = [a for a in answers if a[0] == 429]
    assert refused, f"no 429 while Kong loaded large configs: {[a[0] for a in answers]}"
    for _status, headers, body in refused:
        assert json.loads(body) == {"message": "Currently loading previous configuration"}
        assert 0 < int(headers["retry-after"]) <= 10
    for err in busy:
        assert 0 < err.retry_after <= 10
    # the world's own config back
    wait_until(lambda: quiet_gateway.post_config()[0] == 201, 120, interval=0.5, what="Kong idle again")


def test_after_kong_reload_pgwshard_sync_puts_the_applied_targets_back_before_any_resync(gateway):
    """`kong reload` puts a DB-less node back on its declarative_config file (Kong 3.9.3): the
    file's targets, a drained pushgateway at full weight again. pgwshard-sync notices by the
    node's configuration hash and loads its targets again, without waiting for its 30 s resync."""
    a, b, c = (p.address for p in gateway.pgws)
    restart_sync(gateway, [{"address": a, "weight": 0}, b, c])
    applied(gateway, {a: 0, b: 100, c: 100})
    gateway.kong.reload()
    wait_until(lambda: "runs another config than the one loaded into it" in gateway.sync.log(), 20,
               what="pgwshard-sync to notice the reloaded node")
    applied(gateway, {a: 0, b: 100, c: 100})
    assert push_all_and_check(gateway, "reloaded") == {b, c}
