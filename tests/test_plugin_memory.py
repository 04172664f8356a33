"""Rejected pushes must not grow the plugin server's memory (kong-pdk 0.36 leaks on exit)."""
from __future__ import annotations

import gc

import gevent
import pytest
from gevent import greenlet
from kong_pdk.server import PluginServer
from kong_pdk.module import Module

from kong_plugin_pgwshard.server import PgwshardPluginServer
from tests.support.kong_rpc import KongRPC, Request, run_access


class _ExitFirst:
    """A plugin whose first PDK call is kong.response.exit."""

    def __init__(self, config):
        pass

    def access(self, kong):
        kong.response.exit(403, {"message": "no"})


class _ExitSecond(_ExitFirst):
    def access(self, kong):
        kong.request.get_raw_path()
        kong.response.exit(400, {"message": "bad"})


def _serve(server_cls, plugin_cls, gevent_mode):
    server = server_cls(use_gevent=gevent_mode, lua_style=False)
    server.plugins["p"] = Module("p", module=type("m", (), {"Plugin": plugin_cls}))
    iid = server.start_instance({"Name": "p", "Config": "{}"})["Id"]
    return server, iid


def _exit_many(server, iid, n):
    for _ in range(n):
        ret = server.handle_event({"InstanceId": iid, "EventName": "access"})
        if ret["Data"]["Method"] != "kong.response.exit":
            server.step({"EventId": ret["EventId"], "Data": "/x"})


def _blocked_greenlets():
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet.Greenlet) and not o.dead)


@pytest.mark.parametrize("plugin_cls", [_ExitFirst, _ExitSecond])
def test_stock_kong_pdk_leaks_and_ours_does_not(plugin_cls):
    stock, iid = _serve(PluginServer, plugin_cls, gevent_mode=True)
    before = _blocked_greenlets()
    _exit_many(stock, iid, 300)
    stock_leak = len(stock.events) + _blocked_greenlets() - before
    assert stock_leak >= 300  # the leak this server exists to close is real

    ours, iid = _serve(PgwshardPluginServer, plugin_cls, gevent_mode=True)
    before = _blocked_greenlets()
    _exit_many(ours, iid, 300)
    for _ in range(5):  # bounded: let each drained greenlet and its reader run to their end
        gevent.sleep(0)
    assert len(ours.events) == 0
    assert _blocked_greenlets() - before == 0


def test_100k_rejected_pushes_keep_the_server_flat(plugin_server_factory):
    server = plugin_server_factory("gevent")
    rpc = KongRPC(server.socket_path)
    iid = rpc.start_instance("pgwshard", {"nodes": ["127.0.0.1:9999"]})
    bad = Request("/metrics/job/x/odd")

    def reject(n):
        for _ in range(n):
            bad.exit = None
            run_access(rpc, iid, bad)
            bad.calls.clear()
        assert bad.exit[0] == 400

    reject(10_000)  # warm up: allocator pools, caches
    rss_10k = server.rss_kib()
    reject(90_000)
    rss_100k = server.rss_kib()
    rpc.close()
    print(f"plugin server RSS: {rss_10k} KiB after 10k rejected pushes, {rss_100k} KiB after 100k")
    # A leaked event or greenlet per exit would be >= 1 KiB each: 90 MB over the last 90k.
    assert rss_100k - rss_10k < 4 * 1024
