"""Rebalancing with real pushgateways (and a real Prometheus watching them)."""
from __future__ import annotations

import contextlib
import time
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from kong_plugin_pgwshard.clients.pushgateway import PushgatewayClient
from kong_plugin_pgwshard.core.grouping import GroupingKey
from kong_plugin_pgwshard.core.ring import Member, Ring
from kong_plugin_pgwshard.harness.processes import wait_until
from kong_plugin_pgwshard.rebalance.history import MembershipHistory
from kong_plugin_pgwshard.rebalance.rebalancer import (
    COPY,
    DELETE,
    MARKER_FAMILY,
    MAX_WAIT_QUIETS,
    MOVED_FAMILY,
    SKIP,
    Rebalancer,
)
from tests.rebalance.test_exposition import ALL_TYPES

KEYS = [GroupingKey.from_labels({"job": "batch", "instance": f"node-{n}"}) for n in range(40)]


def ring_of(pgws) -> Ring:
    return Ring(Member.parse(p.address) for p in pgws)


def owner_and_other(pgws, ring, key):
    """Of two pushgateways: the one owning key on ring, and the other."""
    owner = next(p for p in pgws if p.address == ring.owner(key).name)
    return owner, next(p for p in pgws if p is not owner)


def body(done: int, depth: float = 0.5) -> str:
    return ("# TYPE jobs_done_total counter\n"
            f"jobs_done_total {done}\n"
            "# TYPE queue_depth histogram\n"
            f'queue_depth_bucket{{le="1"}} {done}\nqueue_depth_bucket{{le="+Inf"}} {done}\n'
            f"queue_depth_sum {depth}\nqueue_depth_count {done}\n")


def push(pgw, key: GroupingKey, done: int) -> None:
    PushgatewayClient(pgw.address).put_group(key, body(done))


def push_all(ring: Ring, pgws, keys, done: int) -> None:
    by_name = {p.address: p for p in pgws}
    for key in keys:
        push(by_name[ring.owner(key).name], key, done)


def placement(pgws) -> dict[GroupingKey, list[tuple[str, int]]]:
    """key -> [(instance, jobs_done_total)] over all reachable instances."""
    found: dict[GroupingKey, list[tuple[str, int]]] = {}
    for pgw in pgws:
        if not pgw.running:
            continue
        for group in PushgatewayClient(pgw.address).groups():
            done = group.families["jobs_done_total"]["metrics"][0]["value"] if group.families else None
            found.setdefault(group.key, []).append((pgw.address, int(done) if done else None))
    return found


def assert_each_on_owner_only(ring: Ring, pgws, expected: dict[GroupingKey, int]) -> None:
    # a pushgateway applies a DELETE after its 202 (queued behind earlier writes): wait for the
    # state, then assert it with its details
    want = {key: [(ring.owner(key).name, value)] for key, value in expected.items()}
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: placement(pgws) == want, 10, what="every group on its owner only")
    found = placement(pgws)
    assert set(found) == set(expected)
    for key, copies in found.items():
        assert copies == [(ring.owner(key).name, expected[key])], key


def moved_keys(old: Ring, new: Ring, keys) -> list[GroupingKey]:
    return [k for k in keys if old.owner(k) != new.owner(k)]


