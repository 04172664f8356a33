"""Kong 3.9.3 in hybrid mode (README "Kong topologies", "Hybrid"): a control plane on PostgreSQL,
two DB-less data planes with a `kong hybrid gen_cert` pair, pgwshard-sync (`kong.mode: admin`)
writing the targets on the control plane, each data plane's plugin reading its Status API.

Both ways a control plane sends config: classic sync, and `cluster_rpc = on` with
`cluster_incremental_sync = on` and the lines README gives for it (the plugin server supervised
beside Kong, not started by it); and why those lines: with Kong starting the plugin server on
the data plane, RPC never gets it a config."""
from __future__ import annotations

import json

import pytest

from kong_plugin_pgwshard.core.grouping import parse_push_path
from kong_plugin_pgwshard.harness.kong_topologies import BODY, HybridTopology, admin
from kong_plugin_pgwshard.harness.processes import http_get, http_request, wait_until
from tests.support import REPO
from tests.support.kong_admin_double import KongAdminDouble

from .test_kong_db_mode import PATHS, _comparable, owned_by

pytestmark = pytest.mark.kong


@pytest.fixture(scope="module", params=["classic", "rpc"])
def hybrid(request, kong_bin, postgres):
    rpc = request.param == "rpc"
    topo = HybridTopology(REPO, kong_bin, postgres, f"kong_hybrid_{request.param}", rpc=rpc)
    try:
        topo.wait_ready(PATHS)
        yield topo
    finally:
        topo.stop()


def test_pushes_land_on_their_owner_only_through_every_data_plane(hybrid):
    hybrid.clear()
    assert hybrid.push_everywhere(PATHS) == {}
    assert hybrid.misplaced(PATHS) == {}
    for node in (*hybrid.proxies, hybrid.cp):
        assert node.error_lines() == []
    assert not hybrid.cp.plugin_server_pids()  # README: Kong starts none on a control plane
    if hybrid.rpc:  # the supervised plugin server is the one Kong talks to, and Kong started none
        assert all(not dp.plugin_server_pids() for dp in hybrid.proxies)
        assert all(hybrid.plugin_server(dp).running for dp in hybrid.proxies)


def test_a_dead_pushgateway_leaves_every_data_planes_ring_and_rejoins(hybrid):
    hybrid.clear()
    victim = hybrid.pgws[1]
    paths = owned_by(hybrid.ring(), victim.address, "/metrics/job/hy-dead")
    victim.stop()
    try:
        hybrid.wait_targets({p.address for p in hybrid.pgws if p is not victim}, timeout=30)
        wait_until(lambda: hybrid.routed_to_owners(paths), 20, interval=0.2,
                   what=f"every data plane routing around {victim.address}")
    finally:
        victim.start()
    hybrid.wait_targets({p.address for p in hybrid.pgws}, timeout=40)
    wait_until(lambda: hybrid.routed_to_owners(paths), 20, interval=0.2, what=f"{victim.address} back")
    assert hybrid.holders(parse_push_path(paths[0])) == [victim.address]


def test_drain_by_weight_0_reaches_every_data_plane(hybrid):
    hybrid.clear()
    drained = hybrid.pgws[0]
    paths = owned_by(hybrid.ring(), drained.address, "/metrics/job/hy-drain")
    hybrid.stop_sync()
    hybrid.start_sync(weights={drained.address: 0})
    try:
        wait_until(lambda: all(hybrid.targets(u).get(drained.address) == 0 for u in hybrid.read_urls()), 30,
                   what="weight 0 on every data plane")
        wait_until(lambda: hybrid.routed_to_owners(paths), 20, interval=0.2, what="routing around the drained one")
        assert all(drained.address not in hybrid.holders(parse_push_path(p)) for p in paths)
    finally:
        hybrid.stop_sync()
        hybrid.start_sync()
    hybrid.wait_targets({p.address for p in hybrid.pgws})


