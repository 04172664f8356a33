"""Deletes through pgwshard-sync stick: real pushgateways with persistence, the real daemon."""
from __future__ import annotations

import pytest

from kong_plugin_pgwshard.core.grouping import GroupingKey
from kong_plugin_pgwshard.core.ring import Member, Ring
from kong_plugin_pgwshard.errors import ConfigError
from kong_plugin_pgwshard.harness.processes import Pushgateway, free_port, http_request, wait_until
from kong_plugin_pgwshard.sync.daemon import Daemon
from kong_plugin_pgwshard.sync.deletes import Tombstones
from kong_plugin_pgwshard.sync.settings import parse_settings
from tests.support.daemon import file_members, running


def request(url: str, method: str, body: bytes | None = None) -> int:
    return http_request(url, method, body, timeout=10)[0]


def held(pgw) -> dict[str, float]:
    return {str(GroupingKey.from_labels(g["labels"])): float(g["batch_done"]["metrics"][0]["value"])
            for g in pgw.groups()}


def test_a_delete_during_the_owners_outage_stays_deleted_when_it_returns(pushgateways, tmp_path):
    """Issue 14: with the owner down, a DELETE went to the stand-in owner (202); the owner came
    back with its persistence file and every deleted group came back. Here the delete goes to
    pgwshard-sync, which is restarted while the owner is away: its tombstones survive that and
    are applied before the owner rejoins the ring."""
    pgws = pushgateways(3)
    sd, tombs, port = tmp_path / "sd.json", tmp_path / "tombstones.json", free_port()
    settings = parse_settings({
        "pushgateways": [p.address for p in pgws],
        "health": {"probes": {"interval": 0.2, "timeout": 0.5, "rise": 1, "fall": 1}},
        "membership": {"hold_down": 0.5},
        "file_sd": {"path": str(sd)},
        "rebalance": {"enabled": True, "quiet": "1s", "interval": "60s", "settle": "0.5s", "follow_up": "1s"},
        "deletes": {"listen": f"127.0.0.1:{port}", "tombstone_file": str(tombs)},
    }, "test")
    ring = Ring(Member.parse(p.address) for p in pgws)
    keys = [GroupingKey.from_labels({"job": "batch", "instance": f"i{n}"}) for n in range(30)]
    owner = pgws[0]
    mine = [k for k in keys if ring.owner(k).name == owner.address]
    assert len(mine) >= 3
    deleted, pushed_again, kept = mine[0], mine[1], mine[2:]
    for key in mine:
        assert request(owner.url + key.path(), "PUT", b"batch_done 1\n") == 200
    api = f"http://127.0.0.1:{port}"

    with running(Daemon(settings)):
        wait_until(lambda: file_members(sd) == {p.address for p in pgws}, 10, what="three members")
        owner.stop()  # SIGTERM: it writes its persistence file
        wait_until(lambda: file_members(sd) == {p.address for p in pgws[1:]}, 10, what="the owner gone")
        assert request(api + deleted.path(), "DELETE") == 202
        assert request(api + pushed_again.path(), "DELETE") == 202
    standin = Ring(Member.parse(p.address) for p in pgws[1:]).owner(pushed_again).name
    assert request(f"http://{standin}{pushed_again.path()}", "PUT", b"batch_done 2\n") == 200

    with running(Daemon(settings)):  # a new pgwshard-sync, from the same tombstone file
        returned = Pushgateway(port=owner.port, data_dir=owner.data_dir).start()
        try:
            wait_until(lambda: file_members(sd) == {p.address for p in pgws}, 15, what="the owner rejoins")
            everywhere = [held(p) for p in [returned, *pgws[1:]]]
            assert all(str(deleted) not in h for h in everywhere)
            # a push after the delete wins over the tombstone: it moves to its owner, one copy;
            # the owner keeps the groups nobody touched (it was never drained while held down)
            want = {**{str(k): 1.0 for k in kept}, str(pushed_again): 2.0}

            def converged() -> bool:
                return held(returned) == want and not any(str(k) in held(p) for k in mine for p in pgws[1:])
            wait_until(converged, 15, what="the newer push moved home, the deleted group gone, the rest kept")
        finally:
            returned.stop()


def test_tombstones_survive_a_restart_and_expire(tmp_path):
    now = [1000.0]
    path = str(tmp_path / "t.json")
    key = GroupingKey.from_labels({"job": "a"})
    Tombstones(path, ttl=60, clock=lambda: now[0]).record(key)
    again = Tombstones(path, ttl=60, clock=lambda: now[0])
    assert again.covers(key, 999.0) and not again.covers(key, 1001.0)
    now[0] += 61
    assert again.deleted_at(key) is None


@pytest.mark.parametrize("deletes, key", [
    ({"listen": "127.0.0.1:9552"}, "deletes.tombstone_file"),
    ({"tombstone_file": "/x", "tombstone_ttl": "1s"}, "deletes.tombstone_ttl"),
    ({"tombstone_file": "/x", "listen": "nowhere"}, "deletes.listen"),
])
def test_delete_settings_name_the_key(deletes, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_settings({"pushgateways": ["a:1"], "deletes": deletes}, "test")


def test_the_host_sends_deletes_past_the_plugin_to_the_delete_api(pushgateways, tmp_path):
    """As Kong's pgwshard-deletes route (a service without the plugin): a DELETE through the
    OpenResty host reaches pgwshard-sync even while the plugin server is down, and is recorded;
    a push meanwhile goes Kong's way (the upstream's own hashing). Before, the host ran the
    plugin on every DELETE first: with the plugin server down a delete was not acknowledged."""
    from kong_plugin_pgwshard.harness.nginx import NginxHost
    from kong_plugin_pgwshard.harness.processes import PluginServer

    pgws = pushgateways(2)
    tombs, port = tmp_path / "tombstones.json", free_port()
    settings = parse_settings({
        "pushgateways": [p.address for p in pgws],
        "health": {"probes": {"interval": 0.2, "timeout": 0.5, "rise": 1, "fall": 1}},
        "file_sd": {"path": str(tmp_path / "sd.json")},
        "rebalance": {"enabled": False},
        "deletes": {"listen": f"127.0.0.1:{port}", "tombstone_file": str(tombs)},
    }, "test")
    key = GroupingKey.from_labels({"job": "batch", "instance": "gone"})
    for pgw in pgws:
        assert request(pgw.url + key.path(), "PUT", b"batch_done 1\n") == 200
    server = PluginServer().start()
    host = NginxHost(server.socket_path, {"membership": "static", "nodes": [p.address for p in pgws]},
                     [p.address for p in pgws], deletes=f"127.0.0.1:{port}").start()
    try:
        with running(Daemon(settings)):
            wait_until(lambda: request(f"http://127.0.0.1:{port}/-/healthy", "GET") in (200, 404), 10,
                       what="the delete API listening")
            server.stop()
            assert request(host.url + key.path(), "DELETE") == 202
            # Pushgateway applies a DELETE from its write queue, after its 202: wait for it
            wait_until(lambda: all(str(key) not in held(p) for p in pgws), 10, what="the group deleted")
            assert Tombstones(str(tombs), ttl=3600).deleted_at(key) is not None
            assert request(host.url + "/metrics/job/batch/instance/kept", "PUT", b"batch_done 2\n") == 200
    finally:
        host.stop()
        server.stop()
