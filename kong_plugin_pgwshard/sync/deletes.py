"""Deletes that stick: pgwshard-sync takes every client DELETE and remembers it.

Why here and not on the request path: a DELETE that reaches only the group's current owner is
undone when another instance comes back holding an older copy (an owner that was down, with its
persistence file): nothing in Pushgateway records that a group was deleted. So the gateway sends
DELETE on push paths to this API (kong.yml routes them by method), which

1. records a tombstone (the group, the time of the delete) in `deletes.tombstone_file`, an SQLite
   database, committed and fsynced before anything is acknowledged, so it survives a restart of
   pgwshard-sync (and a power loss);
2. deletes the group on every known pushgateway that answers (the owner and any stale copy);
3. answers 202, as Pushgateway does.

A tombstone covers copies whose client push is not newer than the delete: a push after the
delete brings the group back, as it would on a single Pushgateway. The daemon applies tombstones
to a pushgateway before it (re)joins the ring, and the rebalancer deletes covered copies instead
of moving them. Tombstones expire after `deletes.tombstone_ttl` (an instance away for longer
than that may bring its old copy back). Times are this host's clock against the pushgateways'
push_time_seconds: keep clocks in sync (NTP), a skew of s seconds blurs the order of a push and
a delete less than s apart.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..clients.pushgateway import PushgatewayClient
from ..core.grouping import GroupingKey, bad_push_path_message, parse_push_path
from ..errors import GroupingKeyError, UpstreamError
from ..rebalance.rebalancer import client_push_time

log = logging.getLogger(__name__)


# SQLite's first 16 bytes; a tombstone file without them is the JSON of earlier releases.
_SQLITE_MAGIC = b"SQLite format 3\x00"
# Expired tombstones a delete removes besides recording its own: bounded, so a delete stays O(1)
# (the whole backlog goes at start, when an old store is opened).
_EXPIRE_PER_RECORD = 64
# Connections kept to each pushgateway, for deletes running at once (more are opened and closed).
_KEPT_CONNECTIONS = 16
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tombstones (
    key TEXT PRIMARY KEY,        -- str(GroupingKey): the canonical label set
    labels TEXT NOT NULL,        -- the same as JSON, for people reading the store
    deleted_at REAL NOT NULL     -- this host's clock, seconds since the epoch
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tombstones_by_time ON tombstones (deleted_at);
"""


class Tombstones:
    """Deleted groups with the time of their delete, in an SQLite database (path None: in memory).

    One delete is one small transaction: its row and index entries appended to the write-ahead
    log and fsynced, whatever the number of tombstones (the JSON file of earlier releases was
    rewritten whole, 171 ms at 3,000). A lookup is an index search. An old JSON file at `path`
    is migrated on first start (README "Deletes")."""

    def __init__(self, path: str | None, ttl: float, clock: Callable[[], float] = time.time):
        self.path, self.ttl, self._clock = path, ttl, clock
        # Two connections, each behind its lock: deletes write through one, lookups (the
        # rebalancer's, the daemon's) read through the other and, in WAL mode, never wait for a
        # write's fsync. In memory there is one database, so one connection.
        self._lock, self._read_lock = threading.Lock(), threading.Lock()
        try:
            if path:
                _migrate_json(path, ttl, clock)
            self._db = _connect(path or ":memory:")
            with self._db:
                self._db.execute("DELETE FROM tombstones WHERE deleted_at <= ?", (clock() - ttl,))
            self._reader = _connect(path) if path else self._db
            if not path:
                self._read_lock = self._lock
        except sqlite3.Error as err:
            # Starting without them would undo acknowledged deletes: refuse to start instead.
            raise OSError(f"cannot open the tombstone store {path}: {err}") from None
        if path:
            _fsync_dir(path)  # the database and its write-ahead log exist from here on

    def record(self, key: GroupingKey) -> float:
        """Remember that key was deleted now; returns that time. Raises OSError if it cannot be
        stored durably (then nothing may be acknowledged)."""
        with self._lock:
            at = self._clock()
            try:
                with self._db:  # one transaction: committed (WAL fsynced) or rolled back
                    self._db.execute(
                        "INSERT INTO tombstones (key, labels, deleted_at) VALUES (?, ?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET deleted_at = max(deleted_at, excluded.deleted_at)",
                        (str(key), json.dumps(dict(key.labels)), at))
                    self._db.execute(
                        "DELETE FROM tombstones WHERE key IN (SELECT key FROM tombstones "
                        "WHERE deleted_at <= ? ORDER BY deleted_at LIMIT ?)", (at - self.ttl, _EXPIRE_PER_RECORD))
            except sqlite3.Error as err:
                raise OSError(f"cannot store the tombstone of {key}: {err}") from None
            return at

    def deleted_at(self, key: GroupingKey) -> float | None:
        with self._read_lock:
            row = self._reader.execute("SELECT deleted_at FROM tombstones WHERE key = ?", (str(key),)).fetchone()
        return row[0] if row is not None and row[0] > self._clock() - self.ttl else None

    def covers(self, key: GroupingKey, pushed_at: float) -> bool:
        """True when a copy pushed at pushed_at was deleted afterwards."""
        at = self.deleted_at(key)
        return at is not None and pushed_at <= at

    def __len__(self) -> int:
        """Tombstones in force (an index range count)."""
        with self._read_lock:
            return self._reader.execute("SELECT count(*) FROM tombstones WHERE deleted_at > ?",
                                        (self._clock() - self.ttl,)).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            if self._reader is not self._db:
                with self._read_lock:
                    self._reader.close()
            self._db.close()


