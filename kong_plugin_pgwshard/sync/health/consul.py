"""Health from Consul: the passing instances of a service, followed with blocking queries."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import consul

from ...core.ring import Member
from ..settings import ConsulSettings
from . import HealthSnapshot

# py-consul waits 30 s beyond a blocking query's wait before it gives up on a hung agent;
# 5 s lets an outage be reported (and the last good set kept) sooner.
CONSUL_GRACE_SECONDS = 5.0


def consul_client(settings: ConsulSettings) -> consul.Consul:
    """A py-consul client for the configured agent (token and TLS included)."""
    url = urlsplit(settings.address)
    verify: bool | str = settings.tls.ca_file or settings.tls.verify
    cert = (settings.tls.cert_file, settings.tls.key_file) if settings.tls.cert_file else None
    client = consul.Consul(host=url.hostname, port=url.port or (443 if url.scheme == "https" else 8500),
                           scheme=url.scheme, token=settings.token, dc=settings.datacenter, verify=verify, cert=cert)
    # py-consul lets CONSUL_HTTP_TOKEN override an explicit token; the config already fell back
    # to that variable, so the file's token must win here.
    client.token = settings.token
    client.http.connections_timeout = CONSUL_GRACE_SECONDS
    return client


def _member(entry: dict) -> Member:
    # A service registered without an address takes its node's address (Consul's own rule).
    return Member(entry["Service"].get("Address") or entry["Node"]["Address"], int(entry["Service"]["Port"]))


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
        self.index = 0  # the X-Consul-Index the next query blocks on

    def query(self, index: int) -> tuple[int, frozenset[Member]]:
        """One blocking query on /v1/health/service/<name>?passing: (new index, members)."""
        new_index, entries = self.client.health.service(
            self.settings.service, index=index or None, wait=f"{self.settings.wait:g}s", passing=True,
            tag=self.settings.tag, dc=self.settings.datacenter)
        return int(new_index or 0), frozenset(_member(e) for e in entries)

    def watch(self, stop: threading.Event) -> Iterator[HealthSnapshot]:
        """A snapshot per answered query, an error snapshot per failed one (then back off)."""
        failures = 0
        while not stop.is_set():
            started = time.monotonic()
            try:
                new_index, members = self.query(self.index)
            except Exception as err:  # noqa: BLE001 - any failure means "cannot tell", never "nobody"
                delay = self.settings.backoff[min(failures, len(self.settings.backoff) - 1)]
                failures += 1
                yield HealthSnapshot(None, error=f"consul: {type(err).__name__}: {err}",
                                     query_seconds=time.monotonic() - started)
                stop.wait(delay)
                continue
            failures = 0
            self.index = new_index if new_index >= self.index else 0  # went backwards: start over
            yield HealthSnapshot(members, query_seconds=time.monotonic() - started)
            stop.wait(max(0.0, self.min_interval - (time.monotonic() - started)))
