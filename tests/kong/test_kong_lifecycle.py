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

import threading
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


def assert_on_owners(gateway: DblessGateway, paths: list[str]) -> None:
    """Every path's group on its owner only, within PLACED_WITHIN seconds."""
    def misplaced() -> list[tuple[str, list[str], str]]:
        ring, held = gateway.ring(), {}
        for pgw in gateway.pgws:
            for group in pgw.groups():
                held.setdefault(GroupingKey.from_labels(group["labels"]), []).append(pgw.address)
        wrong = []
        for path in paths:
            key = parse_push_path(path)
            holders = sorted(held.get(key, []))
            owner = ring.owner(key).name
            if holders != [owner]:
                wrong.append((path, holders, owner))
        return wrong

    last: list = []

    def placed() -> bool:
        last[:] = misplaced()
        return not last

    try:
        wait_until(placed, PLACED_WITHIN, interval=0.5, what="every acknowledged push on its owner only")
    except TimeoutError:
        pytest.fail(f"{len(last)} of {len(paths)} acknowledged pushes not on their owner only: {last[:5]}")


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
    assert kong.error_lines(since) == []
    wait_until(lambda: len(kong.plugin_server_pids()) == 1, 30, what="the old plugin servers gone")


def test_kong_restart_under_push_load_loses_no_acknowledged_push(gateway):
    """`kong restart` is stop + start: while Kong is down the proxy refuses connections (no
    answer, so nothing acknowledged is at stake); every answer Kong gives is a 2xx."""
    kong = gateway.kong
    since = kong.log_offset()
    with Pusher(kong.proxy_url, "restart") as pusher:
        pusher.wait_answered(20)
        kong.restart()
        pusher.wait_answered(60)
    pushes = pusher.pushes
    assert pushes.server_errors() == [], (pushes.statuses(), kong.error_lines(since)[:6])
    assert_on_owners(gateway, pushes.acknowledged())
    assert kong.error_lines(since) == []
