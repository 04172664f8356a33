"""Where the plugin's ring comes from.

`ring()` is called on every request: it returns the current immutable Ring and does no I/O and
takes no lock. Daemon-fed sources refresh in one background thread per source, shared by every
plugin instance that names the same source (Kong starts a new instance on each config change).
A failed refresh keeps the last good ring; a successful read of an empty list empties it (the
plugin then answers 503), because pgwshard-sync only writes an empty set when nothing is healthy.

The full read comes every `refresh_interval`; between reads the same thread asks every
`watch_interval` for a cheap sign of change (the file's inode, mtime and size; the
`configuration_hash` on Kong's /status, which nodes with `database = off` serve) and reads at
once when it moved: a member pgwshard-sync removed leaves the ring within `watch_interval`, not
a whole `refresh_interval`. Kong in DB mode shows no such hash: there `refresh_interval` alone
applies.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Protocol

from ..core.file_sd import read_file_sd
from ..core.ring import Member, Ring
from ..errors import ClientStatusError, UpstreamError
from .config import PluginConfig

if TYPE_CHECKING:
    from ..clients.kong import KongAdmin

log = logging.getLogger("pgwshard.membership")


class Membership(Protocol):
    def ring(self) -> Ring: ...


class StaticMembership:
    """Members fixed in the plugin config."""

    def __init__(self, members: tuple[Member, ...]):
        self._ring = Ring(members)

    def ring(self) -> Ring:
        return self._ring


class PolledMembership:
    """Members read by `fetch()` every `interval` seconds in a background thread, and at once
    when `version()` (asked every `watch_interval`) returns something else than before.

    `version()` is the cheap sign of change: it returns a hashable value, raises (UpstreamError,
    OSError, ValueError) when it cannot tell this time (the periodic read says what is wrong),
    or returns None when the source offers no such sign (the checks stop)."""

    def __init__(self, name: str, fetch: Callable[[], list[Member]], interval: float,
                 version: Callable[[], Hashable | None] | None = None, watch_interval: float | None = None):
        self.name = name
        self._fetch = fetch
        self._interval = interval
        self._version = version if watch_interval is not None and watch_interval < interval else None
        self._watch_interval = watch_interval if self._version is not None and watch_interval else interval
        self._seen: Hashable | None = None
        self._ring = Ring()
        self._stop = threading.Event()
        self._changed()  # the version before the first read: a change after it is seen
        self.refresh()  # the first read happens at instance start, not on a request
        self._thread = threading.Thread(target=self._run, name=f"pgwshard-membership {name}", daemon=True)
        self._thread.start()

    def ring(self) -> Ring:
        return self._ring

    def refresh(self) -> bool:
        """Read the members once; on error keep the last good ring. Returns success."""
        try:
            members = self._fetch()
        except (UpstreamError, OSError, ValueError) as err:
            log.warning("membership %s: read failed, keeping %d members: %s", self.name, len(self._ring), err)
            return False
        ring = Ring(members)
        if ring != self._ring:
            old = {m.name for m in self._ring.members}
            new = {m.name for m in ring.members}
            log.warning("membership %s: now %d members (added %s, removed %s)", self.name, len(ring),
                        _names(new - old), _names(old - new))
            self._ring = ring
        return True

    def close(self) -> None:
        self._stop.set()

    def _changed(self) -> bool:
        """Did the source's version move since the last check?"""
        if self._version is None:
            return False
        try:
            version = self._version()
        except (UpstreamError, OSError, ValueError) as err:
            log.debug("membership %s: change check failed: %s", self.name, err)
            return False
        if version is None:
            log.info("membership %s: no sign of change to watch; reading every %g s", self.name, self._interval)
            self._version, self._watch_interval = None, self._interval
            return False
        changed = version != self._seen
        self._seen = version
        return changed

    def _run(self) -> None:
        next_read = time.monotonic() + self._interval
        while not self._stop.wait(max(0.0, min(self._watch_interval, next_read - time.monotonic()))):
            try:
                if time.monotonic() >= next_read or self._changed():
                    self.refresh()
                    next_read = time.monotonic() + self._interval
            except Exception:  # noqa: BLE001 - a dead poller would freeze the ring for good
                log.exception("membership %s: refresh crashed, keeping %d members", self.name, len(self._ring))


def _names(names: set[str], shown: int = 20) -> str:
    """A change for the log: the first `shown` names, so a first read of a big upstream stays one short line."""
    if not names:
        return "none"
    ordered = sorted(names)
    more = f" and {len(ordered) - shown} more" if len(ordered) > shown else ""
    return f"{ordered[:shown]}{more}"


