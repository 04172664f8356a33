"""The plugin follows the membership pgwshard-sync maintains, off the request path."""
from __future__ import annotations

import json
import logging
import os
import threading

from kong_plugin_pgwshard.core.file_sd import read_file_sd
from kong_plugin_pgwshard.core.ring import Member
from kong_plugin_pgwshard.harness.kong_rpc import KongRPC, Request, run_access
from kong_plugin_pgwshard.harness.processes import wait_until
from kong_plugin_pgwshard.plugin.config import PluginConfig
from kong_plugin_pgwshard.plugin.membership import (
    FileMembership,
    UpstreamMembership,
    membership_for,
    release,
)
from kong_plugin_pgwshard.sync.settings import FileSdSettings
from kong_plugin_pgwshard.sync.sinks import FileSdSink

A, B = "127.0.0.1:9401", "127.0.0.1:9402"


def targets_of(rpc, iid, n=40) -> set:
    return {run_access(rpc, iid, Request(f"/metrics/job/j/i/{i}")).target for i in range(n)}


def test_plugin_follows_the_kong_upstream_and_keeps_the_last_good_set(plugin_server_factory, kong_admin):
    kong = kong_admin()
    kong.add_upstream("pushgateways", [A])
    server = plugin_server_factory()
    rpc = KongRPC(server.socket_path)
    iid = rpc.start_instance("pgwshard", {"membership": "upstream", "upstream": "pushgateways",
                                          "admin_url": kong.url, "refresh_interval": 0.2})
    assert targets_of(rpc, iid) == {("127.0.0.1", 9401)}

    kong.add_target("pushgateways", B)
    wait_until(lambda: targets_of(rpc, iid) == {("127.0.0.1", 9401), ("127.0.0.1", 9402)}, 10, what="B joins")
    assert "added ['127.0.0.1:9402']" in server.log()

    kong.stop()  # Admin API gone: the ring stays as it was
    wait_until(lambda: "read failed, keeping 2 members" in server.log(), 10, what="a failed refresh")
    assert targets_of(rpc, iid) == {("127.0.0.1", 9401), ("127.0.0.1", 9402)}


def test_an_empty_target_list_read_successfully_empties_the_ring(plugin_server_factory, tmp_path):
    sd = tmp_path / "members.json"
    sd.write_text(json.dumps([{"targets": [A]}]))
    server = plugin_server_factory()
    rpc = KongRPC(server.socket_path)
    iid = rpc.start_instance("pgwshard", {"membership": "file", "membership_file": str(sd), "refresh_interval": 0.2})
    assert run_access(rpc, iid, Request("/metrics/job/x")).target == ("127.0.0.1", 9401)
    sd.write_text("{ not json")  # a corrupt file: keep the last good set
    wait_until(lambda: "read failed, keeping 1 members" in server.log(), 10, what="a failed read")
    assert run_access(rpc, iid, Request("/metrics/job/x")).target == ("127.0.0.1", 9401)
    sd.write_text("[]")  # pgwshard-sync wrote "nobody is healthy"
    wait_until(lambda: run_access(rpc, iid, Request("/metrics/job/x")).exit, 10, what="503")
    assert run_access(rpc, iid, Request("/metrics/job/x")).exit[0] == 503


def test_ring_answers_while_a_refresh_hangs(kong_admin):
    kong = kong_admin()
    kong.add_upstream("pushgateways", [A, B])
    source = UpstreamMembership(kong.url, "pushgateways", None, interval=0.1, timeout=30)
    try:
        assert len(source.ring()) == 2
        kong.stall.set()
        wait_until(lambda: kong.stalled, 10, what="the refresher blocked inside a request")
        answered: list[int] = []
        lookups = threading.Thread(target=lambda: answered.extend(len(source.ring()) for _ in range(1000)))
        lookups.start()
        lookups.join(20)  # the stalled refresh cannot finish for 30 s
        # every lookup answered from memory while the refresher was still stuck in its request
        assert kong.stall.is_set() and kong.stalled == 1
        assert answered == [2] * 1000
    finally:
        kong.stall.clear()
        source.close()


def test_the_plugin_follows_what_the_file_sd_sink_writes(tmp_path, caplog):
    sd = tmp_path / "sd" / "pushgateways.json"
    sink = FileSdSink(FileSdSettings(str(sd), {"role": "pushgateway"}))
    sink.apply([Member.parse(A)])
    with caplog.at_level(logging.INFO, logger="pgwshard.membership"):
        source = FileMembership(str(sd), interval=0.1)
        try:
            assert source.ring().members == (Member.parse(A),)
            sink.apply([Member.parse(A), Member.parse(B)])
            wait_until(lambda: len(source.ring()) == 2, 10, what="B joins")
            sink.apply([Member.parse(B)])
            wait_until(lambda: source.ring().members == (Member.parse(B),), 10, what="A leaves")
        finally:
            source.close()
    assert "added ['127.0.0.1:9402']" in caplog.text and "removed ['127.0.0.1:9401']" in caplog.text


