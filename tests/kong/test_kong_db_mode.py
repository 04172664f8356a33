"""Kong 3.9.3 in DB mode (README "Kong topologies", "Traditional (DB mode)"): two nodes on one
PostgreSQL database, loaded as kong/kong.yml's header says, pgwshard-sync (`kong.mode: admin`,
probes) writing the targets through one node's Admin API, each node's plugin reading its Admin
API. Pushes land on their owner through every node; a dead pushgateway and a drained one leave
every node's ring; Kong's own Admin API answers what tests/support/kong_admin_double.py answers;
a dead or silent owner costs one connection attempt (the service's `retries`)."""
from __future__ import annotations

import json
import re
import socket
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, push_to_gateway

from kong_plugin_pgwshard.core.grouping import GroupingKey, parse_push_path
from kong_plugin_pgwshard.core.ring import Member, Ring
from kong_plugin_pgwshard.harness.kong_topologies import BODY, UPSTREAM, DbModeTopology, admin, shipped_plugin
from kong_plugin_pgwshard.harness.processes import free_port, http_request, wait_until
from tests.support import REPO
from tests.support.kong_admin_double import KongAdminDouble

pytestmark = pytest.mark.kong

PATHS = [f"/metrics/job/db-fleet/instance/i{n}" for n in range(40)] + [
    "/metrics/job@base64/ZGItZmxlZXQ/instance/b64",            # job "db-fleet" spelled in base64
    "/metrics/job/db-fleet/zone@base64/w7wtw6k/instance/z",    # a UTF-8 label value
    "/metrics/job/db-fleet/instance/y/a/1",                    # more labels
]


@pytest.fixture(scope="module")
def db(kong_bin, postgres):
    topo = DbModeTopology(REPO, kong_bin, postgres, "kong_db_mode")
    try:
        topo.wait_ready(PATHS)
        yield topo
    finally:
        topo.stop()


def owned_by(ring: Ring, address: str, prefix: str, count: int = 3) -> list[str]:
    """`count` push paths whose owner on `ring` is `address`."""
    found = []
    for n in range(2000):
        path = f"{prefix}/instance/o{n}"
        if ring.owner(parse_push_path(path)).name == address:
            found.append(path)
            if len(found) == count:
                return found
    raise AssertionError(f"no path owned by {address}")


def test_pushes_land_on_their_owner_only_through_every_node(db):
    db.clear()
    assert db.push_everywhere(PATHS) == {}
    assert db.misplaced(PATHS) == {}
    owners = {db.ring().owner(parse_push_path(p)).name for p in PATHS}
    assert len(owners) == len(db.pgws)
    # and the Prometheus client, through each node
    registry = CollectorRegistry()
    Counter("db_client_jobs", "jobs", registry=registry).inc()
    for node in db.proxies:
        for n in range(6):
            push_to_gateway(node.proxy_url, job="db-client", registry=registry, grouping_key={"instance": f"c{n}"})
    for n in range(6):
        key = GroupingKey.from_labels({"job": "db-client", "instance": f"c{n}"})
        assert db.holders(key) == [db.ring().owner(key).name]
    for node in db.proxies:
        assert node.error_lines() == []


def test_a_dead_pushgateway_leaves_every_nodes_ring_and_rejoins(db):
    db.clear()
    victim = db.pgws[2]
    paths = owned_by(db.ring(), victim.address, "/metrics/job/db-dead")
    victim.stop()
    db.wait_targets({p.address for p in db.pgws[:2]})
    # each node's plugin reads its Admin API every refresh_interval (2 s): until then, 502
    for node in db.proxies:
        wait_until(lambda node=node: all(http_request(node.proxy_url + p, "PUT", BODY, timeout=15)[0] == 200
                                         for p in paths),
                   15, interval=0.2, what=f"{node.name} routing around {victim.address}")
    assert db.misplaced(paths) == {}
    victim.start()
    db.wait_targets({p.address for p in db.pgws}, timeout=40)  # probes' rise 2 + hold_down 5 s
    wait_until(lambda: db.routed_to_owners(paths), 15, interval=0.2, what=f"{victim.address} owning its groups again")
    assert db.holders(parse_push_path(paths[0])) == [victim.address]


