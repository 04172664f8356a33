"""Tombstones in SQLite (issue 21, finding 3: every DELETE rewrote and fsynced the whole JSON
tombstone file, 171 ms at 3,000 tombstones): the real pgwshard-sync, real pushgateways, a
tombstone file in the old JSON format migrated on first start, each delete a write of a few pages
made before its 202. Timing goals are in bench/tombstone_bench.py."""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
import yaml

from kong_plugin_pgwshard.core.grouping import GroupingKey
from kong_plugin_pgwshard.harness.processes import ManagedProcess, free_port, http_request, temp_dir, wait_until
from kong_plugin_pgwshard.sync.deletes import DeleteAPI, Tombstones

SQLITE_MAGIC = b"SQLite format 3\x00"
TTL = 3600.0


def old_json_file(path: str, entries: dict[GroupingKey, float]) -> None:
    """A tombstone file as pgwshard-sync wrote it before SQLite."""
    data = [{"labels": dict(k.labels), "deleted_at": at} for k, at in entries.items()]
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"tombstones": data}, f)


def fleet_key(n: int) -> GroupingKey:
    return GroupingKey.from_labels({"job": "batch", "instance": f"host-{n:06d}"})


def start_sync(work: str, pgws, tombstones: str, port: int) -> ManagedProcess:
    config = f"{work}/pgwshard.yml"
    with open(config, "w") as f:
        yaml.safe_dump({"pushgateways": [p.address for p in pgws],
                        "health": {"source": "probes", "probes": {"interval": "0.2s", "timeout": "1s",
                                                                  "rise": 1, "fall": 1}},
                        "membership": {"hold_down": "0.5s"},
                        "file_sd": {"path": f"{work}/sd.json"},
                        "rebalance": {"enabled": False},
                        "metrics": {"listen": "127.0.0.1:0"},
                        "deletes": {"listen": f"127.0.0.1:{port}", "tombstone_file": tombstones,
                                    "tombstone_ttl": f"{int(TTL)}s"}}, f)
    sync = ManagedProcess("pgwshard-sync", [sys.executable, "-m", "kong_plugin_pgwshard.sync.daemon",
                                            "--config", config]).start()
    wait_until(lambda: _answers(port) or not sync.running, 30, what="the delete API listening")
    assert sync.running, sync.log()
    return sync


def _answers(port: int) -> bool:
    try:
        return http_request(f"http://127.0.0.1:{port}/-/healthy", timeout=1)[0] == 200
    except OSError:
        return False


def held(pgw) -> set[str]:
    return {str(GroupingKey.from_labels(g["labels"])) for g in pgw.groups()}


def written_bytes(pid: int) -> int:
    """Bytes the process has written with write(2) and friends, files and sockets alike."""
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


def test_an_old_json_tombstone_file_is_migrated_on_first_start(pushgateways):
    """A pushgateway holding a copy that a tombstone of the old file covers loses it before it
    joins; the file is SQLite afterwards, the expired tombstone gone, the JSON kept beside it."""
    pgw = pushgateways(1)[0]
    deleted, kept = fleet_key(1), fleet_key(2)
    for key in (deleted, kept):
        assert http_request(pgw.url + key.path(), "PUT", b"batch_done 1\n", timeout=10)[0] == 200
    work = temp_dir("pgwshard-tombstones-")
    path = f"{work}/tombstones.json"
    now = time.time() + 1  # after the pushes: the delete covers them
    old_json_file(path, {deleted: now, fleet_key(3): now - TTL - 60, **{fleet_key(n): now for n in range(10, 1010)}})
    port = free_port()
    sync = start_sync(work, [pgw], path, port)
    try:
        wait_until(lambda: str(deleted) not in held(pgw), 15, what="the migrated tombstone applied")
        assert str(kept) in held(pgw)
    finally:
        sync.stop()
    with open(path, "rb") as f:
        assert f.read(16) == SQLITE_MAGIC
    assert json.load(open(f"{path}.json-before-sqlite"))["tombstones"][0]["labels"] == dict(deleted.labels)
    store = Tombstones(path, TTL)
    assert store.deleted_at(deleted) is not None and store.deleted_at(fleet_key(3)) is None
    assert len(store) == 1001