def test_the_plugin_config_set_on_the_control_plane_reaches_the_data_planes_plugin_servers(hybrid):
    """A config change on the CP's Admin API: every DP's plugin server runs the new config
    (here `membership: static` with one node: every push then lands there), and the old back."""
    hybrid.clear()
    only = hybrid.pgws[2].address
    hybrid.patch_plugin({"membership": "static", "nodes": [only]})
    try:
        def all_on_one() -> bool:
            hybrid.clear()
            return not hybrid.push_everywhere(PATHS[:12]) and all(
                hybrid.holders(parse_push_path(p)) == [only] for p in PATHS[:12])
        wait_until(all_on_one, 30, interval=0.2, what="the static config on every data plane")
    finally:
        hybrid.patch_plugin({"membership": "upstream", "nodes": []})
    wait_until(lambda: hybrid.routed_to_owners(PATHS[:12]), 30, interval=0.2, what="membership: upstream again")


def test_data_planes_keep_routing_without_their_control_plane_and_restart_on_their_cache(hybrid):
    """Kong's promise: a DP keeps its last config when the CP is away, and one restarted then
    comes back on the config it cached (lmdb in its prefix)."""
    hybrid.clear()
    hybrid.stop_sync()
    hybrid.cp.stop()
    try:
        assert hybrid.routed_to_owners(PATHS)
        for dp in hybrid.proxies:  # every DP, so that none reads a sibling's Status API meanwhile
            dp.stop()
        for dp in hybrid.proxies:
            hybrid.start_data_plane(dp)
        hybrid.wait_targets({p.address for p in hybrid.pgws}, timeout=10)
        hybrid.wait_plugin()
        assert hybrid.routed_to_owners(PATHS)
    finally:
        hybrid.cp.start()
        hybrid.start_sync()
    # and the DPs take the CP's changes again
    wait_until(lambda: all(http_get(dp.status_url + "/status/ready")[0] == 200 for dp in hybrid.proxies), 30,
               what="data planes ready")


def test_with_rpc_a_data_plane_that_starts_the_plugin_server_gets_no_config(kong_bin, postgres):
    """Why README's RPC lines leave `start_cmd` out on data planes: with it, the DP's worker 0
    (the one that syncs) sends a hello cjson cannot encode (its configuration holds the spawned
    plugin server's handle) and the CP fails on it: the DP never gets a config."""
    topo = HybridTopology(REPO, kong_bin, postgres, "kong_hybrid_rpc_start_cmd", data_planes=0, rpc=True,
                          kong_starts_plugin_server=True)
    try:
        dp = topo.add_data_plane(kong_bin, wait=False)
        wait_until(lambda: "attempt to index local 'payload' (a nil value)" in topo.cp.error_log(), 60, interval=0.5,
                   what="the control plane failing on the data plane's hello")
        status, body = http_request(dp.proxy_url + "/metrics/job/x", "PUT", BODY)
        assert status == 404 and b"no Route matched" in body
        assert http_get(dp.status_url + "/status/ready")[0] != 200
    finally:
        topo.stop()


def _status_exchange(url: str) -> list:
    """What a data plane's Status API answers to the plugin's read and to what it must refuse."""
    answers = []
    for method, path in (("GET", "/upstreams/pushgateways/targets"), ("GET", "/upstreams/pushgateways/targets?size=2"),
                         ("GET", "/upstreams/pushgateways/targets?offset=2&size=2"),
                         ("POST", "/upstreams/pushgateways/targets"), ("DELETE", "/upstreams/pushgateways/targets/x:1"),
                         ("GET", "/upstreams/nosuch/targets"), ("GET", "/upstreams"), ("POST", "/config")):
        status, doc = admin(url, method, path, {"target": "127.0.0.1:1"} if method == "POST" else None)
        comparable = _comparable(doc)
        if isinstance(comparable, dict) and isinstance(comparable.get("data"), list):
            comparable["data"] = sorted(comparable["data"]) if len(doc["data"]) > 2 else len(doc["data"])
        answers.append((method, path, status, comparable))
    return answers


def test_a_data_planes_status_api_answers_as_the_double_does(hybrid):
    dp = hybrid.proxies[0]
    kong = _status_exchange(dp.status_url)
    double = KongAdminDouble(status_api=True).start()
    try:
        double.load_config({"_format_version": "3.0", "upstreams": [
            {"name": "pushgateways", "targets": [{"target": p.address} for p in hybrid.pgws]}]})
        mine = _status_exchange(double.url)
    finally:
        double.stop()
    differ = [(k, m) for k, m in zip(kong, mine, strict=True) if k != m]
    assert differ == [], json.dumps(differ)[:3000]