def test_instances_naming_the_same_source_share_one_poller(tmp_path):
    sd = tmp_path / "members.json"
    sd.write_text(json.dumps([{"targets": [A]}]))
    config = PluginConfig.from_kong({"membership": "file", "membership_file": str(sd), "refresh_interval": 0.1})
    first = membership_for(config)
    try:
        # Kong starts a new instance on every config change: it must not start a second poller
        assert membership_for(PluginConfig.from_kong({"membership": "file", "membership_file": str(sd),
                                                      "refresh_interval": 0.1})) is first
        pollers = [t for t in threading.enumerate() if t.name == f"pgwshard-membership file {sd}"]
        assert len(pollers) == 1
        other = tmp_path / "other.json"
        other.write_text("[]")
        second = membership_for(PluginConfig.from_kong({"membership": "file", "membership_file": str(other),
                                                             "refresh_interval": 0.1}))
        assert second is not first and len(second.ring()) == 0
        release(second)
        release(first)  # one of the two instances sharing the first source
        assert pollers[0].is_alive()
    finally:
        release(first)
    pollers[0].join(5)
    assert not pollers[0].is_alive()  # the last user closed it


def test_closing_instances_stops_their_pollers_and_a_new_instance_reads_afresh(plugin_server_factory, tmp_path):
    server = plugin_server_factory()
    rpc = KongRPC(server.socket_path)
    sd = tmp_path / "members.json"
    sd.write_text(json.dumps([{"targets": [A]}]))
    config = {"membership": "file", "membership_file": str(sd), "refresh_interval": 60}
    threads_before = _threads(server)
    first = rpc.start_instance("pgwshard", config)
    second = rpc.start_instance("pgwshard", config)  # shares the first one's poller
    assert _threads(server) == threads_before + 1
    assert targets_of(rpc, second, 1) == {("127.0.0.1", 9401)}

    rpc.call("plugin.CloseInstance", first)
    rpc.call("plugin.CloseInstance", second)
    wait_until(lambda: _threads(server) == threads_before, 5, what="the poller to stop")

    sd.write_text(json.dumps([{"targets": [B]}]))  # long before the old poller's next read
    third = rpc.start_instance("pgwshard", config)
    assert targets_of(rpc, third, 1) == {("127.0.0.1", 9402)}
    rpc.close()


def _threads(server) -> int:
    return len(os.listdir(f"/proc/{server.proc.pid}/task"))


def test_read_file_sd_takes_every_group(tmp_path):
    sd = tmp_path / "sd.json"
    sd.write_text(json.dumps([{"targets": [A], "labels": {"x": "1"}}, {"targets": [B]}]))
    assert read_file_sd(str(sd)) == [Member.parse(A), Member.parse(B)]


def test_plugin_sends_the_admin_token_from_its_environment_and_never_logs_it(kong_admin, request):
    import os

    from kong_plugin_pgwshard.harness.processes import PluginServer

    kong = kong_admin(token="plug1n-t0ken")
    kong.add_upstream("pushgateways", [A])
    server = PluginServer()
    server.env = {**os.environ, "KONG_ADMIN_TOKEN": "plug1n-t0ken"}
    request.addfinalizer(server.stop)
    server.start()
    rpc = KongRPC(server.socket_path)
    iid = rpc.start_instance("pgwshard", {"membership": "upstream", "upstream": "pushgateways",
                                          "admin_url": kong.url, "refresh_interval": 0.2})
    assert targets_of(rpc, iid, 5) == {("127.0.0.1", 9401)}
    kong.token = "rotated-t0ken"  # Kong now refuses the plugin's token: 401 on every refresh
    wait_until(lambda: "401" in server.log(), 10, what="a refused refresh")
    assert targets_of(rpc, iid, 5) == {("127.0.0.1", 9401)}  # last good ring kept
    assert "t0ken" not in server.log()


def test_malformed_files_keep_the_last_good_ring_and_the_poller_alive(tmp_path, caplog):
    sd = tmp_path / "members.json"
    sd.write_text(json.dumps([{"targets": [A]}]))
    source = FileMembership(str(sd), interval=0.05)
    try:
        for bad in ("", "[1]", '{"targets": ["127.0.0.1:9402"]}', '[{"targets": "127.0.0.1:9402"}]',
                    '[{"targets": ["no-port"]}]'):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="pgwshard.membership"):
                sd.write_text(bad)
                wait_until(lambda: "read failed, keeping 1 members" in caplog.text, 10, what=f"rejecting {bad!r}")
            assert source.ring().members == (Member.parse(A),)
        sd.write_text(json.dumps([{"targets": [B]}]))  # the same poller picks up the next good file
        wait_until(lambda: source.ring().members == (Member.parse(B),), 10, what="recovery")
    finally:
        source.close()


def test_a_weight_zero_target_owns_nothing(kong_admin):
    kong = kong_admin()
    kong.add_upstream("pushgateways", [A, B])
    kong.targets["pushgateways"][1]["weight"] = 0  # Kong: weight 0 receives no traffic
    source = UpstreamMembership(kong.url, "pushgateways", None, interval=30)
    try:
        assert source.ring().members == (Member.parse(A),)
    finally:
        source.close()


