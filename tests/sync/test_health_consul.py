"""The Consul source against a real agent: passing instances only, blocking queries, index
reset, backoff while Consul is unreachable."""
from __future__ import annotations

import json
import threading
import time
import urllib.request

from kong_plugin_pgwshard.core.ring import Member
from kong_plugin_pgwshard.harness.processes import free_port
from kong_plugin_pgwshard.sync.health.consul import ConsulHealth, consul_client
from kong_plugin_pgwshard.sync.settings import ConsulSettings


def put(consul, path: str, body: dict | None = None) -> None:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(consul.url + path, data=data, method="PUT")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def register(consul, sid: str, port: int, tags=(), passing: bool = True) -> None:
    """A pushgateway entry whose health the test sets by hand (a TTL check)."""
    put(consul, "/v1/agent/service/register", {
        "ID": sid, "Name": "pushgateway", "Address": "127.0.0.1", "Port": port, "Tags": list(tags),
        "Check": {"CheckID": f"{sid}-ttl", "TTL": "60s"}})
    put(consul, f"/v1/agent/check/{'pass' if passing else 'fail'}/{sid}-ttl")


def test_only_passing_instances_and_changes_arrive_by_blocking_query(consul, stop):
    register(consul, "pgw-a", 9101)
    register(consul, "pgw-b", 9102, passing=False)
    source = ConsulHealth(ConsulSettings(address=consul.url, wait=10.0))
    snapshots = source.watch(stop)
    first = next(snapshots)
    assert first.members == {Member("127.0.0.1", 9101)}
    assert isinstance(source.index, int) and source.index > 0

    timer = threading.Timer(0.5, put, (consul, "/v1/agent/check/pass/pgw-b-ttl"))
    timer.start()
    try:
        # Queries block on the index until the check turns passing. Consul may also answer one
        # with nothing changed (its agent syncing to the catalog, say): a few such answers are
        # fine, a poll every 0.1 s would give about five before the change.
        unchanged = 0
        second = next(snapshots)
        while second.members == first.members and unchanged < 3:
            unchanged += 1
            second = next(snapshots)
    finally:
        timer.cancel()
        timer.join()
    assert second.members == {Member("127.0.0.1", 9101), Member("127.0.0.1", 9102)}
    assert unchanged <= 2
    assert second.query_seconds < 10.0  # answered by the change, not by the wait running out


def test_tag_filter(consul, stop):
    register(consul, "pgw-a", 9101, tags=["shard"])
    register(consul, "pgw-b", 9102, tags=["other"])
    source = ConsulHealth(ConsulSettings(address=consul.url, tag="shard", wait=1.0))
    assert next(source.watch(stop)).members == {Member("127.0.0.1", 9101)}


def test_index_going_backwards_starts_over(consul, stop):
    register(consul, "pgw-a", 9101)
    source = ConsulHealth(ConsulSettings(address=consul.url, wait=1.0))
    source.index = 10**12  # as if Consul's state was restored to an older snapshot
    snapshots = source.watch(stop)
    assert next(snapshots).members == {Member("127.0.0.1", 9101)}
    assert source.index == 0  # reset, so the next query does not block on an index that never comes
    started = time.monotonic()
    assert next(snapshots).members == {Member("127.0.0.1", 9101)}
    assert source.index > 0 and time.monotonic() - started < 0.9


def test_unreachable_consul_is_an_error_with_backoff_not_an_empty_set(stop):
    settings = ConsulSettings(address=f"http://127.0.0.1:{free_port()}", backoff=(0.2, 0.5), token="secret-tok")
    source = ConsulHealth(settings)
    snapshots = source.watch(stop)
    seen = []
    for _ in range(4):
        snapshot = next(snapshots)
        seen.append((time.monotonic(), snapshot))
    assert all(s.members is None and s.error.startswith("consul ") for _, s in seen)
    assert all("secret-tok" not in s.error for _, s in seen)
    gaps = [later[0] - earlier[0] for earlier, later in zip(seen, seen[1:], strict=False)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.5 and gaps[2] >= 0.5  # the schedule, then its last step


def test_the_files_token_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-env")
    assert consul_client(ConsulSettings(token="from-file")).token == "from-file"
