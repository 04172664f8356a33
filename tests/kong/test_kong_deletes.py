"""DELETEs through real Kong 3.9.3's `pgwshard-deletes` route (the block kong/kong.yml ships
commented out, uncommented as written): Kong prefers the route with `methods: [DELETE]`, so a
client's delete reaches pgwshard-sync's delete API, which records a tombstone and deletes the
group on every pushgateway; pushes and reads keep the plugin's route (README "Deletes")."""
from __future__ import annotations

import pytest

from kong_plugin_pgwshard.core.grouping import parse_push_path
from kong_plugin_pgwshard.harness.processes import http_request, wait_until
from kong_plugin_pgwshard.sync.deletes import Tombstones

from .conftest import DblessGateway

pytestmark = pytest.mark.kong


@pytest.fixture(scope="module")
def gateway(kong_bin):
    world = DblessGateway(kong_bin, deletes=True)
    try:
        world.wait_targets({p.address for p in world.pgws})
        wait_until(lambda: http_request(f"http://127.0.0.1:{world.deletes_port}/metrics/job/probe", "GET")[0] > 0,
                   20, what="pgwshard-sync's delete API")
        yield world
    finally:
        world.stop()


def test_a_delete_through_kong_reaches_the_delete_api_and_every_copy_goes(gateway):
    path = "/metrics/job/kong-delete/instance/a"
    key = parse_push_path(path)
    assert http_request(gateway.kong.proxy_url + path, "PUT", b"deleted_items 1\n", timeout=10)[0] == 200
    owner = gateway.ring().owner(key).name
    assert gateway.holders(key) == [owner]
    # a stray copy elsewhere, as a push without the plugin leaves one
    other = next(p for p in gateway.pgws if p.address != owner)
    assert http_request(other.url + key.path(), "PUT", b"deleted_items 1\n")[0] == 200
    status, body = http_request(gateway.kong.proxy_url + path, "DELETE", timeout=10)
    assert status == 202, body
    wait_until(lambda: gateway.holders(key) == [], 10, what="every copy deleted")
    # the tombstone pgwshard-sync recorded (its store, opened beside it as a reader)
    store = Tombstones(f"{gateway.dir}/tombstones", ttl=3600)
    try:
        assert store.deleted_at(key) is not None and len(store) == 1
    finally:
        store.close()
