"""A pushgateway that returns to the ring: real pushgateways with persistence, the real daemon.

Issue 21, findings 1, 5 and 7: a hung pushgateway's late writes, a restarted one's stale copies,
and its groups while it is up but not yet back in the ring.
"""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager

from kong_plugin_pgwshard.core.grouping import GroupingKey
from kong_plugin_pgwshard.core.ring import Member, Ring
from kong_plugin_pgwshard.harness.nginx import NginxHost
from kong_plugin_pgwshard.harness.processes import PluginServer, Pushgateway, http_request, wait_until
from kong_plugin_pgwshard.host.render import PushLimits
from kong_plugin_pgwshard.sync.daemon import Daemon
from kong_plugin_pgwshard.sync.settings import parse_settings
from tests.support.daemon import file_members, running

KEYS = [GroupingKey.from_labels({"job": "batch", "instance": f"i{n}"}) for n in range(30)]
MOVED = "pgwshard_rebalance_groups_moved_total"


def settings_for(pgws, sd, **rebalance):
    return parse_settings({
        "pushgateways": [p.address for p in pgws],
        "health": {"probes": {"interval": 0.2, "timeout": 0.5, "rise": 1, "fall": 1}},
        "membership": {"hold_down": 2},
        "file_sd": {"path": str(sd)},
        "rebalance": {"enabled": True, "max_ops_per_second": 200, **rebalance},
    }, "test")


def put(url: str, key: GroupingKey, value: int, timeout: float = 10) -> int:
    try:
        return http_request(url + key.path(), "PUT", f"batch_done {value}\n".encode(), timeout=timeout)[0]
    except OSError:
        return 0


def held(pgw) -> dict[GroupingKey, float]:
    return {GroupingKey.from_labels(g["labels"]): float(g["batch_done"]["metrics"][0]["value"])
            for g in pgw.groups()}


@contextmanager
def restarted(pgw: Pushgateway):
    """The same pushgateway (port, persistence file) started again, stopped at the end."""
    again = Pushgateway(port=pgw.port, data_dir=pgw.data_dir).start()
    try:
        yield again
    finally:
        again.stop()


@contextmanager
def gateway(pgws, sd, read_timeout: str):
    """The plugin server behind the nginx host, following pgwshard-sync's file every 0.5 s."""
    server = PluginServer().start()
    host = None
    try:
        host = NginxHost(server.socket_path, {"membership": "file", "membership_file": str(sd),
                                              "refresh_interval": 0.5},
                         [p.address for p in pgws], limits=PushLimits(read_timeout=read_timeout)).start()
        yield host.url
    finally:
        if host is not None:
            host.stop()
        server.stop()


def test_a_hung_pushgateways_late_write_never_replaces_the_acknowledged_retry(pushgateways, tmp_path):
    """Finding 1: a push to a hung owner got 504 (nginx's read timeout); the client's retry was
    acknowledged by the stand-in. Resumed, the owner applied the timed-out push with a push time
    of *now*; after it rejoined, "newest copy wins" kept that write and deleted the acknowledged
    one. A write stored while its instance was out of the ring now loses to copies stored in it."""
    pgws = pushgateways(3)
    sd = tmp_path / "sd.json"
    everyone = {p.address for p in pgws}
    ring = Ring(Member.parse(a) for a in everyone)
    owner = pgws[0]
    key = next(k for k in KEYS if ring.owner(k).name == owner.address)
    standin = next(p for p in pgws if p.address == Ring(Member.parse(p.address) for p in pgws[1:]).owner(key).name)
    settings = settings_for(pgws, sd, quiet="0.5s", interval="60s", settle="0.5s", follow_up="1s")
    with running(Daemon(settings)), gateway(pgws, sd, read_timeout="1s") as url:
        wait_until(lambda: file_members(sd) == everyone, 10, what="three members")
        assert put(url, key, 1) == 200
        os.kill(owner.proc.pid, signal.SIGSTOP)
        try:
            assert put(url, key, 2) == 504  # nginx gave up on the hung owner; the push is in its socket
            wait_until(lambda: file_members(sd) == everyone - {owner.address}, 10, what="the hung owner out")
            value, acked = 3, None
            for value in range(3, 23):  # the client retries until acknowledged (the plugin reroutes)
                if put(url, key, value) == 200:
                    acked = value
                    break
            assert acked is not None and held(standin) == {key: acked}
        finally:
            os.kill(owner.proc.pid, signal.SIGCONT)
        # the precondition: the resumed owner stores what timed out, with a push time of now
        # the precondition: the resumed owner stores what timed out, with a push time of now
        wait_until(lambda: held(owner).get(key, acked) != acked, 10, interval=0.02, what="the late write applied")
        wait_until(lambda: file_members(sd) == everyone, 15, what="the owner rejoins")

        def one_copy() -> bool:
            return sum(key in held(p) for p in pgws) == 1 and key in held(owner)
        wait_until(one_copy, 60, what="one copy, on the owner")  # a pass after the rejoin; bounded for a loaded machine
        assert held(owner)[key] == acked