def test_scale_out_moves_groups_to_the_new_owner_only(pushgateways, prometheus):
    pgws = pushgateways(4)
    ring3, ring4 = ring_of(pgws[:3]), ring_of(pgws)
    prom = prometheus([p.address for p in pgws])
    push_all(ring3, pgws, KEYS, 5)
    rebalancer = Rebalancer(max_ops_per_second=500)
    assert rebalancer.reconcile(ring3, pgws_addresses(pgws)).moved == 0
    wait_until(lambda: _series_per_group(prom) == {str(k.labels): 1 for k in KEYS}, 20,
               what="Prometheus sees every group once")

    moving = moved_keys(ring3, ring4, KEYS)
    assert moving, "the 4th member should take some groups"
    # During the change a client pushes a newer value for one moving group to its new owner.
    fresh = moving[0]
    push(pgws[3], fresh, 9)
    report = rebalancer.reconcile(ring4, pgws_addresses(pgws))

    assert (report.moved, report.failed, report.unreachable) == (len(moving) - 1, 0, [])
    assert report.deleted == 1  # the stale copy of the group the client pushed again
    expected = {k: 5 for k in KEYS} | {fresh: 9}
    assert_each_on_owner_only(ring4, pgws, expected)
    assert rebalancer.reconcile(ring4, pgws_addresses(pgws)).moved == 0

    # Prometheus: each group from exactly one instance, its owner; no counter went backwards.
    wait_until(lambda: _owners_seen(prom) == {str(k.labels): ring4.owner(k).name for k in KEYS}, 20,
               what="Prometheus sees each group from its owner only")
    done = {r["metric"]["instance"]: float(r["value"][1]) for r in prom.query("jobs_done_total")}
    assert done == {dict(k.labels)["instance"]: float(v) for k, v in expected.items()}


def test_scale_in_drains_the_leaving_instance(pushgateways, prometheus):
    pgws = pushgateways(4)
    ring4, ring3 = ring_of(pgws), ring_of(pgws[:3])
    prom = prometheus([p.address for p in pgws])
    push_all(ring4, pgws, KEYS, 7)
    leaving = [k for k in KEYS if ring4.owner(k).name == pgws[3].address]
    assert leaving

    report = Rebalancer(max_ops_per_second=500).reconcile(ring3, pgws_addresses(pgws))

    assert (report.moved, report.deleted, report.failed) == (len(leaving), 0, 0)
    assert PushgatewayClient(pgws[3].address).groups() == []
    assert_each_on_owner_only(ring3, pgws, {k: 7 for k in KEYS})
    wait_until(lambda: _owners_seen(prom) == {str(k.labels): ring3.owner(k).name for k in KEYS}, 20,
               what="Prometheus sees the drained groups on their new owners")


def test_kill_one_and_bring_it_back(pushgateways):
    pgws = pushgateways(4)
    ring4, ring3 = ring_of(pgws), ring_of(pgws[:3])
    push_all(ring4, pgws, KEYS, 1)
    rebalancer = Rebalancer(max_ops_per_second=500)
    assert rebalancer.reconcile(ring4, pgws_addresses(pgws)).moved == 0
    theirs = [k for k in KEYS if ring4.owner(k).name == pgws[3].address]
    assert len(theirs) >= 3
    updated, deleted, untouched = theirs[0], theirs[1], theirs[2:]

    pgws[3].stop()  # persists its groups on the way down, as a restarted instance would
    # While it is away the ring has 3 members; clients push two of its groups to their new owner.
    push_all(ring3, pgws, [updated, deleted], 2)
    report = rebalancer.reconcile(ring3, pgws_addresses(pgws))
    assert report.unreachable == [pgws[3].address]
    assert report.failed == 0
    # ...and a client deletes one of them, at the only owner the ring knows.
    PushgatewayClient(ring3.owner(deleted).name).delete_group(deleted)
    wait_until(lambda: deleted not in placement(pgws), 5, what="delete applied")

    pgws[3].start()
    assert {g.key for g in PushgatewayClient(pgws[3].address).groups()} == set(theirs)  # old copies back
    report = rebalancer.reconcile(ring4, pgws_addresses(pgws))

    assert report.failed == 0 and report.unreachable == []
    expected = {k: 1 for k in KEYS if k != deleted} | {updated: 2}
    assert_each_on_owner_only(ring4, pgws, expected)  # the deleted group stays deleted
    assert all(k in placement(pgws) for k in untouched)