def test_drain_by_weight_0_and_a_weight_changed_by_hand_is_put_back(db):
    db.clear()
    drained = db.pgws[0]
    paths = owned_by(db.ring(), drained.address, "/metrics/job/db-drain")
    # by hand, on the Admin API: pgwshard-sync's next resync (a start, or every 30 s) puts it back
    (entity,) = [t for t in admin(db.writer.admin_url, "GET", f"/upstreams/{UPSTREAM}/targets")[1]["data"]
                 if t["target"] == db.pgws[1].address]
    status, _ = admin(db.writer.admin_url, "PATCH", f"/upstreams/{UPSTREAM}/targets/{entity['id']}", {"weight": 7})
    assert status == 200
    assert db.targets(db.proxies[1].admin_url)[db.pgws[1].address] == 7  # the other node reads it too
    db.stop_sync()
    db.start_sync(weights={drained.address: 0})
    wait_until(lambda: all(db.targets(u).get(drained.address) == 0 for u in db.read_urls()), 30,
               what="the drained target at weight 0 on every node")
    assert db.targets(db.writer.admin_url)[db.pgws[1].address] == 100
    wait_until(lambda: db.routed_to_owners(paths), 15, interval=0.2, what=f"routing around the drained {drained.address}")
    assert all(drained.address not in db.holders(parse_push_path(p)) for p in paths)
    db.stop_sync()
    db.start_sync()
    db.wait_targets({p.address for p in db.pgws})


# -- Kong's own answers, and the double's -------------------------------------------------------

def _exchange(url: str) -> list:
    """The Admin API calls pgwshard-sync and the plugin make, and their edge cases, on a scratch
    upstream: what each answered, ids and timestamps left out."""
    answers: list = []

    def call(method: str, path: str, body: dict | None = None):
        status, doc = admin(url, method, path, body)
        answers.append((method, re.sub(r"[0-9a-f-]{36}", "ID", path), status, _comparable(doc)))
        return doc

    call("POST", "/upstreams", {"name": "answers", "hash_on": "path"})
    first = call("POST", "/upstreams/answers/targets", {"target": "127.0.0.1:9091"})
    call("POST", "/upstreams/answers/targets", {"target": "127.0.0.1:9091"})          # twice: 409
    call("POST", "/upstreams/answers/targets", {"target": "[::1]:9091", "weight": 5})  # expanded
    call("POST", "/upstreams/answers/targets", {"target": "[::1]:9091"})               # the same: 409
    call("POST", "/upstreams/answers/targets", {"target": "127.0.0.1:99999"})
    call("PATCH", f"/upstreams/answers/targets/{first['id']}", {"weight": 0})
    call("GET", "/upstreams/answers/targets")
    call("DELETE", "/upstreams/answers/targets/[::1]:9091")      # not normalised: 404
    call("DELETE", "/upstreams/answers/targets/127.0.0.1:9999")  # unknown: 404
    call("DELETE", "/upstreams/answers/targets/127.0.0.1:9091")  # by its string: 204
    for n in range(120):
        call("POST", "/upstreams/answers/targets", {"target": f"10.1.{n // 100}.{n % 100}:9091"})
    page = call("GET", "/upstreams/answers/targets?size=50")
    every = [t["target"] for t in page["data"]]
    for _ in range(5):
        if not page["next"]:
            break
        page = call("GET", page["next"])
        every += [t["target"] for t in page["data"]]
    # targets made in the same millisecond are listed by id: pages differ, not what they add up to
    answers.append(("every page", len(every), sorted(every), None))
    call("GET", "/upstreams/answers/targets?size=abc")
    call("GET", "/upstreams/answers/targets?size=5000")
    call("GET", "/upstreams/nosuch/targets")
    return answers


def _comparable(doc):
    """An answer without what differs between two stores: ids, timestamps, Kong's upstream
    fields the double does not model; lists of targets as [target, weight] pairs."""
    if not isinstance(doc, dict):
        return doc
    if "data" in doc:
        data = [[t.get("target"), t.get("weight")] for t in doc["data"]]
        return {"data": data if len(data) <= 10 else len(data), "next": doc.get("next"), "offset": doc.get("offset")}
    if "target" in doc and "weight" in doc:
        return {"target": doc["target"], "weight": doc["weight"]}
    if "name" in doc and "hash_on" in doc:
        return {"name": doc["name"], "hash_on": doc["hash_on"], "algorithm": doc.get("algorithm")}
    if "fields" in doc and isinstance(doc.get("fields"), dict):
        fields = json.loads(re.sub(r'"id": ?"[0-9a-f-]{36}"', '"id": "ID"', json.dumps(doc["fields"])))
        return {"code": doc.get("code"), "name": doc.get("name"), "fields": fields}
    return doc


