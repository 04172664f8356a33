"""Where the healthy set goes: Kong (Admin API or DB-less /config) and a Prometheus file_sd file.

A sink's `apply(members)` makes its target equal `members` or raises UpstreamError; the daemon
retries a failed sink and never hands it an empty set because of an error elsewhere.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import yaml

from ..clients.kong import KongAdmin, KongBusy, new_upstream
from ..core.file_sd import render_file_sd
from ..core.ring import Member
from ..errors import UpstreamError
from .settings import FileSdSettings, KongSettings, Settings, read_declarative

log = logging.getLogger("pgwshard.sinks")


class Sink(Protocol):
    name: str

    def apply(self, members: Sequence[Member]) -> None:
        """Make the sink's target list equal `members`; raise UpstreamError when that failed."""
        ...


class AdminApiSink:
    """Kong in DB mode (or a hybrid control plane): the upstream's targets, with the fewest writes
    that make them equal. Kong lists targets in its normalised spelling (kong/db/dao/targets.lua),
    the one Member.name gives (core/members.py): both sides are compared in it, so an equal set
    costs no write, whatever spelling the config, Consul or Kong used."""

    def __init__(self, admin: KongAdmin, upstream: str):
        self.admin, self.upstream = admin, upstream
        self.name = f"kong-admin {admin.url} upstream {upstream}"

    def apply(self, members: Sequence[Member]) -> None:
        self.admin.ensure_upstream(self.upstream)
        current = {_member_name(t["target"]): t for t in self.admin.targets(self.upstream)}
        wanted = {m.name: m for m in members}
        # adds before deletes: a swap never leaves Kong with fewer targets than either set
        for name, member in sorted(wanted.items()):
            if name not in current:
                self.admin.add_target(self.upstream, name, member.weight)
                log.info("%s: added target %s (weight %d)", self.name, name, member.weight)
            elif int(current[name].get("weight", 100)) != member.weight:
                self.admin.set_weight(self.upstream, current[name]["id"], member.weight)
                log.info("%s: target %s weight now %d", self.name, name, member.weight)
        for name in sorted(current.keys() - wanted.keys()):
            self.admin.delete_target(self.upstream, current[name]["id"])  # by id: no spelling to match
            log.info("%s: removed target %s", self.name, name)


def _member_name(target: str) -> str:
    """A listed target's name as Member.name spells it; one pgwshard cannot parse stays as listed
    (it is no member, so it is removed)."""
    try:
        return Member.parse(target).name
    except ValueError:
        return target