def test_group_deleted_at_the_new_owner_is_not_resurrected(pushgateways):
    pgws = pushgateways(4)
    ring3, ring4 = ring_of(pgws[:3]), ring_of(pgws)
    push_all(ring3, pgws, KEYS, 1)
    rebalancer = Rebalancer(max_ops_per_second=500)
    rebalancer.reconcile(ring3, pgws_addresses(pgws))
    key = moved_keys(ring3, ring4, KEYS)[0]
    old = next(p for p in pgws if p.address == ring3.owner(key).name)

    old.stop()  # the old owner is unreachable when the ring changes: its copy cannot move yet
    push(pgws[3], key, 2)  # the client pushes to the new owner...
    assert rebalancer.reconcile(ring4, pgws_addresses(pgws)).unreachable == [old.address]
    PushgatewayClient(pgws[3].address).delete_group(key)  # ...then deletes the group there
    old.start()  # the old copy is back on a non-owner

    plan = [m for m in rebalancer.plan(ring4, pgws_addresses(pgws)) if m.key == key]
    assert [(m.source, m.action) for m in plan] == [(old.address, DELETE)]
    rebalancer.reconcile(ring4, pgws_addresses(pgws))
    assert key not in placement(pgws)


def test_newest_of_several_copies_wins_and_the_others_go(pushgateways):
    pgws = pushgateways(3)
    ring = ring_of(pgws)
    key = KEYS[0]
    owner = ring.owner(key).name
    strays = [p for p in pgws if p.address != owner]
    push(strays[0], key, 3)
    push(strays[1], key, 4)  # pushed later: newer

    report = Rebalancer(max_ops_per_second=500).reconcile(ring, pgws_addresses(pgws))

    assert (report.moved, report.deleted) == (1, 1)
    assert placement(pgws) == {key: [(owner, 4)]}


def test_owner_with_a_newer_copy_keeps_it(pushgateways):
    pgws = pushgateways(2)
    ring = ring_of(pgws)
    key = KEYS[0]
    owner, other = owner_and_other(pgws, ring, key)
    push(other, key, 1)
    push(owner, key, 2)

    plan = Rebalancer().plan(ring, pgws_addresses(pgws))
    assert [(m.source, m.target, m.action) for m in plan] == [(other.address, owner.address, DELETE)]
    assert placement(pgws)[key] != [(owner.address, 2)]  # plan changed nothing

    Rebalancer(max_ops_per_second=500).reconcile(ring, pgws_addresses(pgws))
    assert placement(pgws) == {key: [(owner.address, 2)]}


def test_a_moved_copy_keeps_its_original_push_time(pushgateways):
    pgws = pushgateways(3)
    key = KEYS[0]
    first = ring_of(pgws).owner(key).name
    push(next(p for p in pgws if p.address == first), key, 1)
    [original] = PushgatewayClient(first).groups()

    # Move it twice: the marker must still carry the client's push time, not a copy's.
    for pgw in [p for p in pgws if p.address != first]:
        Rebalancer(max_ops_per_second=500).reconcile(Ring([Member.parse(pgw.address)]), pgws_addresses(pgws))
        [copy] = PushgatewayClient(pgw.address).groups()
        assert copy.push_time > original.push_time  # Pushgateway stamps every write itself
        assert float(copy.families[MARKER_FAMILY]["metrics"][0]["value"]) == original.push_time


def test_unreachable_instances_are_skipped_and_reported(pushgateways):
    pgws = pushgateways(3)
    ring2 = ring_of(pgws[:2])
    key = next(k for k in KEYS if ring2.owner(k).name == pgws[0].address)
    push(pgws[2], key, 1)  # on a non-owner; its owner will be down
    pgws[0].stop()
    rebalancer = Rebalancer(max_ops_per_second=500)

    report = rebalancer.reconcile(ring2, pgws_addresses(pgws))

    assert report.unreachable == [pgws[0].address]
    assert (report.moved, report.skipped, report.failed) == (0, 1, 0)
    assert [(m.action, m.reason) for m in rebalancer.plan(ring2, pgws_addresses(pgws))] == [(SKIP, "owner unreachable")]
    assert placement(pgws) == {key: [(pgws[2].address, 1)]}  # nothing lost

    pgws[0].start()  # retried later, it moves
    assert rebalancer.reconcile(ring2, pgws_addresses(pgws)).moved == 1
    assert placement(pgws) == {key: [(pgws[0].address, 1)]}


