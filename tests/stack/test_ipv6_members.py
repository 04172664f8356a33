"""IPv6 pushgateways get one name everywhere: Kong's spelling of the target.

Kong stores `[::1]:9091` as `[0000:0000:0000:0000:0000:0000:0000:0001]:9091`
(kong/db/dao/targets.lua). pgwshard-sync's sink must see its wanted set in that listing (else it
re-POSTs every cycle and Kong answers 409), and the plugin (which reads the targets back from
Kong), the daemon and the CLI (which read the user's spelling) must hash the same names.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import urllib.request

import pytest

from kong_plugin_pgwshard.core.grouping import parse_push_path
from kong_plugin_pgwshard.core.ring import Member, Ring
from kong_plugin_pgwshard.harness.kong_rpc import KongPlugin, KongRPC, Request
from kong_plugin_pgwshard.harness.processes import Pushgateway, wait_until
from kong_plugin_pgwshard.plugin.handler import KONG_SCHEMA
from kong_plugin_pgwshard.sync.daemon import Daemon
from kong_plugin_pgwshard.sync.settings import parse_settings
from tests.support.kong_admin_double import kong_target


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1)")
PATHS = [f"/metrics/job/batch/instance/i{n}" for n in range(24)]


@pytest.fixture
def v6_pushgateways():
    started = [Pushgateway(ip="::1") for _ in range(3)]
    try:
        for pgw in started:
            pgw.start()
        yield started
    finally:
        for pgw in started:
            pgw.stop()


def test_ipv6_members_cost_no_write_once_in_kong_and_have_one_owner_everywhere(
        v6_pushgateways, kong_admin, plugin_server_factory):
    pgws = v6_pushgateways
    assert pgws[0].address.startswith("[::1]:")  # the user's (short) spelling
    kong = kong_admin()
    settings = parse_settings({
        "pushgateways": [p.address for p in pgws],
        "health": {"probes": {"interval": 0.2, "timeout": 0.5, "rise": 1, "fall": 1}},
        "kong": {"admin_url": kong.url},
        "rebalance": {"enabled": False},
    }, "test")
    daemon = Daemon(settings)
    daemon.resync_interval = 0.2
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        in_kong = sorted(kong_target(p.address) for p in pgws)
        assert in_kong[0].startswith("[0000:0000:0000:0000:0000:0000:0000:0001]:")
        wait_until(lambda: kong.target_names("pushgateways") == in_kong, 15, what="targets in Kong")
        def count(method: str) -> int:
            return sum(1 for m, path, _ in kong.requests if m == method and path.endswith("/targets"))

        posts, reads = count("POST"), count("GET")
        wait_until(lambda: count("GET") >= reads + 3, 15, what="three more resyncs")
        assert count("POST") == posts  # Kong's spelling is the wanted one: nothing re-POSTed (409)
    finally:
        daemon.stop.set()
        thread.join(15)

    # the plugin: its ring read back from Kong, through a real plugin server
    plugin = KongPlugin(KongRPC(plugin_server_factory().socket_path), KONG_SCHEMA, {
        "membership": "upstream", "upstream": "pushgateways", "admin_url": kong.url})
    by_plugin = [plugin.access(Request(path)).target for path in PATHS]
    # the daemon's rebalancer: the ring of its configured pushgateways
    ring = Ring(settings.pushgateways)
    by_daemon = [(o.host, o.port) for o in (ring.owner(parse_push_path(p)) for p in PATHS)]
    # the CLI, given the user's spelling
    out = subprocess.run([sys.executable, "-m", "kong_plugin_pgwshard.cli", "locate",
                          "--nodes", ",".join(p.address for p in pgws), *PATHS],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    by_cli = [(m.host, m.port) for m in (Member.parse(line.split("\t")[2]) for line in out.splitlines())]
    assert by_plugin == by_daemon == by_cli
    assert by_plugin[0][0] == "0000:0000:0000:0000:0000:0000:0000:0001"

    # the owner Kong would reach: a push to the plugin's target lands on that real pushgateway
    host, port = by_plugin[0]
    request = urllib.request.Request(f"http://[{host}]:{port}{PATHS[0]}", data=b"x 1\n", method="PUT")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status in (200, 202)
    (owner,) = [p for p in pgws if p.port == port]
    assert {"job": "batch", "instance": "i0"} in [
        {k: v for k, v in g["labels"].items()} for g in owner.groups()]


def test_the_nginx_host_sends_pushes_to_ipv6_owners(v6_pushgateways):
    """The plugin hands set_target an IPv6 host bare (as Kong's PDK takes it); the host brackets it
    for nginx as Kong's DNS client does."""
    from kong_plugin_pgwshard.harness.nginx import NginxHost
    from kong_plugin_pgwshard.harness.processes import PluginServer

    pgws = v6_pushgateways
    nodes = [p.address for p in pgws]
    server = PluginServer().start()
    host = NginxHost(server.socket_path, {"membership": "static", "nodes": nodes}, nodes).start()
    try:
        ring = Ring(Member.parse(n) for n in nodes)
        for path in PATHS[:12]:
            request = urllib.request.Request(host.url + path, data=b"x 1\n", method="PUT")
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
        for path in PATHS[:12]:
            owner = ring.owner(parse_push_path(path))
            (holder,) = [p for p in pgws if any(g["labels"].get("instance") == path.rsplit("/", 1)[1]
                                                for g in p.groups())]
            assert Member.parse(holder.address).name == owner.name
    finally:
        host.stop()
        server.stop()
