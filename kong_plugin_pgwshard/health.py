"""Health sources: which pushgateways are healthy now.

A source's `watch(stop)` yields HealthSnapshot values until `stop` is set. A snapshot either
knows the healthy set (`members`) or says the source could not tell (`error`): Consul being
unreachable is not "nobody is healthy", and the daemon keeps its last known good set on errors.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import consul

from .config import ConsulSettings, ProbeSettings
from .ring import Member

log = logging.getLogger("pgwshard.health")


@dataclass(frozen=True)
class HealthSnapshot:
    members: frozenset[Member] | None  # None: the source could not tell this time
    error: str | None = None
    query_seconds: float = 0.0


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

    def probe(self, member: Member) -> bool:
        try:
            with urllib.request.urlopen(f"http://{member.name}/-/healthy", timeout=self.settings.timeout) as resp:
                return resp.status == 200
        except OSError:
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
        with concurrent.futures.ThreadPoolExecutor(max(1, min(16, len(self.pushgateways)))) as pool:
            while not stop.is_set():
                started = time.monotonic()
                results = dict(zip(self.pushgateways, pool.map(self.probe, self.pushgateways)))
                yield HealthSnapshot(self.observe(results), query_seconds=time.monotonic() - started)
                stop.wait(max(0.0, self.settings.interval - (time.monotonic() - started)))


def consul_client(settings: ConsulSettings) -> consul.Consul:
    """A py-consul client for the configured agent (token and TLS included)."""
    url = urlsplit(settings.address)
    verify: bool | str = settings.tls.ca_file or settings.tls.verify
    cert = (settings.tls.cert_file, settings.tls.key_file) if settings.tls.cert_file else None
    client = consul.Consul(host=url.hostname, port=url.port or (443 if url.scheme == "https" else 8500),
                           scheme=url.scheme, token=settings.token, dc=settings.datacenter, verify=verify, cert=cert)
    # py-consul waits 30 s beyond a blocking query's wait before it gives up on a hung agent;
    # 5 s lets an outage be reported (and the last good set kept) sooner.
    client.http.connections_timeout = 5.0
    return client


class ConsulHealth:
    """Passing instances of a Consul service, followed with blocking queries.

    Follows Consul's blocking-query rules: the index is an integer, reset to 0 when it goes
    backwards; a response does not prove a change; never spin (at least `min_interval` between
    queries), and back off along `settings.backoff` while Consul fails.
    """

    def __init__(self, settings: ConsulSettings, client: consul.Consul | None = None, min_interval: float = 0.1):
        self.settings = settings
        self.client = client or consul_client(settings)
        self.min_interval = min_interval

    def query(self, index: int) -> tuple[int, frozenset[Member]]:
        new_index, entries = self.client.health.service(
            self.settings.service, index=index or None, wait=f"{self.settings.wait:g}s", passing=True,
            tag=self.settings.tag, dc=self.settings.datacenter)
        members = frozenset(
            Member(e["Service"].get("Address") or e["Node"]["Address"], int(e["Service"]["Port"]))
            for e in entries)
        return int(new_index or 0), members

    def watch(self, stop: threading.Event) -> Iterator[HealthSnapshot]:
        index, failures = 0, 0
        while not stop.is_set():
            started = time.monotonic()
            try:
                new_index, members = self.query(index)
            except Exception as err:  # noqa: BLE001 - any failure means "cannot tell", never "nobody"
                delay = self.settings.backoff[min(failures, len(self.settings.backoff) - 1)]
                failures += 1
                yield HealthSnapshot(None, error=f"consul: {type(err).__name__}: {err}")
                stop.wait(delay)
                continue
            failures = 0
            index = new_index if new_index >= index else 0  # went backwards: start over
            yield HealthSnapshot(members, query_seconds=time.monotonic() - started)
            stop.wait(max(0.0, self.min_interval - (time.monotonic() - started)))