def test_a_rejected_copy_loses_nothing_and_leaves_no_empty_group(pushgateways):
    pgws = pushgateways(2)
    ring = ring_of(pgws)
    key = KEYS[0]
    owner, other = owner_and_other(pgws, ring, key)
    # Another group on the owner uses the same metric name as a gauge: the copy's counter clashes.
    clash = next(k for k in (GroupingKey.from_labels({"job": f"other-{n}"}) for n in range(50))
                 if ring.owner(k).name == owner.address)
    PushgatewayClient(owner.address).put_group(clash, "# TYPE jobs_done_total gauge\njobs_done_total 1\n")
    push(other, key, 6)

    report = Rebalancer(max_ops_per_second=500).reconcile(ring, pgws_addresses(pgws))

    assert (report.moved, report.failed) == (0, 1)
    assert "400" in report.errors[0]
    assert placement(pgws)[key] == [(other.address, 6)]
    # The empty group the rejected PUT left is deleted; Pushgateway applies a DELETE after
    # answering 202, so give it a moment.
    wait_until(lambda: key not in {g.key for g in PushgatewayClient(owner.address).groups()}, 5,
               what="the rejected copy's empty group to be deleted")


def test_operations_are_paced_and_counted(pushgateways):
    pgws = pushgateways(2)
    ring1 = Ring([Member.parse(pgws[0].address)])
    for key in KEYS[:5]:
        push(pgws[1], key, 1)
    virtual = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        virtual[0] += seconds

    registry = CollectorRegistry()
    rebalancer = Rebalancer({"max_ops_per_second": 4}, registry=registry,
                            clock=lambda: virtual[0], sleep=sleep)
    report = rebalancer.reconcile(ring1, pgws_addresses(pgws))

    assert report.moved == 5
    # 10 writes (5 PUT + 5 DELETE) at 4/s: 9 gaps of 0.25 s on the (virtual) clock
    assert sum(slept) == pytest.approx(9 * 0.25)
    assert registry.get_sample_value("pgwshard_rebalance_groups_moved_total") == 5
    assert registry.get_sample_value("pgwshard_rebalance_groups_failed_total") == 0
    assert registry.get_sample_value("pgwshard_rebalance_seconds_count") == 1


def test_plan_lists_copy_then_delete_of_other_strays(pushgateways):
    pgws = pushgateways(3)
    ring1 = Ring([Member.parse(pgws[0].address)])
    push(pgws[1], KEYS[0], 1)
    push(pgws[2], KEYS[0], 2)
    plan = Rebalancer().plan(ring1, pgws_addresses(pgws))
    assert [(m.source, m.target, m.action) for m in plan] == [
        (pgws[2].address, pgws[0].address, COPY), (pgws[1].address, pgws[0].address, DELETE)]


def pgws_addresses(pgws) -> list[str]:
    return [p.address for p in pgws]


def _series_per_group(prom) -> dict[str, int]:
    return {str(_key_labels(r["metric"])): int(r["value"][1])
            for r in prom.query("count by (job, instance) (push_time_seconds)")}


def _owners_seen(prom) -> dict[str, str]:
    """group labels -> the one instance Prometheus sees it on (a group seen twice is dropped)."""
    seen: dict[str, list[str]] = {}
    for r in prom.query("push_time_seconds"):
        seen.setdefault(str(_key_labels(r["metric"])), []).append(r["metric"]["pushgateway"])
    return {k: v[0] if len(v) == 1 else f"{len(v)} instances" for k, v in seen.items()}