class DeclarativeSink:
    """Kong DB-less: the user's declarative file with the upstream's targets replaced, POSTed to
    /config of every node. Every node is tried; the failures are reported together. A node that
    answered 429 (still loading a previous config) is left alone for its Retry-After.

    A node that goes back to its own declarative_config file (`kong reload`, a restart: seen in
    Kong 3.9.3) runs the file's targets again; `drifted` notices by the configuration hash the
    node reports, so that the daemon loads ours again without waiting for its next resync."""

    def __init__(self, nodes: Sequence[KongAdmin], declarative_file: str, upstream: str,
                 clock: Callable[[], float] = time.monotonic):
        self.nodes, self.declarative_file, self.upstream = list(nodes), declarative_file, upstream
        self.name = f"kong-declarative {declarative_file}"
        self._clock = clock
        self._busy_until: dict[str, float] = {}  # node url -> when its Retry-After ends
        self._loaded: dict[str, str] = {}  # node url -> configuration hash it reported after our load

    def render(self, members: Sequence[Member]) -> dict:
        """The user's declarative config, re-read each time, with only this upstream's targets replaced."""
        try:
            doc, upstreams = read_declarative(self.declarative_file)
        except (OSError, yaml.YAMLError, ValueError) as err:
            # the file is ours to read, not Kong's answer; the daemon logs, counts and retries it
            raise UpstreamError(f"cannot use {self.declarative_file}: {err}", target=self.declarative_file) from None
        upstream = next((u for u in upstreams if u.get("name") == self.upstream), None)
        if upstream is None:  # created as ensure_upstream does; one in the file is the user's
            upstream = new_upstream(self.upstream)
            upstreams.append(upstream)
        upstream["targets"] = [{"target": m.name, "weight": m.weight} for m in sorted(members)]
        return doc

    def apply(self, members: Sequence[Member]) -> None:
        doc = self.render(members)
        failures = []
        for node in self.nodes:
            wait = self._busy_until.get(node.url, 0.0) - self._clock()
            if wait > 0:
                failures.append(f"{node.url}: loading a previous configuration, next try in {wait:.1f} s")
                continue
            try:
                if node.post_config(doc):
                    log.info("loaded %d targets into %s", len(members), node.url)
                self._remember_hash(node)
            except KongBusy as err:
                self._busy_until[node.url] = self._clock() + err.retry_after
                failures.append(str(err))
            except UpstreamError as err:
                failures.append(str(err))
        if failures:
            raise UpstreamError("; ".join(failures))


    def _remember_hash(self, node: KongAdmin) -> None:
        try:
            loaded = node.configuration_hash()
        except UpstreamError:
            loaded = None  # unknown: no drift check for this node until the next load
        if loaded:
            self._loaded[node.url] = loaded
        else:
            self._loaded.pop(node.url, None)

    def drifted(self) -> bool:
        """A node runs another config than the one we loaded into it (it reloaded its file). A
        node that does not answer is not drifted: the next resync or change reports it."""
        for node in self.nodes:
            ours = self._loaded.get(node.url)
            if ours is None:
                continue
            try:
                now = node.configuration_hash()
            except UpstreamError:
                continue
            if now != ours:
                log.warning("%s runs another config than the one loaded into it (kong reload or restart?): "
                            "loading it again", node.url)
                return True
        return False


class FileSdSink:
    """A Prometheus file_sd JSON file, replaced atomically (readers never see half a file).
    The plugin's `membership: file` and `pgwshard locate --nodes-file` read the same file."""

    def __init__(self, settings: FileSdSettings, known: Sequence[Member] = ()):
        """known: the configured pushgateways. Those, and every member this sink has written,
        are listed as out of the ring while they are not in it (core/file_sd.py), so that a
        reader of the file can tell a dead pushgateway from one that never existed. Like the
        daemon's `known` (pgwshard_member_in_ring), it forgets nothing until a restart."""
        self.path, self.labels = Path(settings.path), dict(settings.labels)
        self.name = f"file_sd {self.path}"
        self._seen = {m.name: m for m in known}

    def apply(self, members: Sequence[Member]) -> None:
        in_ring = {m.name for m in members}
        outside = [m for name, m in self._seen.items() if name not in in_ring]
        content = render_file_sd(members, self.labels, outside)
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # the temp file sits in the same directory so the rename is atomic (same filesystem)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
            tmp = None
            self._seen.update((m.name, m) for m in members)
        except OSError as err:
            raise UpstreamError(f"cannot write {self.path}: {err}") from None
        finally:
            if tmp is not None:  # a failed write leaves no stray temp file behind
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def sinks_from_settings(settings: Settings) -> list[Sink]:
    """The sinks the daemon's settings name: Kong (admin or declarative mode) and/or file_sd."""
    sinks: list[Sink] = []
    kong: KongSettings | None = settings.kong
    if kong and kong.mode == "admin":
        sinks.append(AdminApiSink(KongAdmin(kong.admin_url, kong.admin_token, proxy=kong.proxy), kong.upstream))
    elif kong:
        assert kong.declarative_file is not None  # required in this mode (settings.py)
        nodes = [KongAdmin(url, kong.admin_token, proxy=kong.proxy) for url in (kong.nodes or (kong.admin_url,))]
        sinks.append(DeclarativeSink(nodes, kong.declarative_file, kong.upstream))
    if settings.file_sd:
        sinks.append(FileSdSink(settings.file_sd, settings.pushgateways))
    return sinks