def test_each_delete_writes_a_few_pages_and_is_stored_before_its_202(pushgateways):
    """With 20,000 tombstones the old store rewrote a 1.6 MB file per delete (~80 MB for 50);
    now each delete appends its pages to the write-ahead log. SIGKILL right after a 202: the
    tombstone is there when pgwshard-sync starts again."""
    pgw = pushgateways(1)[0]
    work = temp_dir("pgwshard-tombstones-")
    path = f"{work}/tombstones.json"
    now = time.time()
    old_json_file(path, {fleet_key(n): now for n in range(20_000)})
    port = free_port()
    sync = start_sync(work, [pgw], path, port)
    fresh = [GroupingKey.from_labels({"job": "fresh", "instance": f"i{n}"}) for n in range(50)]
    try:
        assert sync.proc is not None
        before = written_bytes(sync.proc.pid)
        for key in fresh:
            assert http_request(f"http://127.0.0.1:{port}{key.path()}", "DELETE", timeout=10)[0] == 202
        written = written_bytes(sync.proc.pid) - before
        last = GroupingKey.from_labels({"job": "fresh", "instance": "last"})
        assert http_request(f"http://127.0.0.1:{port}{last.path()}", "DELETE", timeout=10)[0] == 202
        os.killpg(sync.proc.pid, signal.SIGKILL)
    finally:
        sync.stop()
    print(f"50 deletes at 20,000 tombstones wrote {written / 1024:.0f} KiB")
    assert written < 16 * 1024 * 1024
    store = Tombstones(path, TTL)
    assert all(store.deleted_at(k) is not None for k in [*fresh, last])
    assert len(store) == 20_051


def test_a_delete_that_cannot_be_recorded_is_not_acknowledged(tmp_path):
    """A full disk (SQLite's page limit stands in for it): 503, and nothing is deleted."""
    store = Tombstones(str(tmp_path / "t.db"), ttl=60)
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    api = DeleteAPI("127.0.0.1:0", store, lambda: [])
    for n in range(200):  # until the pages are full: the first ones may fit
        status = api.delete(f"/metrics/job/a{n}")[0]
        if status != 202:
            break
    assert status == 503
    assert store.deleted_at(GroupingKey.from_labels({"job": f"a{n}"})) is None
    api.server.server_close()


def test_a_tombstone_store_that_cannot_be_opened_stops_pgwshard_sync_at_start(tmp_path):
    with pytest.raises(OSError, match="tombstone"):
        Tombstones(str(tmp_path / "missing-dir" / "t.db"), ttl=60)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(OSError, match="bad.json"):
        Tombstones(str(tmp_path / "bad.json"), ttl=60)


def test_expired_tombstones_leave_the_store(tmp_path):
    """TTL expiry as before, and the rows really go: at start, and a few with each delete."""
    now = [1000.0]
    path = str(tmp_path / "t.db")
    store = Tombstones(path, ttl=60, clock=lambda: now[0])
    for n in range(100):
        store.record(fleet_key(n))
    now[0] += 61
    assert store.deleted_at(fleet_key(0)) is None and len(store) == 0
    store.record(fleet_key(1000))  # removes up to 64 expired rows besides
    rows = store._db.execute("SELECT count(*) FROM tombstones").fetchone()[0]
    assert 1 < rows <= 100 - 64 + 1
    store.close()
    again = Tombstones(path, ttl=60, clock=lambda: now[0])  # the rest at start
    assert again._db.execute("SELECT count(*) FROM tombstones").fetchone()[0] == 1
    assert again.deleted_at(fleet_key(1000)) == 1061.0