def _key_labels(metric: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in metric.items() if k in ("job", "instance")))


# docs/rebalancing.md recommends this expression for "when did a client last push this group";
# here with a 2 s slack instead of 10 s so the test need not wait long.
LAST_PUSH = ("pgwshard_original_push_time_seconds and (push_time_seconds - pgwshard_moved_time_seconds < 2)"
             " or push_time_seconds")


def test_alerts_on_push_time_stay_honest_after_a_move(pushgateways, prometheus):
    pgws = pushgateways(2)
    prom = prometheus([p.address for p in pgws])
    key = KEYS[0]
    push(pgws[0], key, 1)
    [original] = PushgatewayClient(pgws[0].address).groups()
    Rebalancer(max_ops_per_second=500).reconcile(Ring([Member.parse(pgws[1].address)]), pgws_addresses(pgws))
    [copy] = PushgatewayClient(pgws[1].address).groups()

    def last_push() -> list[tuple[str, float]]:
        return [(r["metric"]["pushgateway"], float(r["value"][1])) for r in prom.query(LAST_PUSH)]

    # The moved group still says when the client pushed, not when it was copied.
    wait_until(lambda: last_push() == [(pgws[1].address, original.push_time)], 20, what="moved group scraped")
    assert copy.push_time > original.push_time

    # A client adds to the group later with POST (both pgwshard families stay): now its push counts.
    wait_until(lambda: time.time() > copy.push_time + 2.5, 5, what="slack passed")
    post = urllib.request.Request(pgws[1].url + key.path(), data=b"extra 1\n", method="POST")
    urllib.request.urlopen(post, timeout=5).close()
    [posted] = PushgatewayClient(pgws[1].address).groups()
    assert MARKER_FAMILY in posted.families
    wait_until(lambda: last_push() == [(pgws[1].address, posted.push_time)], 20, what="POST seen")


def test_pace_comes_from_the_rebalance_settings_and_must_be_positive():
    assert Rebalancer(SimpleNamespace(enabled=True, interval=60, max_ops_per_second=7)).max_ops_per_second == 7
    assert Rebalancer({"max_ops_per_second": 7}, max_ops_per_second=9).max_ops_per_second == 9
    with pytest.raises(ValueError, match="max_ops_per_second"):
        Rebalancer({"max_ops_per_second": 0})


def test_owner_is_rechecked_right_before_the_copy(pushgateways, monkeypatch):
    pgws = pushgateways(2)
    ring = ring_of(pgws)
    key = KEYS[0]
    owner, other = owner_and_other(pgws, ring, key)
    push(other, key, 1)
    plan = Rebalancer._plan

    def plan_then_client_pushes(self, *args):
        moves = plan(self, *args)
        assert [m.action for m in moves] == [COPY]
        push(owner, key, 2)  # a client pushes to the owner after the survey, before the copy
        return moves

    monkeypatch.setattr(Rebalancer, "_plan", plan_then_client_pushes)
    report = Rebalancer(max_ops_per_second=500).reconcile(ring, pgws_addresses(pgws))

    assert (report.moved, report.deleted) == (0, 1)
    assert placement(pgws) == {key: [(owner.address, 2)]}  # the newer push was not overwritten


def test_a_moved_group_keeps_every_family_exactly(pushgateways):
    pgws = pushgateways(2)
    key = GroupingKey.from_labels({"job": "batch", "instance": "a/b c"})
    PushgatewayClient(pgws[0].address).put_group(key, ALL_TYPES)
    [before] = PushgatewayClient(pgws[0].address).groups()

    Rebalancer(max_ops_per_second=500).reconcile(Ring([Member.parse(pgws[1].address)]), pgws_addresses(pgws))

    assert PushgatewayClient(pgws[0].address).groups() == []
    [after] = PushgatewayClient(pgws[1].address).groups()

    def content(group) -> dict:  # everything but the write time of each family
        return {name: {k: v for k, v in family.items() if k != "time_stamp"}
                for name, family in group.families.items() if name not in (MARKER_FAMILY, MOVED_FAMILY)}

    assert content(after) == content(before)
    assert len(content(after)) == 5


