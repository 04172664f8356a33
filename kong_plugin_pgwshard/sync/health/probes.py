"""Health from pgwshard's own probes: GET /-/healthy on every configured pushgateway.

The default source when no Consul is configured. Rise/fall counts damp single lost probes; a
refused connection is no lost probe but a process that is gone, and takes the member out at once,
as does the end of a healthy member's process seen by the DeathWatch between probes.
"""
from __future__ import annotations

import concurrent.futures
import enum
import logging
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence

from ...clients.http import HttpClient, Timeouts, refused
from ...core.ring import Member
from ...errors import UpstreamError
from ..settings import ProbeSettings
from . import HealthSnapshot
from .deathwatch import DeathWatch

log = logging.getLogger("pgwshard.health")

# A member whose probe failed (not yet `fall` times) is probed again after interval / this:
# one slow answer or a 500 is confirmed or cleared in a fraction of the interval.
REPROBE_DIVISOR = 4


class Probe(enum.Enum):
    UP = "up"      # 200 within the timeout
    DOWN = "down"  # anything else: counts toward `fall`
    GONE = "gone"  # connection refused: nothing listens there any more, out at the first one


class ProbeHealth:
    """GET /-/healthy on every pushgateway every `interval`; rise/fall successive results flip
    state, a refused connection flips it to unhealthy at once.

    Each member keeps its own schedule (a hung one, probed for `timeout`, delays nobody else),
    and one whose probe failed is probed again after interval / REPROBE_DIVISOR. An instance's
    first probe decides its initial state, so a restart of the daemon does not hold healthy
    instances back for `rise` intervals; the first snapshot comes once every instance has one.
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
        self.deaths: DeathWatch | None = None  # while watching

    def probe(self, member: Member) -> Probe:
        """One probe: UP only for a 200 within the timeout (Pushgateway answers 500 when its
        write queue is full, which is as unusable as down); GONE when the connection is refused."""
        try:
            self._clients[member].request("GET", "/-/healthy", ok=(200,))
            return Probe.UP
        except UpstreamError as err:  # any failure, garbage answers included, is "unhealthy"
            log.debug("probe of %s failed: %s", member.name, err)
            return Probe.GONE if refused(err) else Probe.DOWN

    def observe(self, results: Mapping[Member, Probe | bool]) -> frozenset[Member]:
        """Fold probe results (True/False read as UP/DOWN) into the rise/fall state; the healthy set."""
        for member, result in results.items():
            if isinstance(result, bool):
                result = Probe.UP if result else Probe.DOWN
            ok = result is Probe.UP
            if member not in self._healthy:
                self._healthy[member] = ok
                continue
            if ok == self._healthy[member]:
                self._streak[member] = 0
                continue
            self._streak[member] += 1
            if result is Probe.GONE or self._streak[member] >= (self.settings.rise if ok else self.settings.fall):
                self._healthy[member] = ok
                self._streak[member] = 0
                log.info("pushgateway %s is now %s%s", member.name, "healthy" if ok else "unhealthy",
                         " (connection refused)" if result is Probe.GONE else "")
        return frozenset(m for m, ok in self._healthy.items() if ok)

    def _next_probe(self, member: Member, started: float) -> float:
        failing = self._streak[member] > 0 and self._healthy.get(member)  # healthy, but its last probe failed
        return started + self.settings.interval / (REPROBE_DIVISOR if failing else 1)

    def watch(self, stop: threading.Event) -> Iterator[HealthSnapshot]:
        """Probe each instance on its own schedule; a snapshot whenever the healthy set changes,
        and at least every `interval` (the daemon's sign of life from the source). Healthy
        instances are also followed by a DeathWatch: one whose process ends is out at once."""
        everyone = len(self.pushgateways)
        due = {m: 0.0 for m in self.pushgateways}
        wake = threading.Event()  # a probe finished, or the death watch saw a death
        gone: queue.SimpleQueue[Member] = queue.SimpleQueue()

        def died(member: Member) -> None:
            gone.put(member)
            wake.set()

        deaths = self.deaths = DeathWatch(died)
        probing: dict[concurrent.futures.Future[Probe], tuple[Member, float]] = {}
        shown: frozenset[Member] | None = None
        shown_at = 0.0
        try:
            with concurrent.futures.ThreadPoolExecutor(max(1, min(16, everyone))) as pool:
                while not stop.is_set():
                    now = time.monotonic()
                    busy = {member for member, _ in probing.values()}
                    for member, at in due.items():
                        if at <= now and member not in busy:
                            future = pool.submit(self.probe, member)
                            probing[future] = (member, now)
                            future.add_done_callback(lambda _: wake.set())
                    idle = [at for member, at in due.items() if member not in busy and at > now]
                    # bounded, so that `stop` is seen while a probe hangs
                    wake.wait(max(0.0, min([*idle, now + min(0.5, self.settings.interval)]) - now))
                    wake.clear()
                    results: dict[Member, Probe] = {}
                    began: dict[Member, float] = {}
                    for future in [f for f in probing if f.done()]:
                        member, began[member] = probing.pop(future)
                        results[member] = future.result()
                    while not gone.empty():
                        results[gone.get()] = Probe.GONE  # its process ended: as a refused probe
                    if not results:
                        continue
                    healthy = self.observe(results)
                    for member, started in began.items():
                        due[member] = self._next_probe(member, started)
                    if len(self._healthy) < everyone:
                        continue  # the first set waits for every instance's first probe
                    deaths.follow(healthy)
                    finished = time.monotonic()
                    if healthy != shown or finished - shown_at >= self.settings.interval:
                        shown, shown_at = healthy, finished
                        slowest = finished - min(began.values()) if began else 0.0
                        yield HealthSnapshot(healthy, query_seconds=slowest)
        finally:
            deaths.close()