def _connect(path: str, wal: bool = True) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False)
    if wal:
        db.execute("PRAGMA journal_mode = WAL")
    # Durability: each tombstone must be on disk before its 202. In WAL mode synchronous=NORMAL
    # fsyncs the log only at checkpoints, so a power loss could drop deletes already answered
    # 202; FULL fsyncs the log at every commit. The cost is one fsync of an append of a few
    # pages per delete, the same whatever the number of tombstones.
    db.execute("PRAGMA synchronous = FULL")
    db.executescript(_SCHEMA)
    return db


def _migrate_json(path: str, ttl: float, clock: Callable[[], float]) -> None:
    """Turn a tombstone file in the JSON format of earlier releases into the SQLite store, in
    place; the JSON stays beside it as `<path>.json-before-sqlite`. Crash-safe: the database is
    built and fsynced under another name and renamed over the JSON file (until then a restart
    migrates again)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
    except FileNotFoundError:
        return
    except OSError as err:
        raise OSError(f"cannot read the tombstone file {path}: {err}") from None
    if head == _SQLITE_MAGIC or head == b"":
        return
    entries = _read_json(path)
    horizon = clock() - ttl
    building = f"{path}.migrating"
    for leftover in (building, f"{building}-journal"):
        if os.path.exists(leftover):
            os.unlink(leftover)
    db = _connect(building, wal=False)  # a rollback journal: the file is whole once committed
    try:
        with db:
            db.executemany(
                "INSERT INTO tombstones (key, labels, deleted_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET deleted_at = max(deleted_at, excluded.deleted_at)",
                [(str(k), json.dumps(dict(k.labels)), at) for k, at in entries.items() if at > horizon])
    finally:
        db.close()
    backup = f"{path}.json-before-sqlite"
    shutil.copyfile(path, backup)
    with open(backup, "rb") as f:
        os.fsync(f.fileno())
    os.replace(building, path)
    _fsync_dir(path)
    log.info("migrated %d tombstone(s) from the JSON file %s to SQLite (the JSON kept as %s)",
             sum(at > horizon for at in entries.values()), path, backup)


def _read_json(path: str) -> dict[GroupingKey, float]:
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)["tombstones"]
        return {GroupingKey.from_labels(e["labels"]): float(e["deleted_at"]) for e in entries}
    except (OSError, ValueError, KeyError, TypeError, GroupingKeyError) as err:
        # Starting without them would undo acknowledged deletes: refuse to start instead.
        raise OSError(f"cannot read the tombstone file {path}: {err}") from None


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def apply_tombstones(client: PushgatewayClient, tombstones: Tombstones) -> int:
    """Delete from one pushgateway every group a tombstone covers; returns how many.
    Raises UpstreamError when the instance cannot be listed or a delete fails."""
    deleted = 0
    for group in client.groups():
        if tombstones.covers(group.key, client_push_time(group)):
            client.delete_group(group.key)
            deleted += 1
    return deleted


class DeleteAPI:
    """The HTTP endpoint the gateway sends DELETE on push paths to (`deletes.listen`)."""

    def __init__(self, listen: str, tombstones: Tombstones, instances: Callable[[], Iterable[str]],
                 route_prefix: str = "", timeout: float = 2.0):
        host, _, port = listen.rpartition(":")
        self.tombstones, self.instances = tombstones, instances
        self.route_prefix, self.timeout = route_prefix, timeout
        self._clients: dict[str, PushgatewayClient] = {}
        self._clients_lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            target = b""  # the request target, byte for byte

            def parse_request(self) -> bool:
                # http.server reads the request line as Latin-1, splits it on Unicode whitespace
                # (0x85 and 0xa0 are UTF-8 continuation bytes) and collapses a leading `//`: hand
                # it a stand-in target and keep the real one as bytes, split on SP as Go does.
                raw: bytes = self.raw_requestline  # type: ignore[has-type]  # set by handle_one_request
                self.target = b""  # not the previous request's on a kept-alive connection
                words = raw.rstrip(b"\r\n").split(b" ")
                if len(words) == 3:
                    self.target = words[1]
                    self.raw_requestline = b" ".join((words[0], b"/", words[2])) + b"\r\n"
                try:
                    return super().parse_request()
                finally:
                    self.raw_requestline = raw

            def do_DELETE(self) -> None:  # noqa: N802 - http.server's naming
                # As Kong hands the raw path to the plugin (msgpack, decoded as UTF-8 with
                # surrogateescape): bytes that are not UTF-8 stay visible to parse_push_path.
                status, text = api.delete(self.target.decode("utf-8", "surrogateescape"))
                self._answer(status, text)

            def do_GET(self) -> None:  # noqa: N802
                if self.target in (b"/-/healthy", b"/-/ready"):
                    self._answer(200, "OK")
                else:
                    self._answer(405, "pgwshard: only DELETE on push paths is served here")

            do_PUT = do_POST = do_GET  # noqa: N815

            def _answer(self, status: int, text: str) -> None:
                # Errors as the gateway answers its own: JSON with a message in Pushgateway's
                # wording; a 202 has no body, as Pushgateway's.
                if status >= 400:
                    body, kind = (json.dumps({"message": text}) + "\n").encode("utf-8"), "application/json"
                else:
                    body, kind = (text + "\n" if text else "").encode("utf-8"), "text/plain; charset=utf-8"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass  # one line per delete is logged by api.delete

        self.server = ThreadingHTTPServer((host.strip("[]") or "0.0.0.0", int(port)), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="pgwshard-deletes", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> DeleteAPI:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        with self._clients_lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    def _clients_for(self, names: list[str]) -> dict[str, PushgatewayClient]:
        """One kept client per known instance. One no longer known is dropped, not closed: a
        delete may still be using it (its connections close when the last user lets it go)."""
        with self._clients_lock:
            for gone in set(self._clients) - set(names):
                del self._clients[gone]
            for name in names:
                if name not in self._clients:
                    self._clients[name] = PushgatewayClient(name, timeout=self.timeout, pool_size=_KEPT_CONNECTIONS)
            return dict(self._clients)

    def delete(self, path: str) -> tuple[int, str]:
        """Record the tombstone, delete everywhere; (status, message) as the gateway would answer.
        path: the raw request target as the gateway's plugin gets it (UTF-8, surrogateescape)."""
        try:
            key = parse_push_path(path, self.route_prefix)
        except GroupingKeyError as err:
            return 400, bad_push_path_message(err)
        if key is None:
            return 404, "pgwshard: not a push path"
        try:
            self.tombstones.record(key)
        except OSError as err:
            log.error("delete of %s refused: the tombstone could not be stored: %s", key, err)
            return 503, "pgwshard: the delete could not be recorded; nothing was deleted"
        # Every instance at once, over kept connections: a delete waits for the slowest
        # instance, not for the sum of them (nor for a new connection to each). A thread per
        # instance of this delete, not a shared pool: a hung instance holds up this delete for
        # its timeouts, never the deletes queued behind it.
        names = sorted(set(self.instances()))
        clients = self._clients_for(names)
        failed: list[str] = []

        def delete_on(name: str) -> None:
            try:
                clients[name].delete_group(key)
            except UpstreamError as err:
                failed.append(name)  # the tombstone deletes it before that instance rejoins
                log.debug("%s", err)

        helpers = [threading.Thread(target=delete_on, args=(name,), name="pgwshard-delete", daemon=True)
                   for name in names[1:]]
        for helper in helpers:
            helper.start()
        if names:
            delete_on(names[0])
        for helper in helpers:
            helper.join()
        failed.sort()
        log.info("deleted %s%s", key, f" (later on {','.join(failed)})" if failed else "")
        return 202, ""