def test_a_push_to_the_old_owner_during_the_move_is_never_deleted(pushgateways, monkeypatch):
    """Issue 14: a push that reached the old owner between the copy and the delete was deleted
    with the source copy, and the owner kept the older value."""
    pgws = pushgateways(2)
    ring = ring_of(pgws)
    key = KEYS[0]
    owner, other = owner_and_other(pgws, ring, key)
    push(other, key, 1)
    put_group = PushgatewayClient.put_group

    def put_then_client_pushes_to_the_source(self, *args):
        put_group(self, *args)
        put_group(PushgatewayClient(other.address), key, body(2))  # a gateway still on the old ring sends the client's push there

    monkeypatch.setattr(PushgatewayClient, "put_group", put_then_client_pushes_to_the_source)
    rebalancer = Rebalancer(max_ops_per_second=500)
    first = rebalancer.reconcile(ring, pgws_addresses(pgws))
    assert (first.moved, first.skipped) == (1, 1)
    assert sorted(placement(pgws)[key]) == sorted([(owner.address, 1), (other.address, 2)])

    monkeypatch.setattr(PushgatewayClient, "put_group", put_group)
    rebalancer.reconcile(ring, pgws_addresses(pgws))  # the next pass moves the newer push
    assert placement(pgws) == {key: [(owner.address, 2)]}


def test_a_stale_copy_pushed_again_before_its_delete_is_kept(pushgateways, monkeypatch):
    pgws = pushgateways(2)
    ring = ring_of(pgws)
    key = KEYS[0]
    owner, other = owner_and_other(pgws, ring, key)
    push(other, key, 1)
    push(owner, key, 2)  # the owner holds a newer copy: the plan deletes the stray
    plan = Rebalancer._plan

    def plan_then_client_pushes_to_the_stray(self, *args):
        moves = plan(self, *args)
        assert [m.action for m in moves] == [DELETE]
        push(other, key, 3)
        return moves

    monkeypatch.setattr(Rebalancer, "_plan", plan_then_client_pushes_to_the_stray)
    report = Rebalancer(max_ops_per_second=500).reconcile(ring, pgws_addresses(pgws))
    assert (report.deleted, report.skipped) == (0, 1)
    assert sorted(placement(pgws)[key]) == sorted([(owner.address, 2), (other.address, 3)])


def test_a_copy_waits_while_its_client_may_push_to_the_owner(pushgateways, monkeypatch):
    """The drill met it: a client push to the owner landing between the owner's listing and the
    PUT of an older copy was overwritten (stale=1). A copy pushed less than `quiet` seconds ago
    now waits: the client's push makes the owner's copy newer and the stray is deleted; a copy
    whose client stayed silent is PUT once `quiet` has passed."""
    pgws = pushgateways(2)
    ring = ring_of(pgws)
    key, silent = KEYS[0], next(k for k in KEYS[1:] if ring.owner(k) == ring.owner(KEYS[0]))
    owner, other = owner_and_other(pgws, ring, key)
    push(other, key, 1)
    push(other, silent, 1)
    groups = PushgatewayClient.groups

    def owner_listed_then_client_pushes(self):
        listed = groups(self)
        if self.name == owner.address:  # the re-check before a PUT: the client pushes right after it
            push(owner, key, 2)
        return listed

    monkeypatch.setattr(PushgatewayClient, "groups", owner_listed_then_client_pushes)
    now = [time.time()]
    rebalancer = Rebalancer(max_ops_per_second=500, quiet=10, wall_clock=lambda: now[0])
    first = rebalancer.reconcile(ring, pgws_addresses(pgws))
    assert (first.moved, first.waiting) == (0, 2) and 0 < first.retry_after <= 10
    monkeypatch.setattr(PushgatewayClient, "groups", groups)
    # the client's push stays on the owner, never overwritten; the stray waits for the next pass
    assert sorted(placement(pgws)[key]) == sorted([(owner.address, 2), (other.address, 1)])

    now[0] += 10  # `silent`'s client stayed silent for `quiet`: its copy moves
    second = rebalancer.reconcile(ring, pgws_addresses(pgws))
    assert (second.moved, second.deleted, second.waiting) == (1, 1, 0)
    assert placement(pgws) == {key: [(owner.address, 2)], silent: [(owner.address, 1)]}


