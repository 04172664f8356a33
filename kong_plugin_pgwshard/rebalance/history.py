"""When each pushgateway was out of the ring: what tells an acknowledged copy from a late one.

pgwshard-sync records every member's leaving and rejoining (by the wall clock, which is what
pushgateways stamp `push_time_seconds` with) and hands the rebalancer an immutable snapshot with
each membership. Two rules read it (docs/rebalancing.md "Copies written while out of the ring"):

- a copy an instance stored while it was out of the ring was not acknowledged through the
  gateway (a hung pushgateway applying, after it resumed, pushes that already got 504): it loses
  to any copy stored by an instance that was in the ring;
- an instance that is out of the ring but answers (rising, held down) is probably about to rejoin:
  it keeps the groups of which it holds the best copy until it rejoins or has been out for
  `gone_after`.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# Outages kept per member: enough for any copy still around; a flapping member cannot grow it.
MAX_OUTAGES = 16


@dataclass(frozen=True)
class Outage:
    left: float                 # wall clock when the member left the ring
    back: float | None = None   # ... when it rejoined; None while it is still out

    def covers(self, when: float) -> bool:
        return self.left <= when and (self.back is None or when < self.back)


@dataclass(frozen=True)
class MembershipHistory:
    """Immutable: every change returns a new history."""

    outages: Mapping[str, tuple[Outage, ...]] = field(default_factory=lambda: MappingProxyType({}))

    def changed(self, members: Iterable[str], known: Iterable[str], at: float) -> MembershipHistory:
        """The history once `members` (names) are the ring, at wall-clock time `at`: a known
        instance outside it is out since `at` unless it already was, a member that was out is back."""
        inside = set(members)
        outages = dict(self.outages)
        for name in set(known) | inside | set(outages):
            past = outages.get(name, ())
            open_now = bool(past) and past[-1].back is None
            if name in inside and open_now:
                outages[name] = (*past[:-1], Outage(past[-1].left, at))
            elif name not in inside and not open_now:
                outages[name] = (*past, Outage(at))[-MAX_OUTAGES:]
        return MembershipHistory(MappingProxyType(outages))

    def out_since(self, name: str) -> float | None:
        """When `name` left the ring, if it is out now."""
        past = self.outages.get(name, ())
        return past[-1].left if past and past[-1].back is None else None

    def outage_at(self, name: str, when: float) -> Outage | None:
        """The outage of `name` that wall-clock time `when` falls in, if any."""
        return next((o for o in self.outages.get(name, ()) if o.covers(when)), None)

    def was_out(self, name: str, when: float) -> bool:
        """Whether `name` was out of the ring at wall-clock time `when`."""
        return self.outage_at(name, when) is not None
