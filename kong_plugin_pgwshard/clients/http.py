"""The one HTTP client of the control path: Kong's Admin/Status API, pushgateways, health probes.

Built on `requests` rather than httpx: requests is already installed (py-consul, which stays the
Consul client, is built on it), so one HTTP stack serves every remote and one `translate` maps
its failures, Consul's included; httpx would add a second stack and a second set of exceptions
for nothing the control path needs (it makes no concurrent or HTTP/2 calls).

What every call gets:
- explicit timeouts: `connect` for the TCP handshake, `read` for each wait on the answer (a
  hung remote fails after `read`, not after the OS's minutes);
- no proxy from the environment (`trust_env` off): urllib and requests honour `http_proxy`
  even for 127.0.0.1, which sent `Kong-Admin-Token` to whatever proxy the shell had set.
  A proxy is used only when configured (`proxy=`), and then only explicitly;
- a pooled Session per client (keep-alive: the rebalancer's PUT and DELETE reuse connections);
- bounded retries with backoff only for idempotent reads (GET/HEAD/OPTIONS) whose caller
  names the statuses it takes (`ok`; the Kong client takes any and maps them itself), only where a retry
  can help: no connection, or 502/503/504. A read that timed out is not retried (a hung
  remote would hold the caller `retries` times longer), nor is a write (a PUT or DELETE that
  may have landed must not be replayed after a client pushed again);
- one mapping of every failure (refused, reset, timeout, garbage bytes, bad JSON, 4xx, 5xx)
  into errors.UpstreamError's tree, with the original exception chained.

Not on a request path: the plugin reads Kong's targets with it from a background thread.
"""
from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import requests
import requests.adapters
import urllib3.exceptions

from ..errors import (
    ProtocolError,
    TransportError,
    UpstreamError,
    UpstreamTimeout,
    status_error,
)

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})
RETRY_STATUSES = frozenset({502, 503, 504})
ANY_STATUS = range(100, 600)


@dataclass(frozen=True)
class Timeouts:
    """Seconds to connect, and to wait for each part of the answer."""

    connect: float = 2.0
    read: float = 5.0

    @classmethod
    def of(cls, value: float | Timeouts) -> Timeouts:
        """A single number bounds both (as a plain `timeout=` did before)."""
        return value if isinstance(value, Timeouts) else cls(min(float(value), cls.connect), float(value))


@dataclass(frozen=True)
class Answer:
    """An HTTP answer read in full: status, headers, body."""

    status: int
    headers: Mapping[str, str] = field(repr=False)
    body: bytes = field(repr=False)
    target: str = ""
    what: str = ""

    def json(self) -> Any:
        """The body as JSON; ProtocolError when it is not (e.g. a proxy's HTML error page)."""
        try:
            return json.loads(self.body) if self.body.strip() else None
        except ValueError as err:
            raise ProtocolError(f"{self.target}: {self.what}: not JSON: {self.body[:100]!r}",
                                target=self.target) from err

    def text(self, limit: int = 300) -> str:
        return self.body[:limit].decode("utf-8", "replace").strip()