def test_a_waiting_copy_moves_after_quiet_of_our_clock_and_is_not_held_forever(pushgateways):
    """A pushgateway whose clock runs an hour ahead holds a copy back for `quiet` of our clock,
    not an hour; a stray that a gateway off the membership keeps pushing moves after
    MAX_WAIT_QUIETS x quiet instead of never (the owner's older copy would stay beside it)."""
    pgws = pushgateways(2)
    ring = ring_of(pgws)
    key = KEYS[0]
    owner, other = owner_and_other(pgws, ring, key)
    mono = [1000.0]
    ahead = Rebalancer(max_ops_per_second=500, quiet=10, wall_clock=lambda: time.time() - 3600,
                       clock=lambda: mono[0], sleep=lambda _: None)
    push(other, key, 1)
    for elapsed in (0.0, 2.5, 5.0, 9.9):  # our clock, since the copy was first seen
        mono[0] = 1000.0 + elapsed
        report = ahead.reconcile(ring, pgws_addresses(pgws))
        assert (report.waiting, report.moved) == (1, 0)
        assert report.retry_after == pytest.approx(10 - elapsed)
        assert placement(pgws) == {key: [(other.address, 1)]}
    mono[0] = 1010.0
    assert ahead.reconcile(ring, pgws_addresses(pgws)).moved == 1
    assert placement(pgws) == {key: [(owner.address, 1)]}

    keeps = Rebalancer(max_ops_per_second=500, quiet=10, clock=lambda: mono[0], sleep=lambda _: None)
    stray = next(k for k in KEYS[1:] if ring.owner(k).name == owner.address)
    for value in range(2, 4 + MAX_WAIT_QUIETS * 2):  # re-pushed every half `quiet`: never quiet
        push(other, stray, value)
        report = keeps.reconcile(ring, pgws_addresses(pgws))
        if report.moved:
            break
        assert report.waiting == 1
        mono[0] += 5
    assert report.moved == 1 and mono[0] - 1010 == MAX_WAIT_QUIETS * 10  # not before, not later
    assert (owner.address, value) in placement(pgws)[stray]


def _push_time(pgw, key: GroupingKey) -> float:
    return next(g.push_time for g in PushgatewayClient(pgw.address).groups() if g.key == key)


def test_a_copy_stored_while_its_instance_was_out_of_the_ring_loses_to_one_stored_in_it(pushgateways):
    """Issue 21, finding 1 (tests/sync/test_rejoin.py drives it with a real hang): the owner,
    back in the ring, holds a copy it stored while it was out (a push that had got 504), newer
    than the acknowledged copy elsewhere. The acknowledged one wins, also on the next pass, and
    the late copy is no evidence of a delete."""
    pgws = pushgateways(2)
    ring = ring_of(pgws)
    key = KEYS[0]
    owner, other = owner_and_other(pgws, ring, key)
    push(other, key, 3)  # the acknowledged retry, on the stand-in
    push(owner, key, 2)  # the late write, stored after the owner left the ring
    late = _push_time(owner, key)
    history = MembershipHistory().changed([other.address], pgws_addresses(pgws), late - 1.0)
    # without the history, the late copy looks newest: the acknowledged one would be deleted
    blind = Rebalancer(max_ops_per_second=500).plan(ring, pgws_addresses(pgws))
    assert [(m.source, m.action) for m in blind] == [(other.address, DELETE)]
    history = history.changed(pgws_addresses(pgws), pgws_addresses(pgws), late + 1.0)  # it rejoined
    rebalancer = Rebalancer(max_ops_per_second=500)
    report = rebalancer.reconcile(ring, pgws_addresses(pgws), history)
    assert (report.moved, report.failed) == (1, 0)
    assert placement(pgws) == {key: [(owner.address, 3)]}
    again = rebalancer.reconcile(ring, pgws_addresses(pgws), history)
    assert (again.moved, again.deleted) == (0, 0) and placement(pgws) == {key: [(owner.address, 3)]}


