"""Health from pgwshard's own probes: GET /-/healthy on every configured pushgateway.

The default source when no Consul is configured. Rise/fall counts damp single lost probes.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterator, Sequence

from ...clients.http import HttpClient, Timeouts
from ...core.ring import Member
from ...errors import UpstreamError
from ..settings import ProbeSettings
from . import HealthSnapshot

log = logging.getLogger("pgwshard.health")


class ProbeHealth:
    """GET /-/healthy on every pushgateway each interval; rise/fall successive results flip state.

    An instance's first probe decides its initial state, so a restart of the daemon does not
    hold healthy instances back for `rise` intervals.
    """

    def __init__(self, pushgateways: Sequence[Member], settings: ProbeSettings):
        self.pushgateways = tuple(pushgateways)
        self.settings = settings
        self._healthy: dict[Member, bool] = {}
        self._streak: dict[Member, int] = {m: 0 for m in self.pushgateways}
        # one pooled client per pushgateway, no retries: rise/fall already damp a lost probe
        timeouts = Timeouts(min(settings.timeout, 1.0), settings.timeout)
        self._clients = {m: HttpClient(f"http://{m.name}", timeout=timeouts, retries=0, pool_size=1)
                         for m in self.pushgateways}

    def probe(self, member: Member) -> bool:
        """One probe: True only for a 200 within the timeout (Pushgateway answers 500 when its
        write queue is full, which is as unusable as down)."""
        try:
            self._clients[member].request("GET", "/-/healthy", ok=(200,))
            return True
        except UpstreamError as err:  # any failure, garbage answers included, is "unhealthy"
            log.debug("probe of %s failed: %s", member.name, err)
            return False

    def observe(self, results: dict[Member, bool]) -> frozenset[Member]:
        """Fold one round of probe results into the rise/fall state; the healthy set."""
        for member, ok in results.items():
            if member not in self._healthy:
                self._healthy[member] = ok
                continue
            if ok == self._healthy[member]:
                self._streak[member] = 0
                continue
            self._streak[member] += 1
            if self._streak[member] >= (self.settings.rise if ok else self.settings.fall):
                self._healthy[member] = ok
                self._streak[member] = 0
                log.info("pushgateway %s is now %s", member.name, "healthy" if ok else "unhealthy")
        return frozenset(m for m, ok in self._healthy.items() if ok)

    def watch(self, stop: threading.Event) -> Iterator[HealthSnapshot]:
        """Probe all instances in parallel every `interval`; a snapshot per round."""
        with concurrent.futures.ThreadPoolExecutor(max(1, min(16, len(self.pushgateways)))) as pool:
            while not stop.is_set():
                started = time.monotonic()
                results = dict(zip(self.pushgateways, pool.map(self.probe, self.pushgateways), strict=True))
                yield HealthSnapshot(self.observe(results), query_seconds=time.monotonic() - started)
                stop.wait(max(0.0, self.settings.interval - (time.monotonic() - started)))