def test_kong_answers_the_admin_api_calls_as_the_double_does(db):
    kong = _exchange(db.writer.admin_url)
    double = KongAdminDouble().start()
    try:
        mine = _exchange(double.url)
    finally:
        double.stop()
    assert len(kong) == len(mine)
    differ = [(k, m) for k, m in zip(kong, mine, strict=True) if k != m]
    assert differ == [], json.dumps(differ[:3])[:3000]
    # what the answers show, read plainly
    statuses = {(m, p): s for m, p, s, _ in kong}
    assert statuses[("DELETE", "/upstreams/answers/targets/[::1]:9091")] == 404
    listed = [a for a in kong if a[:2] == ("GET", "/upstreams/answers/targets")][0][3]["data"]
    (every,) = [a for a in kong if a[0] == "every page"]
    assert every[1] == 121 and len(set(every[2])) == 121  # paging: each target once ([::1] + 120)
    assert ["[0000:0000:0000:0000:0000:0000:0000:0001]:9091", 5] in listed
    status, _ = admin(db.writer.admin_url, "DELETE", "/upstreams/answers")
    assert status == 204


def test_the_shipped_kong_yml_header_says_how_to_load_it_in_db_mode(db):
    """The header's two steps are the ones the topology above was loaded with
    (harness/kong_topologies.py: import_shipped_entities, add_shipped_plugin), and its curl body is the plugin
    the file ships."""
    header = "\n".join(line.lstrip("# ") for line in (REPO / "kong" / "kong.yml").read_text().splitlines()
                       if line.startswith("#"))
    assert "kong config db_import kong-without-plugin.yml -c /etc/kong/db-only.conf" in header
    assert "curl -sS -X POST http://127.0.0.1:8001/services/pushgateway/plugins" in header
    (body,) = re.findall(r"-d '(\{.*\})'", header)
    plugin = shipped_plugin(REPO / "kong" / "kong.yml")
    assert json.loads(body) == {"name": plugin["name"], "config": plugin["config"]}
    # and what it made: the plugin on the service, the upstream's targets kept by pgwshard-sync
    _, found = admin(db.writer.admin_url, "GET", "/services/pushgateway/plugins")
    assert found is not None and [p["name"] for p in found["data"]] == ["pgwshard"]


# -- the service's retries with a pinned target ------------------------------------------------

def _silent_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A loopback port that takes no connection: a listening socket with a full accept queue
    drops new SYNs, as a pushgateway host that stopped answering does."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    for _ in range(8):
        client = socket.socket()
        client.settimeout(0.5)
        try:
            client.connect(server.getsockname())
            fillers.append(client)
        except OSError:
            client.close()
            break
    return server, fillers


def test_a_dead_or_silent_owner_costs_one_connection_attempt(db):
    """set_target pins the push to its owner, so each of the service's retries goes to the same
    pushgateway: the shipped `retries: 0` makes a dead owner one refused connection and a silent
    one one connect_timeout (Kong's default 5 retries made them 6 of each)."""
    node = db.proxies[0]
    db.stop_sync()  # it would remove the targets added here
    silent, fillers = _silent_listener()
    dead = f"127.0.0.1:{free_port()}"
    quiet = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        for target in (dead, quiet):
            status, body = admin(db.writer.admin_url, "POST", f"/upstreams/{UPSTREAM}/targets", {"target": target})
            assert status == 201, body
        ring = Ring([Member.parse(t, w) for t, w in db.targets(node.admin_url).items()])
        (to_dead,) = owned_by(ring, dead, "/metrics/job/db-retries", 1)
        (to_quiet,) = owned_by(ring, quiet, "/metrics/job/db-retries", 1)
        # the plugin has read the new targets once a push to the dead one fails
        wait_until(lambda: http_request(node.proxy_url + to_dead, "PUT", BODY, timeout=30)[0] == 502, 15,
                   interval=0.2, what="the plugin routing to the added targets")
        attempts = {}
        for target, path, error in ((dead, to_dead, "Connection refused"), (quiet, to_quiet, "timed out")):
            since = node.log_offset()
            started = time.monotonic()
            status, _ = http_request(node.proxy_url + path, "PUT", BODY, timeout=60)
            took = time.monotonic() - started
            lines = [line for line in node.error_log()[since:].splitlines()
                     if "while connecting to upstream" in line and target in line]
            attempts[target] = (status, len(lines), all(error in line for line in lines), round(took, 1))
        assert attempts[dead][:3] == (502, 1, True), attempts
        assert attempts[quiet][:3] == (504, 1, True), attempts
    finally:
        silent.close()
        for client in fillers:
            client.close()
        for target in (dead, quiet):
            admin(db.writer.admin_url, "DELETE", f"/upstreams/{UPSTREAM}/targets/{target}")
        db.start_sync()
        db.wait_targets({p.address for p in db.pgws})
