"""The plugin follows the membership pgwshard-sync maintains, off the request path."""
from __future__ import annotations

import json
import threading
import time

from kong_plugin_pgwshard.membership import PolledMembership, read_file_sd, read_upstream_targets
from kong_plugin_pgwshard.ring import Member
from tests.support.kong_rpc import KongRPC, Request, run_access
from tests.support.processes import wait_until

A, B = "127.0.0.1:9401", "127.0.0.1:9402"


def targets_of(rpc, iid, n=40) -> set:
    return {run_access(rpc, iid, Request(f"/metrics/job/j/i/{i}")).target for i in range(n)}


def test_plugin_follows_the_kong_upstream_and_keeps_the_last_good_set(plugin_server_factory, kong_admin):
    kong = kong_admin()
    kong.add_upstream("pushgateways", [A])
    server = plugin_server_factory("gevent")
    rpc = KongRPC(server.socket_path)
    iid = rpc.start_instance("pgwshard", {"membership": "upstream", "upstream": "pushgateways",
                                          "admin_url": kong.url, "refresh_interval": 0.2})
    assert targets_of(rpc, iid) == {("127.0.0.1", 9401)}

    kong.targets["pushgateways"].append(kong._target("pushgateways", B, 100))
    wait_until(lambda: targets_of(rpc, iid) == {("127.0.0.1", 9401), ("127.0.0.1", 9402)}, 10, what="B joins")
    assert "added ['127.0.0.1:9402']" in server.log()

    kong.stop()  # Admin API gone: the ring stays as it was
    time.sleep(1.0)
    assert targets_of(rpc, iid) == {("127.0.0.1", 9401), ("127.0.0.1", 9402)}
    assert "read failed, keeping 2 members" in server.log()


def test_an_empty_target_list_read_successfully_empties_the_ring(plugin_server_factory, tmp_path):
    sd = tmp_path / "members.json"
    sd.write_text(json.dumps([{"targets": [A]}]))
    server = plugin_server_factory("gevent")
    rpc = KongRPC(server.socket_path)
    iid = rpc.start_instance("pgwshard", {"membership": "file", "membership_file": str(sd), "refresh_interval": 0.2})
    assert run_access(rpc, iid, Request("/metrics/job/x")).target == ("127.0.0.1", 9401)
    sd.write_text("{ not json")  # a corrupt file: keep the last good set
    time.sleep(0.8)
    assert run_access(rpc, iid, Request("/metrics/job/x")).target == ("127.0.0.1", 9401)
    sd.write_text("[]")  # pgwshard-sync wrote "nobody is healthy"
    wait_until(lambda: run_access(rpc, iid, Request("/metrics/job/x")).exit, 10, what="503")
    assert run_access(rpc, iid, Request("/metrics/job/x")).exit[0] == 503


def test_ring_answers_instantly_while_a_refresh_hangs(kong_admin):
    kong = kong_admin()
    kong.add_upstream("pushgateways", [A, B])
    source = PolledMembership("test", lambda: read_upstream_targets(kong.url, "pushgateways", None, timeout=5), 0.1)
    try:
        assert len(source.ring()) == 2
        kong.stall.set()
        time.sleep(0.5)  # the refresher is now blocked inside a request
        started = time.perf_counter()
        for _ in range(1000):
            source.ring().owner("k")
        # a lookup that waited on the stalled Admin API would take its 5 s timeout
        assert time.perf_counter() - started < 2.5
        assert len(source.ring()) == 2
    finally:
        kong.stall.clear()
        source.close()


def test_read_file_sd_takes_every_group(tmp_path):
    sd = tmp_path / "sd.json"
    sd.write_text(json.dumps([{"targets": [A], "labels": {"x": "1"}}, {"targets": [B]}]))
    assert read_file_sd(str(sd)) == [Member.parse(A), Member.parse(B)]
