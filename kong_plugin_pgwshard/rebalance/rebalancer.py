"""Move groups to the instance that owns them on the ring, without restarting anything.

One reconciliation lists the groups on every reachable pushgateway, asks the ring (the very
ring the plugin routes with) who owns each, and for every copy on a non-owner decides:

- the owner holds a copy at least as new  -> delete the stale copy;
- otherwise the newest copy is PUT on the owner (after re-checking the owner right before),
  then deleted from where it was; other, older copies are deleted;
- but not while its client may still be pushing: a copy pushed less than `quiet` seconds ago
  waits for a later pass, since the client's next push goes to the owner anyway, and a PUT
  could overwrite that push (Pushgateway has no conditional write);
- every delete of a copy on a non-owner happens only if that copy is still exactly what the
  survey saw (same push time, same families), read again after all the pass's copies: a client
  push that reached the old owner meanwhile is left for the next pass, never deleted;
- the newest version this rebalancer ever saw of the group is gone from the instance that held
  it (a client deleted it there)  -> the older copies are stale remains: delete them, never copy;
- a copy an instance stored while it was out of the ring (a hung pushgateway applying pushes that
  already got 504) loses to every copy stored in the ring, however new (history.py); an instance
  out of the ring that answers keeps the groups of which it holds the best copy until it rejoins
  or has been out `gone_after` seconds (it is probably about to rejoin: moving them away and
  back would be two moves and duplicates in between).

"Newest" compares when the data was pushed by a client: a copy made by the rebalancer carries
the original push time in MARKER_FAMILY (and its own time in MOVED_FAMILY), because Pushgateway
stamps push_time_seconds itself and ignores a pushed one. docs/rebalancing.md explains this, the
alert expression that stays honest, and the window that remains.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..clients.pushgateway import Group, PushgatewayClient
from ..core.grouping import GroupingKey
from ..core.ring import Member, Ring
from ..errors import NoMembersError, UpstreamError
from .exposition import families_to_text
from .history import MembershipHistory

log = logging.getLogger("pgwshard.rebalance")

MARKER_FAMILY = "pgwshard_original_push_time_seconds"
MARKER_HELP = "Last Unix time a client pushed this group, kept when pgwshard moved the group."
MOVED_FAMILY = "pgwshard_moved_time_seconds"
MOVED_HELP = "Unix time pgwshard copied this group here; push_time_seconds is then this copy's."
# push_time_seconds of a fresh copy trails MOVED_FAMILY by the PUT's latency (and clock skew).
MARKER_SLACK_SECONDS = 10.0

COPY = "copy"
DELETE = "delete"
SKIP = "skip"
WAIT = "wait"  # a copy whose client pushed it less than `quiet` seconds ago: a later pass
# A stray that keeps being pushed (a gateway that never follows the membership, a Kong whose
# plugin server is down) is copied anyway after this many times `quiet`: never quiet, never moved
# would leave the owner's older copy beside it for good.
MAX_WAIT_QUIETS = 3


@dataclass(frozen=True)
class Move:
    """One planned step for one copy of a group."""

    key: GroupingKey
    source: str          # instance holding the copy
    target: str          # the group's owner
    action: str          # COPY (then delete from source), DELETE the copy, SKIP or WAIT for now
    reason: str
    pushed_at: float     # when a client pushed the data of this copy
    wait: float = 0.0    # WAIT: seconds until it has been quiet long enough
    # COPY over an owner copy stored while the owner was out of the ring: that copy's
    # push_time_seconds (the PUT may replace it although it looks newer).
    replaces: float | None = None


@dataclass
class ReconcileReport:
    """What one reconciliation did."""

    moved: int = 0
    deleted: int = 0
    skipped: int = 0
    failed: int = 0
    waiting: int = 0     # copies left for a later pass because their client pushed them lately
    # Seconds until the first of those has been quiet long enough (None: none waits).
    retry_after: float | None = None
    seconds: float = 0.0
    # Longest time from re-checking an owner to the end of a PUT on it: the window in which a
    # client's push to the owner could still be overwritten by an older copy.
    window_seconds: float = 0.0
    unreachable: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # The membership changed during the pass (`latest`): it stopped before its next write; the
    # change's own pass follows.
    abandoned: bool = False

    def __str__(self) -> str:
        text = (f"moved={self.moved} deleted={self.deleted} skipped={self.skipped} "
                f"failed={self.failed} waiting={self.waiting} seconds={self.seconds:.3f}")
        if self.retry_after is not None:
            text += f" retry_after={self.retry_after:.1f}"
        if self.unreachable:
            text += " unreachable=" + ",".join(self.unreachable)
        if self.abandoned:
            text += " abandoned (the membership changed during the pass)"
        return text


@dataclass(frozen=True)
class _Seen:
    pushed_at: float
    instance: str


@dataclass(frozen=True)
class _Waiting:
    first: float         # our clock (monotonic) when the group's stray first had to wait
    since: float         # ... when we first saw this very copy (source, push time)
    source: str
    pushed_at: float


class Rebalancer:
    """Reconciles group placement with a ring; keeps what it learned between calls.

    settings: an object or mapping with max_ops_per_second (the config's `rebalance` section);
    plain keyword arguments override it. max_ops_per_second paces every PUT and DELETE so a
    rebalance leaves the instances free for live pushes. recheck_max_age bounds how old the
    owner listing may be when a copy is PUT on it (one listing serves several PUTs). quiet
    (settings' `quiet`, else 0): how long a copy's client must have been silent before the copy
    is PUT on the owner; `wall_clock` is compared with the pushgateways' push times.
    """

    def __init__(self, settings: Any = None, *, max_ops_per_second: float | None = None,
                 timeout: float = 5.0, recheck_max_age: float = 1.0,
                 registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, tombstones: Any = None,
                 quiet: float | None = None, wall_clock: Callable[[], float] = time.time,
                 gone_after: float | None = None):
        if max_ops_per_second is None:
            max_ops_per_second = _setting(settings, "max_ops_per_second", 50.0)
        if not max_ops_per_second > 0:
            raise ValueError("max_ops_per_second must be > 0")
        self.max_ops_per_second = float(max_ops_per_second)
        self.timeout = timeout
        self.recheck_max_age = recheck_max_age
        self.quiet = float(_setting(settings, "quiet", 0.0) if quiet is None else quiet)
        # An instance out of the ring this long (by the history) is drained like any leaver;
        # before, it keeps the groups of which it holds the best copy (it is about to rejoin).
        self.gone_after = float(_setting(settings, "gone_after", 60.0) if gone_after is None else gone_after)
        self._history = MembershipHistory()
        self._ring_names: frozenset[str] = frozenset()
        self._wall_clock = wall_clock
        self._waiting: dict[GroupingKey, _Waiting] = {}
        # Deletes clients made through pgwshard-sync (sync/deletes.py): covered copies are
        # deleted wherever they are, never moved. Anything with covers(key, pushed_at).
        self.tombstones = tombstones
        self._clock = clock
        self._sleep = sleep
        self._next_op = 0.0
        self._clients: dict[str, PushgatewayClient] = {}
        # Newest client push seen per group, and where: the evidence that a group was deleted.
        self._newest: dict[GroupingKey, _Seen] = {}
        self.unreachable: list[str] = []
        self._moved = Counter("pgwshard_rebalance_groups_moved", "Groups copied to their owner.",
                              registry=registry)
        self._deleted = Counter("pgwshard_rebalance_groups_deleted",
                                "Stale group copies deleted from non-owners.", registry=registry)
        self._skipped = Counter("pgwshard_rebalance_groups_skipped",
                                "Groups left for a later pass (owner unreachable, copy changed, holder about to "
                                "rejoin).", registry=registry)
        self._failed = Counter("pgwshard_rebalance_groups_failed",
                               "Group copies or deletes that failed.", registry=registry)
        self._waiting_gauge = Gauge("pgwshard_rebalance_groups_waiting",
                                    "Misplaced copies the last reconciliation left for their clients' "
                                    "next push (pushed less than rebalance.quiet ago).", registry=registry)
        self._misplaced = Gauge("pgwshard_rebalance_groups_misplaced",
                                "Group copies on non-owners that the last reconciliation found.",
                                registry=registry)
        self._seconds = Histogram("pgwshard_rebalance_seconds", "Seconds per reconciliation.",
                                  buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900), registry=registry)

    def plan(self, ring: Ring, instances: Iterable[Member | str] = (),
             history: MembershipHistory | None = None) -> list[Move]:
        """List every reachable instance and return the steps a reconciliation would take.

        Changes nothing on any instance. Unreachable instances are named in self.unreachable.
        """
        return self._plan(ring, self._survey(ring, instances, history))

    def reconcile(self, ring: Ring, instances: Iterable[Member | str] = (),
                  history: MembershipHistory | None = None,
                  latest: Callable[[], MembershipHistory] | None = None) -> ReconcileReport:
        """Run one reconciliation: every group ends on its owner only, newest copy kept.

        instances: every known pushgateway (ring members are added), so groups drain from an
        instance that left the ring while it is still reachable. history: when each left and
        rejoined the ring (pgwshard-sync's; None: nothing known, every copy counts by its push
        time and an instance out of the ring is drained at once). latest: the latest history;
        once it is no longer `history` (a member left or joined during the pass: a hung one
        whose listing held the survey until it resumed, its late writes then looking like the
        owner's newest copies), the pass stops before its next write and reports `abandoned`.
        Errors are counted in the report, never raised: what failed stays where it is and is
        retried next time.
        """
        started = self._clock()
        report = ReconcileReport()
        holdings = self._survey(ring, instances, history)

        def changed() -> bool:
            report.abandoned = report.abandoned or (latest is not None and latest() is not history)
            return report.abandoned
        report.unreachable = list(self.unreachable)
        # One owner at a time, so one listing of it serves the re-check of several PUTs (listing
        # 2,000 groups costs ~140 ms, a PUT ~25 ms). The sort is stable: a group's steps keep order.
        moves = sorted(self._plan(ring, holdings), key=lambda m: m.target)
        self._misplaced.set(sum(1 for m in moves if m.source != m.target))
        owner_listing: dict[str, tuple[float, dict[GroupingKey, Group]]] = {}
        dead_owners: set[str] = set()
        # Deletes from non-owners wait until every copy of the pass is made: one fresh listing
        # of each source, taken after the last PUT, then proves each copy unchanged.
        to_delete: list[tuple[Move, bool]] = []  # (move, count it as a delete)
        for move in moves:
            if move.action in (COPY, DELETE) and changed():
                break
            if move.action == WAIT:
                report.waiting += 1
                report.retry_after = move.wait if report.retry_after is None else min(report.retry_after, move.wait)
                continue
            if move.action == SKIP or move.target in dead_owners:
                report.skipped += 1
                continue
            if move.action == DELETE and move.source != move.target:
                to_delete.append((move, True))
                continue
            try:
                listed_at, owner_now = self._listing(move.target, owner_listing)
            except UpstreamError as exc:
                dead_owners.add(move.target)
                report.unreachable.append(move.target)
                report.errors.append(str(exc))
                report.skipped += 1
                continue
            current = owner_now.get(move.key)
            if move.action == DELETE:  # a stale copy on the owner itself: only if still unchanged
                if current is not None and client_push_time(current) == move.pushed_at:
                    self._delete(move, report)
                continue
            if (current is not None and client_push_time(current) >= move.pushed_at
                    and current.push_time != move.replaces):
                # A client pushed to the owner since the survey: its copy wins.
                to_delete.append((move, True))
                continue
            group = holdings[move.source][move.key]
            try:
                self._pace()
                self._client(move.target).put_group(move.key, _copy_text(group))
            except UpstreamError as exc:
                report.failed += 1
                report.errors.append(str(exc))
                self._remove_husk(move)
                continue
            owner_now[move.key] = group
            log.debug("copied %s from %s to %s: %s", move.key, move.source, move.target, move.reason)
            report.window_seconds = max(report.window_seconds, self._clock() - listed_at)
            self._remember(move.key, move.pushed_at, move.target, moved=True)
            report.moved += 1
            to_delete.append((move, False))  # counted as moved, not as a delete
        self._delete_unchanged(to_delete, holdings, report, changed)
        report.seconds = self._clock() - started
        self._waiting_gauge.set(report.waiting)
        self._moved.inc(report.moved)
        self._deleted.inc(report.deleted)
        self._skipped.inc(report.skipped)
        self._failed.inc(report.failed)
        self._seconds.observe(report.seconds)
        return report

    def clear_before_rejoin(self, joiners: Iterable[str], instances: Iterable[Member | str],
                            history: MembershipHistory) -> tuple[dict[str, int], dict[str, UpstreamError]]:
        """Delete from each joiner (out of the ring, about to rejoin) every copy that loses to a
        copy elsewhere: older, or stored while the joiner was out of the ring (`history`). Then
        it serves no stale copy from the moment it rejoins (a restarted pushgateway comes back
        with its persistence file while the stand-ins hold newer copies).

        Returns how many copies each joiner lost, and the error of each joiner that could not be
        listed or cleared (it should stay out); an other instance that does not answer only
        gives no evidence. Uses clients of its own: safe beside a pass on another thread.
        """
        joining = sorted(set(joiners))
        names = sorted({_name(i) for i in instances} | set(joining))
        clients = {name: PushgatewayClient(name, timeout=self.timeout) for name in names}
        try:
            holdings: dict[str, dict[GroupingKey, Group]] = {}
            failed: dict[str, UpstreamError] = {}
            for name in names:
                try:
                    holdings[name] = {g.key: g for g in clients[name].groups()}
                except UpstreamError as err:
                    if name in joining:
                        failed[name] = err
            removed: dict[str, int] = {}
            for joiner in [j for j in joining if j not in failed]:
                stale = []
                for key, group in holdings[joiner].items():
                    if self.tombstones is not None and self.tombstones.covers(key, _sent_by(history, joiner, group)):
                        stale.append(key)  # a late write of a group a client deleted meanwhile
                        continue
                    rivals = [_rank(history, n, held[key]) for n, held in holdings.items()
                              if n != joiner and key in held]
                    if rivals and _rank(history, joiner, group) < max(rivals):
                        stale.append(key)
                removed[joiner] = 0
                if not stale:
                    continue
                try:
                    now_there = {g.key: g for g in clients[joiner].groups()}
                    for key in stale:
                        current, surveyed = now_there.get(key), holdings[joiner][key]
                        if current is None or current.push_time != surveyed.push_time:
                            continue  # gone, or pushed again meanwhile: not what lost
                        clients[joiner].delete_group(key)
                        log.debug("deleted %s on %s before it rejoins: lost to a copy elsewhere", key, joiner)
                        removed[joiner] += 1
                except UpstreamError as err:
                    failed[joiner] = err
            return removed, failed
        finally:
            for client in clients.values():
                client.close()

    # -- listing and deciding (no writes) -------------------------------------------------

    def _survey(self, ring: Ring, instances: Iterable[Member | str],
                history: MembershipHistory | None = None) -> dict[str, dict[GroupingKey, Group]]:
        names = {_name(i) for i in instances} | {m.name for m in ring.members}
        self._history = history or MembershipHistory()
        self._ring_names = frozenset(m.name for m in ring.members)
        holdings: dict[str, dict[GroupingKey, Group]] = {}
        self.unreachable = []
        for name in sorted(names):
            try:
                holdings[name] = {g.key: g for g in self._client(name).groups()}
            except UpstreamError:
                self.unreachable.append(name)
        self._learn(holdings)
        return holdings

    def _learn(self, holdings: Mapping[str, Mapping[GroupingKey, Group]]) -> None:
        present: set[GroupingKey] = set()
        for name, groups in holdings.items():
            for key, group in groups.items():
                present.add(key)
                if not self._late(name, group):  # evidence of deletes comes from acknowledged copies only
                    self._remember(key, client_push_time(group), name)
        if not self.unreachable:
            # Every instance answered: groups found nowhere need no memory any more.
            for key in [k for k in self._newest if k not in present]:
                del self._newest[key]

    def _remember(self, key: GroupingKey, pushed_at: float, instance: str, moved: bool = False) -> None:
        seen = self._newest.get(key)
        # A moved copy is as new as its source and now lives on the owner: point there.
        if seen is None or pushed_at > seen.pushed_at or (moved and pushed_at == seen.pushed_at):
            self._newest[key] = _Seen(pushed_at, instance)

    def _plan(self, ring: Ring, holdings: Mapping[str, Mapping[GroupingKey, Group]]) -> list[Move]:
        copies: dict[GroupingKey, dict[str, Group]] = {}
        for name, groups in holdings.items():
            for key, group in groups.items():
                copies.setdefault(key, {})[name] = group
        moves: list[Move] = []
        waiting, self._waiting = self._waiting, {}  # kept only for groups that wait again
        for key in sorted(copies, key=str):
            try:
                owner = ring.owner(key).name
            except NoMembersError:
                return []  # nobody to move to: leave everything where it is
            group_copies = copies[key]
            if self.tombstones is not None:
                dead = sorted(n for n, g in group_copies.items()
                              if self.tombstones.covers(key, _sent_by(self._history, n, g)))
                moves += [Move(key, n, owner, DELETE, "deleted by a client (tombstone)",
                               client_push_time(group_copies[n])) for n in dead]
                group_copies = {n: g for n, g in group_copies.items() if n not in dead}
            moves += self._plan_group(key, owner, group_copies, waiting.get(key))
        return moves

    def _late(self, name: str, group: Group) -> bool:
        return self._history.was_out(name, group.push_time)

    def _rank(self, name: str, group: Group) -> tuple[bool, float]:
        return _rank(self._history, name, group)

    def _returning(self, name: str) -> bool:
        """Out of the ring (and answering) for less than gone_after: probably about to rejoin."""
        since = self._history.out_since(name)
        return (name not in self._ring_names and since is not None
                and self._wall_clock() - since < self.gone_after)

    def _plan_group(self, key: GroupingKey, owner: str, copies: Mapping[str, Group],
                    waited: _Waiting | None = None) -> list[Move]:
        strays = {name: g for name, g in copies.items() if name != owner}
        at_owner = copies.get(owner)
        seen = self._newest.get(key)
        if not strays:
            if (at_owner is not None and seen is not None and seen.pushed_at > client_push_time(at_owner)
                    and seen.instance not in self.unreachable):
                # e.g. the owner came back with an old copy of a group deleted while it was away
                return [Move(key, owner, owner, DELETE, "group was deleted after a newer push",
                             client_push_time(at_owner))]
            return []

        def step(name: str, action: str, reason: str) -> Move:
            return Move(key, name, owner, action, reason, client_push_time(strays[name]))

        if owner in self.unreachable:
            return [step(name, SKIP, "owner unreachable") for name in sorted(strays)]
        newest = max(sorted(strays), key=lambda name: self._rank(name, strays[name]))
        newest_at = client_push_time(strays[newest])
        if at_owner is not None and self._rank(owner, at_owner) >= self._rank(newest, strays[newest]):
            return [step(name, DELETE, "owner holds a newer copy") for name in sorted(strays)]
        replaces = at_owner.push_time if at_owner is not None and self._late(owner, at_owner) else None
        owner_at = client_push_time(at_owner) if at_owner is not None and replaces is None else 0.0
        if seen is not None and seen.pushed_at > max(newest_at, owner_at):
            if seen.instance in self.unreachable:
                return [step(name, SKIP, f"newer copy on unreachable {seen.instance}")
                        for name in sorted(strays)]
            # The newest version we saw is gone from where it was: a client deleted the group.
            return [step(name, DELETE, "group was deleted after a newer push") for name in sorted(strays)]
        if self._returning(newest):
            # Its holder is back up and rejoins once held down: it keeps the group meanwhile
            # (pushes go to the owner; one after its copy makes that copy older, deleted then).
            return [step(name, SKIP, f"best copy on {newest}, which is about to rejoin") for name in sorted(strays)]
        wait = self._still_to_wait(key, newest, newest_at, waited) if self.quiet > 0 else 0.0
        if wait > 0:
            # Its client may push again, to the owner: a PUT racing that push would overwrite it
            # with this older copy. The push (then this copy is deleted as older) or `quiet`
            # seconds of silence (then the copy is PUT) decide at a later pass.
            moves = [Move(key, newest, owner, WAIT, f"pushed less than {self.quiet:g} s ago", newest_at, wait)]
        else:
            moves = [Move(key, newest, owner, COPY,
                          "owner lacks it" if at_owner is None else
                          "owner holds an older copy" if replaces is None else
                          "owner's copy was stored while it was out of the ring", newest_at, replaces=replaces)]
        moves += [step(name, DELETE, "a newer copy is elsewhere") for name in sorted(strays) if name != newest]
        return moves

    def _still_to_wait(self, key: GroupingKey, source: str, pushed_at: float, waited: _Waiting | None) -> float:
        """Seconds until the copy `source` holds has been quiet for `quiet` (<= 0: move it).

        Quiet since its push time, or since we first saw this very copy, whichever is longer:
        a pushgateway whose clock runs ahead cannot hold a copy back beyond `quiet` of ours."""
        now = self._clock()
        if waited is None or (waited.source, waited.pushed_at) != (source, pushed_at):
            waited = _Waiting(waited.first if waited else now, now, source, pushed_at)
        if now - waited.first >= MAX_WAIT_QUIETS * self.quiet:
            return 0.0  # pushes keep reaching a non-owner: move it as before quiet existed
        quiet_for = max(self._wall_clock() - pushed_at, now - waited.since)
        if quiet_for >= self.quiet:
            return 0.0
        self._waiting[key] = waited
        return self.quiet - quiet_for

    # -- writes --------------------------------------------------------------------------

    def _listing(self, owner: str, cache: dict[str, tuple[float, dict[GroupingKey, Group]]]
                       ) -> tuple[float, dict[GroupingKey, Group]]:
        listed = cache.get(owner)
        if listed is None or self._clock() - listed[0] > self.recheck_max_age:
            listed = (self._clock(), {g.key: g for g in self._client(owner).groups()})
            cache[owner] = listed
        return listed

    def _remove_husk(self, move: Move) -> None:
        # A rejected PUT (e.g. a type clash with another group) still leaves an empty group
        # with push_time_seconds 0 on the owner; remove it, the source keeps the data.
        try:
            husk = {g.key: g for g in self._client(move.target).groups()}.get(move.key)
            if husk is not None and husk.push_time == 0 and not husk.families:
                self._client(move.target).delete_group(move.key)
        except UpstreamError:
            pass  # the next pass sees the husk as an older copy and tries again

    def _delete_unchanged(self, moves: list[tuple[Move, bool]], holdings: Mapping[str, Mapping[GroupingKey, Group]],
                          report: ReconcileReport, changed: Callable[[], bool] = lambda: False) -> None:
        """Delete each move's source copy if it still is exactly the surveyed one.

        Pushgateway has no conditional DELETE, so this narrows the race to one listing's age
        (at most recheck_max_age) instead of a whole pass; the daemon's settle time, after which
        no gateway sends pushes to a former owner, closes the rest (docs/rebalancing.md).
        """
        listings: dict[str, tuple[float, dict[GroupingKey, Group]]] = {}
        for move, count in sorted(moves, key=lambda m: m[0].source):  # one listing per source
            if changed():
                return  # a copy made stays beside its source: the next pass deletes the older
            try:
                _, now_there = self._listing(move.source, listings)
            except UpstreamError as exc:
                report.failed += 1
                report.errors.append(str(exc))
                continue
            surveyed, current = holdings[move.source][move.key], now_there.get(move.key)
            if current is None:
                continue  # gone already (a client deleted it): nothing left to remove
            if current.push_time != surveyed.push_time or current.families != surveyed.families:
                # A client pushed here after the survey: its data is newer than what was copied.
                report.skipped += 1
                continue
            self._delete(move, report, count=count)

    def _delete(self, move: Move, report: ReconcileReport, count: bool = True) -> None:
        try:
            self._pace()
            self._client(move.source).delete_group(move.key)
        except UpstreamError as exc:
            report.failed += 1
            report.errors.append(str(exc))
            return
        log.debug("deleted %s on %s: %s", move.key, move.source, move.reason if count else "copied to its owner")
        if count:
            report.deleted += 1

    def _pace(self) -> None:
        now = self._clock()
        if now < self._next_op:
            self._sleep(self._next_op - now)
            now = self._next_op
        self._next_op = now + 1.0 / self.max_ops_per_second

    def _client(self, name: str) -> PushgatewayClient:
        client = self._clients.get(name)
        if client is None:
            client = self._clients[name] = PushgatewayClient(name, timeout=self.timeout)
        return client


def client_push_time(group: Group) -> float:
    """When a client pushed this copy's data (`pgwshard status` reports it too).

    A copy the rebalancer wrote carries the client's time in MARKER_FAMILY and the copy's own
    time in MOVED_FAMILY. The marker counts only while push_time_seconds is still the copy's
    stamp: once a client pushes again (a POST keeps both families), push_time_seconds is newer.
    """
    original, moved = _gauge(group, MARKER_FAMILY), _gauge(group, MOVED_FAMILY)
    if original is not None and moved is not None and group.push_time - moved <= MARKER_SLACK_SECONDS:
        return original
    return group.push_time


def _rank(history: MembershipHistory, name: str, group: Group) -> tuple[bool, float]:
    """Which copy wins: one stored while its instance was in the ring over one stored while it
    was out (never acknowledged through a gateway: a hung pushgateway applying pushes that got
    504), then the newest client push. push_time_seconds is the instance's own write time."""
    return (not history.was_out(name, group.push_time), client_push_time(group))


def _sent_by(history: MembershipHistory, name: str, group: Group) -> float:
    """The latest time the client can have sent this copy's data: its push time, or for a copy
    stored while its instance was out of the ring (a late write), when the instance left: no
    gateway routed to it after that. A delete acknowledged since then covers it."""
    outage = history.outage_at(name, group.push_time)
    return client_push_time(group) if outage is None else outage.left


def _gauge(group: Group, name: str) -> float | None:
    family = group.families.get(name)
    try:
        return float(family["metrics"][0]["value"]) if family else None
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _copy_text(group: Group) -> str:
    families = dict(group.families)
    families[MARKER_FAMILY] = _gauge_family(MARKER_HELP, client_push_time(group))
    families[MOVED_FAMILY] = _gauge_family(MOVED_HELP, time.time())
    return families_to_text(families, dict(group.key.labels))


def _gauge_family(help_text: str, value: float) -> dict[str, Any]:
    return {"type": "GAUGE", "help": help_text, "metrics": [{"labels": {}, "value": repr(value)}]}


def _name(instance: Member | str) -> str:
    return instance.name if isinstance(instance, Member) else Member.parse(instance).name


def _setting(settings: Any, name: str, default: Any) -> Any:
    if settings is None:
        return default
    if isinstance(settings, Mapping):
        return settings.get(name, default)
    return getattr(settings, name, default)
