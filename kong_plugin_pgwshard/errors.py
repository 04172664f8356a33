"""Every error pgwshard raises on purpose.

    PgwshardError
    ├── GroupingKeyError      a push path that Pushgateway would reject (answered 400)
    ├── NoMembersError        the ring is empty: nobody can take the push (answered 503)
    ├── ConfigError           a config file or plugin config that does not validate
    └── UpstreamError         a call to a pushgateway, Consul or Kong failed (`target`, chained cause)
        ├── TransportError    no answer: refused, reset, DNS, a proxy that failed
        │   └── UpstreamTimeout   connecting or waiting for the answer took too long
        ├── ProtocolError     an answer, but not HTTP (garbage bytes) or not the JSON expected
        └── StatusError       an HTTP answer with a status the caller did not expect (`status`)
            ├── ClientStatusError   4xx: the request is wrong, retrying it changes nothing
            └── ServerStatusError   5xx: the remote failed, a later try may pass

Callers branch on these types, never on message text. Remote failures are translated into this
tree where the I/O happens (clients/http.py for HTTP, sync/health/consul.py for py-consul), and
the original exception stays chained as `__cause__`. Messages never carry a token: tokens travel
in headers, which no message includes.
"""
from __future__ import annotations


class PgwshardError(Exception):
    """Base of all pgwshard errors."""


class GroupingKeyError(PgwshardError, ValueError):
    """A push path does not name a valid grouping key; the message says why."""


class NoMembersError(PgwshardError):
    """The ring has no members, so no instance can own a group."""


class ConfigError(PgwshardError, ValueError):
    """Configuration is invalid; the message names the key and, for files, the file."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        self.key = key
        self.source = source
        where = ", ".join(p for p in (f"in {source}" if source else "", f"at {key!r}" if key else "") if p)
        super().__init__(f"{message} ({where})" if where else message)


class UpstreamError(PgwshardError):
    """A remote call (pushgateway, Consul, Kong Admin API) failed. `target` names the remote
    (a URL or host:port) when known; the message says what was asked and what went wrong."""

    def __init__(self, message: str, *, target: str | None = None):
        super().__init__(message)
        self.target = target


class TransportError(UpstreamError):
    """No usable answer arrived: connection refused or reset, name not resolved, proxy failed."""


class UpstreamTimeout(TransportError):
    """Connecting, or waiting for the answer, outlasted its timeout (a hung remote)."""


class ProtocolError(UpstreamError):
    """The remote answered, but not with HTTP, or not with the body its API documents."""


class StatusError(UpstreamError):
    """An HTTP answer whose status the caller does not accept. `body` is its first bytes."""

    def __init__(self, message: str, *, status: int, target: str | None = None, body: bytes = b""):
        super().__init__(message, target=target)
        self.status = status
        self.body = body


class ClientStatusError(StatusError):
    """A 4xx answer."""


class ServerStatusError(StatusError):
    """A 5xx answer (or any other status outside 4xx that the caller did not expect)."""


def status_error(message: str, *, status: int, target: str | None = None, body: bytes = b"") -> StatusError:
    """The StatusError subclass for `status`."""
    cls = ClientStatusError if 400 <= status < 500 else ServerStatusError
    return cls(message, status=status, target=target, body=body)
