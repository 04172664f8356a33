"""Every error pgwshard raises on purpose.

    PgwshardError
    ├── GroupingKeyError   a push path that Pushgateway would reject (answered 400)
    ├── NoMembersError     the ring is empty: nobody can take the push (answered 503)
    ├── ConfigError        a config file or plugin config that does not validate
    └── UpstreamError      a pushgateway, Consul or Kong Admin API call that failed
"""


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
    """A remote call (pushgateway, Consul, Kong Admin API) failed."""
