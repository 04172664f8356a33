"""What a health source is: the shape the daemon consumes.

A source's `watch(stop)` yields HealthSnapshot values until `stop` is set. A snapshot either
knows the healthy set (`members`) or says the source could not tell (`members is None` and an
`error`): Consul being unreachable is not "nobody is healthy", and the daemon keeps its last
known good set on errors. Implementations: probes.ProbeHealth (own GET /-/healthy, the
default) and consul.ConsulHealth (passing instances of a Consul service); both take a member
whose process ended out at once through deathwatch.DeathWatch.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from ...core.ring import Member


@dataclass(frozen=True)
class HealthSnapshot:
    members: frozenset[Member] | None  # None: the source could not tell this time
    error: str | None = None
    query_seconds: float = 0.0  # how long the query behind this snapshot took
    # the source started over (first answer, after an error, or Consul's index went backwards):
    # whatever the daemon registered there may be gone
    reset: bool = False


class HealthSource(Protocol):
    # optional attribute `stale_after`: seconds without a snapshot after which the source
    # counts as down (a query that hangs); sources without it are never judged stale
    def watch(self, stop: threading.Event) -> Iterator[HealthSnapshot]:
        """Yield snapshots until `stop` is set; never raise for an unreachable backend."""
        ...
