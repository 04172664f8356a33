"""Health from Consul: the passing instances of a service, followed with blocking queries."""
from __future__ import annotations

import queue
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
    TransportError,
    UpstreamError,
    UpstreamTimeout,
)
from ..settings import ConsulSettings
from . import HealthSnapshot
from .deathwatch import DeathWatch

# How long past a blocking query's wait (plus Consul's jitter of up to wait/16) an answer may
# take before the query counts as an outage: py-consul's own default would be 30 s more, and a
# hung (SIGSTOPped) agent would go unnoticed that long.
CONSUL_GRACE_SECONDS = 5.0
# Beside the blocking query: is the agent there at all? Checked this often, each check given this
# long, so a hung agent is seen within 1.5 s (the query alone would say nothing for `wait`).
LIVENESS_INTERVAL_SECONDS = 0.5
LIVENESS_TIMEOUT_SECONDS = 1.0
DEATH_WATCH = -1  # the number of the death watch's events in the watch's queue


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

    Beside the blocking query (which says nothing for up to `wait`), a liveness check,
    GET /v1/status/leader with a LIVENESS_TIMEOUT, runs every `liveness_interval`: an agent that
    hangs (SIGSTOP, a stuck host) is reported within interval + timeout, and its pending query is
    abandoned (its late answer is dropped). While the agent is away the check goes on, and the
    first time it answers with a leader the query is asked again at once, whatever the backoff
    step (a restarted agent is followed within one interval, not after the 10 s step). The
    backoff still spaces queries that fail while the agent answers (a 403, a 500).

    Consul runs its checks every second at the least, so a pushgateway's death waits for the
    next check. A DeathWatch follows the passing instances: one whose process ended (its idle
    connection closed, a new one refused) leaves the set at once, before Consul's check says
    so, and counts again once it accepts a connection (Consul's verdict then applies).
    """

    def __init__(self, settings: ConsulSettings, client: consul.Consul | None = None, min_interval: float = 0.1,
                 liveness_interval: float = LIVENESS_INTERVAL_SECONDS):
        self.settings = settings
        self.client = client or consul_client(settings)
        self.min_interval = min_interval
        self.liveness_interval = liveness_interval
        self._liveness_client = consul_client(settings)  # its own pool: the query's may be stuck
        self._liveness_client.http.connections_timeout = LIVENESS_TIMEOUT_SECONDS
        self.index = 0  # the X-Consul-Index the next query blocks on
        self.deaths: DeathWatch | None = None  # while watching
        # no snapshot for this long means the watch itself is stuck: the daemon counts it as an
        # outage (a backstop; the liveness check reports a hung agent long before)
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

    def liveness(self) -> UpstreamError | None:
        """GET /v1/status/leader within LIVENESS_TIMEOUT: None when the agent answers and knows a
        leader (a health query can then succeed), else why not."""
        try:
            leader = self._liveness_client.status.leader()
        except Exception as err:  # noqa: BLE001 - mapped into errors.py's tree; a bug re-raises
            mapped = consul_error(err, self.settings.address, "liveness check (/v1/status/leader)")
            if mapped is None:
                raise
            return mapped
        if not leader:
            return ServerStatusError(f"consul {self.settings.address}: liveness check: no cluster leader",
                                     status=200, target=self.settings.address)
        return None

    def _ask(self, number: int, index: int, answers: queue.Queue) -> None:
        """One query on its own thread (a hung agent must not stop the liveness checks)."""
        started = time.monotonic()
        outcome: tuple[int, frozenset[Member]] | BaseException
        try:
            outcome = self.query(index)
        except Exception as err:  # noqa: BLE001 - handed to the watch, which re-raises a bug
            outcome = err
        answers.put((number, time.monotonic() - started, outcome))

    def watch(self, stop: threading.Event) -> Iterator[HealthSnapshot]:
        """A snapshot per answered query, an error snapshot per failed or abandoned one (then
        back off, unless the agent was away and answers again)."""
        # (query number, seconds, outcome); number DEATH_WATCH: the death watch changed its verdict
        answers: queue.Queue[tuple[int, float, tuple[int, frozenset[Member]] | BaseException | None]] = queue.Queue()
        deaths = self.deaths = DeathWatch(lambda _: answers.put((DEATH_WATCH, 0.0, None)),
                                          lambda _: answers.put((DEATH_WATCH, 0.0, None)))
        try:
            yield from self._watch(stop, answers, deaths)
        finally:
            deaths.close()

    def _watch(self, stop: threading.Event, answers: queue.Queue, deaths: DeathWatch) -> Iterator[HealthSnapshot]:
        passing: frozenset[Member] | None = None  # Consul's last answer, while it answers
        shown: frozenset[Member] | None = None
        asked = 0  # the number of the query in flight; answers of older, abandoned ones are dropped
        in_flight = False
        failures = 0
        reset = True  # the first answer: registrations are to be checked anyway
        retry_at = 0.0  # no query before this (min_interval, backoff)
        away = False  # the agent stopped answering: ask again as soon as it is back
        check_at = time.monotonic() + self.liveness_interval
        while not stop.is_set():
            if not in_flight and time.monotonic() >= retry_at:
                asked += 1
                in_flight = True
                threading.Thread(target=self._ask, args=(asked, self.index, answers), daemon=True,
                                 name="pgwshard-consul-query").start()
            wake = check_at if in_flight else min(check_at, retry_at)
            try:
                number, seconds, outcome = answers.get(timeout=max(0.0, wake - time.monotonic()))
            except queue.Empty:
                if time.monotonic() < check_at:
                    continue  # a retry is due
                started = time.monotonic()
                error = self.liveness()
                check_at = time.monotonic() + self.liveness_interval
                if error is None:
                    if away and not in_flight:
                        retry_at = 0.0  # back: ask now, not at the end of the backoff step
                    away = False
                    continue
                away = True
                self.index = 0  # it may come back as a new agent: ask afresh, without blocking
                reset = True
                if in_flight:  # the pending query waits on an agent that does not answer: a failed query
                    asked += 1
                    in_flight = False
                    passing = None
                    retry_at = time.monotonic() + self._backoff(failures)
                    failures += 1
                    yield HealthSnapshot(None, error=str(error), query_seconds=time.monotonic() - started)
                continue
            if number == DEATH_WATCH:
                if passing is not None and passing - deaths.gone() != shown:
                    shown = passing - deaths.gone()
                    yield HealthSnapshot(shown)
                continue
            if number != asked:
                continue  # an abandoned query answered late
            in_flight = False
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, UpstreamError):
                    raise outcome  # a bug: the daemon logs it and restarts the watch
                # any failure means "cannot tell", never "nobody"
                retry_at = time.monotonic() + self._backoff(failures)
                failures += 1
                away = away or isinstance(outcome, TransportError)  # refused, reset, timed out
                self.index = 0  # the agent may have restarted: ask afresh, without blocking
                reset = True
                passing = None
                yield HealthSnapshot(None, error=str(outcome), query_seconds=seconds)
                continue
            assert outcome is not None
            failures = 0
            away = False
            new_index, passing = outcome
            if new_index < self.index:  # went backwards: a new agent or a reset history
                reset = True
            self.index = new_index if new_index >= self.index else 0
            retry_at = time.monotonic() - seconds + self.min_interval  # never spin
            deaths.follow(passing)
            shown = passing - deaths.gone()
            yield HealthSnapshot(shown, query_seconds=seconds, reset=reset)
            reset = False

    def _backoff(self, failures: int) -> float:
        return self.settings.backoff[min(failures, len(self.settings.backoff) - 1)]