def test_a_returning_owner_keeps_its_groups_while_held_down(pushgateways, tmp_path):
    """Finding 7: a pushgateway up again but not yet back in the ring (rise, hold-down) had its
    groups moved to the stand-ins by the passes meanwhile, and back after it rejoined: two moves
    per group and duplicates in between. It keeps them now; nothing moves at all."""
    pgws = pushgateways(3)
    sd = tmp_path / "sd.json"
    everyone = {p.address for p in pgws}
    ring = Ring(Member.parse(a) for a in everyone)
    owner = pgws[0]
    mine = {k for k in KEYS if ring.owner(k).name == owner.address}
    for key in KEYS:
        assert put(f"http://{ring.owner(key).name}", key, 1) == 200
    settings = settings_for(pgws, sd, quiet="0.5s", interval="1s", settle="0.5s", follow_up="1s")
    with running(Daemon(settings)) as daemon:
        wait_until(lambda: file_members(sd) == everyone, 10, what="three members")
        owner.stop()  # SIGTERM: it writes its persistence file
        wait_until(lambda: file_members(sd) == everyone - {owner.address}, 10, what="the owner gone")
        with restarted(owner) as returned:
            passes = len(daemon.passes)
            seen_elsewhere: set[GroupingKey] = set()

            def back() -> bool:
                for other in pgws[1:]:
                    seen_elsewhere.update(mine & held(other).keys())
                return file_members(sd) == everyone
            wait_until(back, 15, what="the owner rejoins")
            # the precondition: passes ran while it was up and held down (every second)
            assert len(daemon.passes) - passes >= 1
            assert not seen_elsewhere
            assert set(held(returned)) == mine
            assert daemon.registry.get_sample_value(MOVED) == 0


def test_a_restarted_pushgateway_rejoins_without_its_stale_copies(pushgateways, tmp_path):
    """Finding 5: a restarted pushgateway came back with its persistence file holding every
    group it owned, while newer copies sat on the stand-ins: duplicates from its rejoining until
    the pass after it. The copies that lost are deleted before it rejoins now."""
    pgws = pushgateways(3)
    sd = tmp_path / "sd.json"
    everyone = {p.address for p in pgws}
    ring = Ring(Member.parse(a) for a in everyone)
    without = Ring(Member.parse(p.address) for p in pgws[1:])
    owner = pgws[0]
    mine = sorted((k for k in KEYS if ring.owner(k).name == owner.address), key=str)
    assert len(mine) >= 2
    pushed_again, kept = mine[: len(mine) // 2], mine[len(mine) // 2:]
    for key in mine:
        assert put(owner.url, key, 1) == 200
    # no pass while it is held down: only the clearing before it rejoins can remove its copies
    settings = settings_for(pgws, sd, quiet="0s", interval="60s", settle="3s", follow_up="0s")
    with running(Daemon(settings)) as daemon:
        wait_until(lambda: file_members(sd) == everyone, 10, what="three members")
        owner.stop()  # SIGTERM: it writes its persistence file
        wait_until(lambda: file_members(sd) == everyone - {owner.address}, 10, what="the owner gone")
        wait_until(lambda: any(why == "change" for why, _ in daemon.passes), 10, what="the change's pass")
        for key in pushed_again:  # the clients' next pushes reach the stand-ins
            assert put(f"http://{without.owner(key).name}", key, 2) == 200
        with restarted(owner) as returned:
            wait_until(lambda: file_members(sd) == everyone, 15, what="the owner rejoins")
            at_rejoin = held(returned)  # the rejoin's pass is `settle` (3 s) away
            assert at_rejoin == {k: 1 for k in kept}

            def converged() -> bool:
                return (held(returned) == {**{k: 1 for k in kept}, **{k: 2 for k in pushed_again}}
                        and not any(set(mine) & held(p).keys() for p in pgws[1:]))
            wait_until(converged, 15, what="the newer copies moved home")
