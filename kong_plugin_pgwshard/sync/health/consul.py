"""Health from Consul: the passing instances of a service, followed with blocking queries."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import consul
import consul.exceptions

from ...clients.http import translate
from ...core.ring import Member
from ...errors import (
    ClientStatusError,
    ProtocolError,
    ServerStatusError,
    UpstreamError,
    UpstreamTimeout,
)
from ..settings import ConsulSettings
from . import HealthSnapshot

# How long past a blocking query's wait (plus Consul's jitter of up to wait/16) an answer may
# take before the query counts as an outage: py-consul's own default would be 30 s more, and a
# hung (SIGSTOPped) agent would go unnoticed that long.
CONSUL_GRACE_SECONDS = 5.0


def consul_error(err: BaseException, target: str, what: str) -> UpstreamError | None:
    """py-consul's failures in errors.py's tree (its transport is requests: clients.http.translate
    maps those); None for anything that is neither (a bug, to surface as such)."""
    where = f"consul {target}: {what}"
    statuses = {consul.exceptions.BadRequest: 400, consul.exceptions.ACLDisabled: 401,
                consul.exceptions.ACLPermissionDenied: 403, consul.exceptions.NotFound: 404}
    if isinstance(err, consul.exceptions.Timeout):
        return UpstreamTimeout(f"{where}: timed out", target=target)
    for cls, status in statuses.items():
        if isinstance(err, cls):
            return ClientStatusError(f"{where}: {status} {err}", status=status, target=target)
    if isinstance(err, consul.exceptions.ClientError):
        return ClientStatusError(f"{where}: {err}", status=_status(err, 400), target=target)
    if isinstance(err, consul.exceptions.ConsulException):
        text = str(err)
        if text.startswith(("Failed to decode JSON", "Missing index header")):
            return ProtocolError(f"{where}: {text[:300]}", target=target)
        return ServerStatusError(f"{where}: {text[:300]}", status=_status(err, 500), target=target)
    return translate(err, target=f"consul {target}", what=what)


def _status(err: BaseException, default: int) -> int:
    head = str(err).split(" ", 1)[0]
    return int(head) if head.isdigit() else default


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
    # no proxy from the environment: the token must never reach a proxy nobody configured
    client.http.session.trust_env = False
    return client


def _member(entry: dict) -> Member:
    # A service registered without an address takes its node's address (Consul's own rule).
    return Member(entry["Service"].get("Address") or entry["Node"]["Address"], int(entry["Service"]["Port"]))


class ConsulHealth:
    """Passing instances of a Consul service, followed with blocking queries.

    Follows Consul's blocking-query rules: the index is an integer, reset to 0 when it goes
    backwards; a response does not prove a change; never spin (at least `min_interval` between
    queries), and back off along `settings.backoff` while Consul fails. After a failure the next
    query carries no index: an agent that restarted has a shorter history, and the old index
    would make its first answer wait the whole `wait` (FIELD-NOTES: ~38 s to notice a restarted
    agent). An answer after a failure or with an index that went backwards is marked `reset`:
    the agent may have lost its registrations.
    """

    def __init__(self, settings: ConsulSettings, client: consul.Consul | None = None, min_interval: float = 0.1):
        self.settings = settings
        self.client = client or consul_client(settings)
        self.min_interval = min_interval
        self.index = 0  # the X-Consul-Index the next query blocks on
        # no snapshot for this long means the query hangs: the daemon counts it as an outage
        self.stale_after = settings.wait * 17 / 16 + CONSUL_GRACE_SECONDS + 1.0

    def query(self, index: int) -> tuple[int, frozenset[Member]]:
        """One blocking query on /v1/health/service/<name>?passing: (new index, members)."""
        try:
            new_index, entries = self.client.health.service(
                self.settings.service, index=index or None, wait=f"{self.settings.wait:g}s", passing=True,
                tag=self.settings.tag, dc=self.settings.datacenter)
        except Exception as err:  # noqa: BLE001 - mapped into errors.py's tree; a bug re-raises
            mapped = consul_error(err, self.settings.address, f"health of {self.settings.service}")
            if mapped is None:
                raise
            raise mapped from err
        return int(new_index or 0), frozenset(_member(e) for e in entries)

    def watch(self, stop: threading.Event) -> Iterator[HealthSnapshot]:
        """A snapshot per answered query, an error snapshot per failed one (then back off)."""
        failures = 0
        reset = True  # the first answer: registrations are to be checked anyway
        while not stop.is_set():
            started = time.monotonic()
            try:
                new_index, members = self.query(self.index)
            except UpstreamError as err:  # any failure means "cannot tell", never "nobody"
                delay = self.settings.backoff[min(failures, len(self.settings.backoff) - 1)]
                failures += 1
                self.index = 0  # the agent may have restarted: ask afresh, without blocking
                reset = True
                yield HealthSnapshot(None, error=str(err), query_seconds=time.monotonic() - started)
                stop.wait(delay)
                continue
            failures = 0
            if new_index < self.index:  # went backwards: a new agent or a reset history
                reset = True
            self.index = new_index if new_index >= self.index else 0
            yield HealthSnapshot(members, query_seconds=time.monotonic() - started, reset=reset)
            reset = False
            stop.wait(max(0.0, self.min_interval - (time.monotonic() - started)))
