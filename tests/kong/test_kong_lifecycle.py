"""Kong's life cycle under a steady push load, in real Kong 3.9.3 (DB-less, shipped kong.conf
lines and kong.yml, pgwshard-sync in declarative mode with the rebalancer on).

A pusher thread PUTs a new group every ~15 ms through `kong start` (from the moment `kong start`
returns: the proxy port is tried until it accepts), `kong reload`, `kong restart` (stop + start)
and a SIGKILL of the plugin server (Kong respawns it). At start and reload not one push may get a
5xx; for a restart and a kill the test records what Kong answers. After each, every acknowledged
push must be on its owner only, well before the rebalancer's periodic pass (rebalance.interval
is an hour here): a push Kong sent on without the plugin is found and moved because
pgwshard-sync notices the node's new workers (README, "When the plugin server fails")."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from kong_plugin_pgwshard.core.grouping import GroupingKey, parse_push_path
from kong_plugin_pgwshard.harness.processes import http_request, wait_until

from .conftest import DblessGateway

pytestmark = pytest.mark.kong

BODY = b"# TYPE lifecycle_items counter\nlifecycle_items 1\n"
PUSH_EVERY = 0.015
PLACED_WITHIN = 45.0  # seconds for every acknowledged push to be on its owner only (the periodic pass: 3600 s)


@dataclass
class Pushes:
    """What one pusher saw: each push's path and answer (an HTTP status, or the OSError's name
    when no answer came: the proxy not listening yet, or gone during a restart)."""

    answers: list[tuple[str, int | str]] = field(default_factory=list)

    def statuses(self) -> Counter:
        return Counter(a for _, a in self.answers)

    def acknowledged(self) -> list[str]:
        return [p for p, a in self.answers if isinstance(a, int) and 200 <= a < 300]

    def server_errors(self) -> list[tuple[str, int | str]]:
        return [(p, a) for p, a in self.answers if isinstance(a, int) and a >= 500]

    def first_answered(self) -> int:
        """Index of the first push that got any HTTP answer."""
        return next(i for i, (_, a) in enumerate(self.answers) if isinstance(a, int))


class Pusher:
    """A thread pushing a new group (`job=lifecycle/instance=<tag>-<n>`) every PUSH_EVERY
    seconds until stopped, at most `limit` pushes."""

    def __init__(self, url: str, tag: str, limit: int = 4000):
        self.url, self.tag, self.limit = url, tag, limit
        self.pushes = Pushes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pusher-{tag}", daemon=True)

    def __enter__(self) -> Pusher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> Pushes:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the pusher hung"
        return self.pushes

    def wait_answered(self, count: int, timeout: float = 30) -> None:
        """Until `count` more pushes than now got an HTTP answer."""
        target = sum(1 for _, a in self.pushes.answers if isinstance(a, int)) + count
        wait_until(lambda: sum(1 for _, a in list(self.pushes.answers) if isinstance(a, int)) >= target,
                   timeout, what=f"{count} pushes answered")

    def _run(self) -> None:
        for n in range(self.limit):
            if self._stop.is_set():
                return
            path = f"/metrics/job/lifecycle/instance/{self.tag}-{n}"
            try:
                status, _ = http_request(self.url + path, "PUT", BODY, timeout=15)
                answer: int | str = status
            except OSError as err:
                answer = type(err).__name__
            self.pushes.answers.append((path, answer))
            self._stop.wait(PUSH_EVERY)


@pytest.fixture(scope="module")
def gateway(kong_bin):
    world = DblessGateway(kong_bin, rebalance=True, sync_settings={"rebalance": {
        "enabled": True, "max_ops_per_second": 500, "interval": "3600s", "settle": "1s", "quiet": "2s",
        "follow_up": "2s"}})
    world.wait_targets({p.address for p in world.pgws})
    yield world
    world.stop()


def placement(gateway: DblessGateway, paths: list[str]) -> dict[str, tuple[list[str], str]]:
    """Each path's group: (the pushgateways holding it, its owner)."""
    ring, held = gateway.ring(), {}
    for pgw in gateway.pgws:
        for group in pgw.groups():
            held.setdefault(GroupingKey.from_labels(group["labels"]), []).append(pgw.address)
    return {path: (sorted(held.get(parse_push_path(path), [])), ring.owner(parse_push_path(path)).name)
            for path in paths}


def assert_on_owners(gateway: DblessGateway, paths: list[str]) -> None:
    """Every path's group on its owner only, within PLACED_WITHIN seconds (and held somewhere
    at once: nothing acknowledged is lost)."""
    where = placement(gateway, paths)
    assert [p for p, (holders, _) in where.items() if not holders] == [], "acknowledged pushes lost"
    strays = sum(1 for holders, owner in where.values() if holders != [owner])
    print(f"{len(paths)} acknowledged, {strays} off their owner at first", end="")
    started = time.monotonic()
    last: list = []

    def placed() -> bool:
        last[:] = [(p, h, o) for p, (h, o) in placement(gateway, paths).items() if h != [o]]
        return not last

    try:
        wait_until(placed, PLACED_WITHIN, interval=0.5, what="every acknowledged push on its owner only")
    except TimeoutError:
        pytest.fail(f"{len(last)} of {len(paths)} acknowledged pushes not on their owner only: {last[:5]}")
    print(f", all on their owner after {time.monotonic() - started:.1f} s")