def test_a_late_write_of_a_group_deleted_after_its_instance_left_stays_deleted(pushgateways):
    """A delete acknowledged after the owner left the ring covers what the owner stores later
    from before it left: no gateway routed a push to it in between."""
    pgws = pushgateways(2)
    ring = ring_of(pgws)
    key = KEYS[0]
    owner, _ = owner_and_other(pgws, ring, key)
    push(owner, key, 2)
    late = _push_time(owner, key)

    class DeletedBeforeTheLateWrite:
        def covers(self, k: GroupingKey, pushed_at: float) -> bool:
            return k == key and pushed_at <= late - 1.0

    history = (MembershipHistory().changed([p.address for p in pgws if p is not owner], pgws_addresses(pgws), late - 2.0)
               .changed(pgws_addresses(pgws), pgws_addresses(pgws), late + 1.0))
    rebalancer = Rebalancer(max_ops_per_second=500, tombstones=DeletedBeforeTheLateWrite())
    assert rebalancer.reconcile(ring, pgws_addresses(pgws)).deleted == 0  # by push time alone: kept
    assert rebalancer.reconcile(ring, pgws_addresses(pgws), history).deleted == 1
    assert placement(pgws) == {}


def test_a_pass_whose_membership_changes_during_its_survey_writes_nothing(pushgateways, monkeypatch):
    """The drill met it: a pass started with the owner in the ring; its listing of the owner hung
    (SIGSTOP) until the owner resumed, by then out of the ring and holding its late writes, which
    the pass, on its old membership, took for the owner's newest copies: it deleted the
    acknowledged retries on the stand-in. A pass now stops before its next write once the
    membership it started from is no longer the latest."""
    pgws = pushgateways(2)
    ring = ring_of(pgws)
    key = KEYS[0]
    owner, other = owner_and_other(pgws, ring, key)
    push(other, key, 3)  # acknowledged on the stand-in
    push(owner, key, 2)  # the hung owner's late write, stored after it left
    started = MembershipHistory()
    left = started.changed([other.address], pgws_addresses(pgws), _push_time(owner, key) - 1.0)
    now = [started]
    groups = PushgatewayClient.groups

    def owner_leaves_while_listed(self):
        listed = groups(self)
        if self.name == owner.address:
            now[0] = left  # pgwshard-sync applied the owner's leaving meanwhile
        return listed

    monkeypatch.setattr(PushgatewayClient, "groups", owner_leaves_while_listed)
    report = Rebalancer(max_ops_per_second=500).reconcile(ring, pgws_addresses(pgws), started, latest=lambda: now[0])
    assert report.abandoned and (report.moved, report.deleted) == (0, 0)
    assert sorted(placement(pgws)[key]) == sorted([(owner.address, 2), (other.address, 3)])
    monkeypatch.setattr(PushgatewayClient, "groups", groups)
    now[0] = started  # the same survey, nothing changing: the pass deletes the stand-in's copy
    assert Rebalancer(max_ops_per_second=500).reconcile(ring, pgws_addresses(pgws), started,
                                                        latest=lambda: now[0]).deleted == 1