def read_upstream_targets(admin_url: str, upstream: str, token: str | None, timeout: float = 2.0) -> list[Member]:
    """The targets of a Kong upstream: one paginated GET /upstreams/<u>/targets, which a node's
    Admin API serves and, with `database = off` (DB-less nodes, hybrid data planes), its
    Status API too, read-only and without a token (kong/status/init.lua)."""
    # Imported here: requests and its TLS stack are ~8 MiB resident, needed by this mode only.
    from ..clients.kong import KongAdmin
    admin = KongAdmin(admin_url, token, timeout)  # the one Admin API client (no logging, no token in errors)
    try:
        targets = [(t["target"], int(t.get("weight", 100))) for t in admin.targets(upstream)]
    except (KeyError, TypeError, ValueError) as err:
        raise UpstreamError(f"upstream {upstream} at {admin_url}: malformed target entity: {err}") from None
    finally:
        admin.close()  # one read per refresh: its pooled connection is not kept
    # weight 0 is Kong's "receives no traffic": such a target owns no groups either
    return [Member.parse(target, weight) for target, weight in targets if weight > 0]


def configuration_hash(admin: KongAdmin) -> str | None:
    """The `configuration_hash` of the node's /status (Admin or Status API), which Kong serves
    on DB-less nodes and data planes (kong/api/routes/health.lua: `if dbless or data_plane_role`)
    and which moves with every config it loads; None where there is none (DB mode)."""
    try:
        _, body = admin.request("GET", "/status")
    except ClientStatusError:  # no /status here: nothing to watch
        return None
    found = body.get("configuration_hash") if isinstance(body, dict) else None
    return found if isinstance(found, str) and found else None


class UpstreamMembership(PolledMembership):
    """Follows a Kong upstream's targets through this node's Admin API or Status API, re-read
    when the node's configuration hash moves."""

    def __init__(self, admin_url: str, upstream: str, token: str | None, interval: float, timeout: float = 2.0,
                 watch_interval: float | None = None):
        from ..clients.kong import KongAdmin  # as in read_upstream_targets: this mode only

        # one kept-alive connection for the frequent checks; the full reads make their own
        self._status = KongAdmin(admin_url, token, min(timeout, 1.0))
        super().__init__(f"upstream {upstream} at {admin_url}",
                         lambda: read_upstream_targets(admin_url, upstream, token, timeout), interval,
                         lambda: configuration_hash(self._status), watch_interval)

    def close(self) -> None:
        super().close()
        self._status.close()


def file_version(path: str) -> tuple[int, int, int]:
    """Inode, mtime and size: pgwshard-sync replaces the file whole (a new inode) at each change."""
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


class FileMembership(PolledMembership):
    """Follows the file_sd JSON file pgwshard-sync's FileSdSink writes, re-read when it changes."""

    def __init__(self, path: str, interval: float, watch_interval: float | None = None):
        super().__init__(f"file {path}", lambda: read_file_sd(path), interval, lambda: file_version(path),
                         watch_interval)


class _SharedSources:
    """Polled sources shared by the instances naming the same one. Each instance acquires its
    source and releases it when Kong closes the instance; the last release stops the poller, so
    config changes (a rotated token, a new interval) do not leave pollers behind."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: dict[tuple, tuple[PolledMembership, int]] = {}

    def acquire(self, key: tuple, start: Callable[[], PolledMembership]) -> PolledMembership:
        with self._lock:
            source, users = self._sources.get(key) or (start(), 0)
            self._sources[key] = (source, users + 1)
            return source

    def release(self, source: Membership) -> None:
        with self._lock:
            for key, (shared, users) in self._sources.items():
                if shared is source:
                    if users > 1:
                        self._sources[key] = (shared, users - 1)
                    else:
                        del self._sources[key]
                        shared.close()
                    return


_shared = _SharedSources()


def membership_for(config: PluginConfig) -> Membership:
    """The membership source a plugin config names, shared with instances naming the same one.
    Give it back with `release` when the instance closes."""
    if config.membership == "static":
        return StaticMembership(config.nodes)
    if config.membership == "file":
        path = config.membership_file
        assert path is not None  # required in this mode (config.py)
        return _shared.acquire(("file", path, config.refresh_interval, config.watch_interval),
                               lambda: FileMembership(path, config.refresh_interval, config.watch_interval))
    upstream = config.upstream
    assert upstream is not None  # required in this mode (config.py)
    return _shared.acquire(
        ("upstream", config.admin_url, upstream, config.admin_token, config.refresh_interval, config.watch_interval),
        lambda: UpstreamMembership(config.admin_url, upstream, config.admin_token, config.refresh_interval,
                                   watch_interval=config.watch_interval))


def release(membership: Membership) -> None:
    """An instance is done with its source; static ones need nothing."""
    _shared.release(membership)