def test_kong_start_under_push_load_answers_no_5xx(gateway):
    kong = gateway.kong
    kong.stop()
    since = kong.log_offset()
    with Pusher(kong.proxy_url, "start") as pusher:
        kong.start(wait=False)  # pushes are already knocking: the first one Kong accepts counts
        pusher.wait_answered(100)
    pushes = pusher.pushes
    assert pushes.server_errors() == [], (pushes.statuses(), kong.error_lines(since)[:6])
    first = pushes.first_answered()
    assert all(isinstance(a, int) for _, a in pushes.answers[first:]), pushes.statuses()
    assert_on_owners(gateway, pushes.acknowledged())
    assert kong.error_lines(since) == []
    assert kong.holder_pids() == []  # the server claimed the socket Kong's master held for it


def test_kong_reload_under_push_load_answers_no_5xx(gateway):
    kong = gateway.kong
    since = kong.log_offset()
    with Pusher(kong.proxy_url, "reload") as pusher:
        pusher.wait_answered(20)
        for _ in range(3):
            before = set(kong.plugin_server_pids())
            kong.reload()
            wait_until(lambda old=before: set(kong.plugin_server_pids()) - old, 30, what="the new plugin server")
            pusher.wait_answered(40)
    pushes = pusher.pushes
    assert pushes.server_errors() == [], (pushes.statuses(), kong.error_lines(since)[:6])
    assert all(isinstance(a, int) for _, a in pushes.answers), pushes.statuses()
    assert_on_owners(gateway, pushes.acknowledged())
    # Kong's calls that an old worker began on the old server and went on with on the new one
    # fail ("event id N not found", "broken pipe"): Kong sends such a push on without the plugin
    # (2xx, maybe to a non-owner, moved above); nothing else goes wrong
    errors = kong.error_lines(since)
    assert [line for line in errors if "mp_rpc.lua" not in line or "[pgwshard]" not in line] == []
    wait_until(lambda: len(kong.plugin_server_pids()) == 1, 30, what="the old plugin servers gone")


def test_kong_restart_under_push_load_loses_no_acknowledged_push(gateway):
    """`kong restart` is stop + start: while Kong is down the proxy refuses connections (no
    answer, so nothing acknowledged is at stake); every answer Kong gives is a 2xx, the start
    as clean as a cold one."""
    kong = gateway.kong
    with Pusher(kong.proxy_url, "restart") as pusher:
        pusher.wait_answered(20)
        kong.stop()  # `kong restart`: stop, then start (nginx's own shutdown lines are not checked)
        since = kong.log_offset()
        kong.start(wait=False)
        pusher.wait_answered(60)
    pushes = pusher.pushes
    assert pushes.server_errors() == [], (pushes.statuses(), kong.error_lines(since)[:6])
    assert_on_owners(gateway, pushes.acknowledged())
    assert kong.error_lines(since) == []


@pytest.mark.parametrize("change", ["reload", "restart"])
def test_pgwshard_sync_moves_a_stray_as_soon_as_kong_reloads_or_restarts(gateway, change):
    """A push Kong sent on without the plugin sits on a non-owner (put there directly here, as
    Kong's `hash_on: path` would). pgwshard-sync sees the node's new workers and runs a pass:
    the periodic one is an hour away in this gateway."""
    path = "/metrics/job/lifecycle/instance/stray-" + change
    key = parse_push_path(path)
    owner = gateway.owner(path)
    other = next(p for p in gateway.pgws if p.address != owner)
    status, body = http_request(other.url + path, "PUT", BODY, timeout=10)
    assert status in (200, 202), body
    assert gateway.holders(key) == [other.address]
    getattr(gateway.kong, change)()
    wait_until(lambda: gateway.holders(key) == [owner], PLACED_WITHIN, interval=0.5,
               what="the stray moved to its owner")


def test_a_plugin_server_killed_under_push_load_is_respawned_and_nothing_acknowledged_is_lost(gateway):
    """SIGKILL of the plugin server: Kong respawns it (worker 0, at most once a second). What
    Kong answers meanwhile is recorded: pushes whose worker had an instance go on without the
    plugin (`hash_on: path`, 2xx, maybe off their owner), a worker that must start an instance
    answers 500 (`starting instance: connection refused`). Kong logs each as a [pgwshard] error."""
    kong = gateway.kong
    since = kong.log_offset()
    with Pusher(kong.proxy_url, "kill") as pusher:
        pusher.wait_answered(20)
        # the server of an earlier stop or reload may still be draining (10 s at most)
        (old,) = wait_until(lambda: kong.plugin_server_pids() if len(kong.plugin_server_pids()) == 1 else None,
                            30, what="one plugin server")
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: kong.plugin_server_pids() and old not in kong.plugin_server_pids(), 30,
                   what="Kong to respawn the plugin server")
        pusher.wait_answered(60)
    pushes = pusher.pushes
    statuses = pushes.statuses()
    print("answers around a plugin server kill:", dict(statuses))
    assert set(statuses) <= {200, 500}, statuses
    errors = kong.error_lines(since)
    # about the plugin server or the pushes it failed, nothing else
    assert all("pgwshard" in line or "/instance/kill-" in line for line in errors), errors
    # a 500 is a push Kong refused; every push it acknowledged is held somewhere
    acknowledged = pushes.acknowledged()
    where = placement(gateway, acknowledged)
    assert [p for p, (holders, _) in where.items() if not holders] == []
    strays = [p for p, (holders, owner) in where.items() if holders != [owner]]
    print(f"acknowledged: {len(acknowledged)}, off their owner: {len(strays)}")
    # Kong shows a respawned plugin server nowhere pgwshard-sync looks (its workers stay): the
    # strays wait for the rebalancer's periodic pass, which one `pgwshard rebalance` stands in for
    subprocess.run([sys.executable, "-m", "kong_plugin_pgwshard.cli", "rebalance",
                    "--nodes", ",".join(p.address for p in gateway.pgws)], check=True, timeout=120,
                   capture_output=True)
    assert_on_owners(gateway, acknowledged)