def test_a_big_change_is_logged_in_one_short_line(tmp_path, caplog):
    sd = tmp_path / "members.json"
    sd.write_text(json.dumps([{"targets": [f"10.4.0.{i}:9091" for i in range(1, 201)]}]))
    with caplog.at_level(logging.WARNING, logger="pgwshard.membership"):
        source = FileMembership(str(sd), interval=30)
        source.close()
    [line] = [r.getMessage() for r in caplog.records]
    assert "now 200 members" in line and "and 180 more" in line and len(line) < 1000


def test_the_plugin_routes_by_the_weights_in_the_file_as_kong_would(plugin_server_factory, kong_admin, tmp_path):
    """The file carries pgwshard-sync's weights: a plugin following it sends every push where a
    plugin following Kong's weighted targets does (before, every member of the file weighed 100)."""
    members = [Member.parse(A, 300), Member.parse(B), Member.parse("127.0.0.1:9403", 0)]
    sd = tmp_path / "sd.json"
    FileSdSink(FileSdSettings(str(sd))).apply(members)
    kong = kong_admin()
    kong.add_upstream("pushgateways")
    for m in members:
        kong.add_target("pushgateways", m.name, m.weight)
    server = plugin_server_factory()
    rpc = KongRPC(server.socket_path)
    by_file = rpc.start_instance("pgwshard", {"membership": "file", "membership_file": str(sd)})
    by_kong = rpc.start_instance("pgwshard", {"membership": "upstream", "upstream": "pushgateways",
                                              "admin_url": kong.url})
    paths = [f"/metrics/job/w/instance/{i}" for i in range(200)]
    routed = [run_access(rpc, by_file, Request(p)).target for p in paths]
    assert routed == [run_access(rpc, by_kong, Request(p)).target for p in paths]
    assert ("127.0.0.1", 9403) not in routed and routed.count(("127.0.0.1", 9401)) > routed.count(("127.0.0.1", 9402))
    rpc.close()


def test_a_change_of_the_file_reaches_the_plugin_before_its_periodic_read(plugin_server_factory, tmp_path):
    """pgwshard-sync replaces the file when a member leaves: the plugin's change check (inode,
    mtime, size, every watch_interval) reads it at once, not at the next refresh_interval (60 s)."""
    sd = tmp_path / "members.json"
    sink = FileSdSink(FileSdSettings(str(sd)))
    sink.apply([Member.parse(A), Member.parse(B)])
    server = plugin_server_factory()
    rpc = KongRPC(server.socket_path)
    iid = rpc.start_instance("pgwshard", {"membership": "file", "membership_file": str(sd), "refresh_interval": 60})
    assert targets_of(rpc, iid) == {("127.0.0.1", 9401), ("127.0.0.1", 9402)}
    sink.apply([Member.parse(B)])
    wait_until(lambda: targets_of(rpc, iid) == {("127.0.0.1", 9402)}, 15, what="A leaves before the 60 s read")
    rpc.close()


def test_a_new_kong_configuration_reaches_the_plugin_before_its_periodic_read(plugin_server_factory, kong_admin):
    """A DB-less node (or data plane) shows its configuration hash on /status: the plugin checks
    that, and reads the targets only when it moved (once here), not every watch_interval."""
    status = kong_admin(status_api=True)
    status.load_config({"_format_version": "3.0", "upstreams": [
        {"name": "pushgateways", "targets": [{"target": A}, {"target": B}]}]})
    server = plugin_server_factory()
    rpc = KongRPC(server.socket_path)
    iid = rpc.start_instance("pgwshard", {"membership": "upstream", "upstream": "pushgateways",
                                          "admin_url": status.url, "refresh_interval": 60})
    assert targets_of(rpc, iid) == {("127.0.0.1", 9401), ("127.0.0.1", 9402)}
    status.load_config({"_format_version": "3.0", "upstreams": [
        {"name": "pushgateways", "targets": [{"target": B}]}]})
    wait_until(lambda: targets_of(rpc, iid) == {("127.0.0.1", 9402)}, 15, what="A leaves before the 60 s read")
    reads = [path for method, path, _ in status.requests if path.endswith("/targets")]
    assert len(reads) == 2  # at the start and after the change
    rpc.close()


def test_without_a_configuration_hash_the_plugin_stops_checking_and_reads_periodically(kong_admin):
    """Kong in DB mode shows no configuration hash: no check every watch_interval that can say
    nothing; the targets are read every refresh_interval."""
    kong = kong_admin()
    kong.add_upstream("pushgateways", [A])
    source = UpstreamMembership(kong.url, "pushgateways", None, interval=0.2, watch_interval=0.05)
    try:
        kong.add_target("pushgateways", B)
        wait_until(lambda: len(source.ring()) == 2, 10, what="B joins at a periodic read")
        assert sum(path == "/status" for method, path, _ in kong.requests) == 1
    finally:
        source.close()