class HttpClient:
    """Calls to one remote (`base_url`), named `name` in errors. `headers` go with every call and
    appear in no repr or error (tokens travel this way)."""

    def __init__(self, base_url: str, *, name: str | None = None, timeout: float | Timeouts = Timeouts(),
                 proxy: str | None = None, headers: Mapping[str, str] | None = None, retries: int = 2,
                 backoff: tuple[float, ...] = (0.1, 0.5, 1.0), pool_size: int = 4):
        self.base_url = base_url.rstrip("/")
        self.name = name or self.base_url
        self.timeouts = Timeouts.of(timeout)
        self.retries = retries
        self.backoff = backoff or (0.0,)
        self._headers = dict(headers or {})
        session = requests.Session()
        session.trust_env = False  # no http_proxy, no .netrc: only what is configured here
        session.proxies = {"http": proxy, "https": proxy} if proxy else {}
        # retries are ours (below), with one error mapping; urllib3's would bypass it
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self._session = session

    def __repr__(self) -> str:
        return f"HttpClient({self.base_url!r})"  # never the headers

    def close(self) -> None:
        self._session.close()

    def request(self, method: str, path: str, *, data: bytes | None = None, json_body: Any = None,
                headers: Mapping[str, str] | None = None,
                ok: Collection[int] = (200, 201, 202, 204)) -> Answer:
        """One call, retried as the module docstring says; an Answer whose status is in `ok`
        (pass ANY_STATUS to judge the status yourself), else the mapped UpstreamError."""
        what = f"{method} {path}"
        sent = {**self._headers, **(headers or {})}
        if json_body is not None:
            data = json.dumps(json_body).encode()
            sent.setdefault("Content-Type", "application/json")
        accepted = frozenset(ok)
        attempts = 1 + (self.retries if method in IDEMPOTENT else 0)
        for attempt in range(attempts):
            last = attempt + 1 >= attempts
            try:
                resp = self._session.request(method, self.base_url + path, data=data, headers=sent,
                                             timeout=(self.timeouts.connect, self.timeouts.read),
                                             allow_redirects=False)
                answer = Answer(resp.status_code, resp.headers, resp.content, self.name, what)
            except Exception as exc:  # noqa: BLE001 - mapped below; anything else is a bug and re-raised
                err = translate(exc, target=self.name, what=what)
                if err is None:
                    raise
                if last or not _worth_retrying(exc, err):
                    raise err from exc
            else:
                if answer.status in accepted:
                    return answer
                err = status_error(f"{self.name}: {what}: answered {answer.status}: {answer.text()}",
                                   status=answer.status, target=self.name, body=answer.body[:1000])
                if last or answer.status not in RETRY_STATUSES:
                    raise err
            time.sleep(self.backoff[min(attempt, len(self.backoff) - 1)])
        raise AssertionError("unreachable")  # the loop always returns or raises


def _worth_retrying(exc: BaseException, err: UpstreamError) -> bool:
    # a hung answer is not retried; nor is an answer that was not HTTP (it will not become HTTP)
    return type(err) is TransportError or (isinstance(err, UpstreamTimeout) and isinstance(exc, requests.ConnectTimeout))


def _causes(exc: BaseException, limit: int = 32) -> Iterator[BaseException]:
    """exc and what it wraps (at most `limit`): urllib3 and requests nest the real error in
    args and `reason`."""
    seen: set[int] = set()
    todo = [exc]
    while todo and len(seen) < limit:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        nested = [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
        nested += [x for x in (getattr(e, "reason", None), e.__cause__, e.__context__) if isinstance(x, BaseException)]
        todo += nested


def translate(exc: BaseException, *, target: str, what: str) -> UpstreamError | None:
    """The UpstreamError for a failed call made with requests (ours or py-consul's), or None when
    `exc` is not a transport or protocol failure (a bug, which must surface as such)."""
    causes = list(_causes(exc))
    inner = causes[-1]
    detail = f"{type(inner).__name__}: {inner}" if str(inner) else type(inner).__name__

    def has(*types: type) -> bool:
        return any(isinstance(c, types) for c in causes)

    if has(urllib3.exceptions.NewConnectionError, ConnectionRefusedError) and not isinstance(exc, requests.Timeout):
        # (urllib3's NewConnectionError subclasses its ConnectTimeoutError: test it first)
        return TransportError(f"{target}: {what}: cannot connect ({detail})", target=target)
    if isinstance(exc, requests.Timeout) or has(urllib3.exceptions.TimeoutError, socket.timeout, TimeoutError):
        return UpstreamTimeout(f"{target}: {what}: no answer in time ({detail})", target=target)
    if has(ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
        return TransportError(f"{target}: {what}: connection closed before an answer ({detail})", target=target)
    if has(http.client.HTTPException, urllib3.exceptions.ProtocolError, urllib3.exceptions.DecodeError,
           requests.exceptions.ContentDecodingError, requests.exceptions.ChunkedEncodingError):
        return ProtocolError(f"{target}: {what}: not an HTTP answer ({detail})", target=target)
    if isinstance(exc, (requests.RequestException, urllib3.exceptions.HTTPError, OSError)):
        return TransportError(f"{target}: {what}: {detail}", target=target)
    if isinstance(exc, ValueError):  # a URL or header requests cannot send (UnicodeError too)
        return TransportError(f"{target}: {what}: cannot send: {detail}", target=target)
    return None


def refused(err: BaseException) -> bool:
    """The call failed because nothing listens at the address (ECONNREFUSED): the process is
    gone, which no retry at once will change (a probe's sign of a dead pushgateway)."""
    return any(isinstance(c, ConnectionRefusedError) for c in _causes(err))
