"""The Consul source against a real agent: passing instances only, blocking queries, index
reset, backoff while Consul is unreachable, a hung or restarted agent seen at once."""
from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
import urllib.request

from kong_plugin_pgwshard.core.ring import Member
from kong_plugin_pgwshard.harness.processes import Consul, free_port, wait_until
from kong_plugin_pgwshard.sync.daemon import Daemon
from kong_plugin_pgwshard.sync.health.consul import ConsulHealth, consul_client
from kong_plugin_pgwshard.sync.settings import ConsulSettings
from tests.support.daemon import file_members, registering_settings, running


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


def source_up(daemon) -> float | None:
    return daemon.registry.get_sample_value("pgwshard_health_source_up")


def test_a_hung_agent_is_reported_long_before_its_blocking_query_would_end(consul, pushgateways, tmp_path):
    """A SIGSTOPped agent keeps the blocking query's connection open and silent: the query alone
    would say nothing for wait x 17/16 + 5 s (37 s here). The liveness check beside it reports the
    outage (the timing, within 2 s, is bench/consul_fault_bench.py's), the ring stays, and once the
    agent resumes a change flows again."""
    pgws = pushgateways(2)
    sd = tmp_path / "sd.json"
    daemon = Daemon(registering_settings(consul, pgws, sd, wait="30s"))
    everyone = {p.address for p in pgws}
    with running(daemon):
        wait_until(lambda: file_members(sd) == everyone, 20, what="registered and passing")
        consul.proc.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: source_up(daemon) == 0, 15, what="the hung agent reported")
            assert file_members(sd) == everyone  # an agent that hangs is not "nobody is healthy"
        finally:
            consul.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: source_up(daemon) == 1, 15, what="the resumed agent followed again")
        pgws[1].kill()
        wait_until(lambda: file_members(sd) == {pgws[0].address}, 15, what="a change after the outage applied")


def test_a_restarted_agent_is_followed_as_soon_as_it_answers_whatever_the_backoff_step(consul, pushgateways, tmp_path):
    """The backoff spaces queries that fail; it must not keep the daemon from seeing an agent that
    is back. With a 60 s step the restarted agent is followed (and the pushgateways registered on
    it again) within one liveness interval of its answering."""
    pgws = pushgateways(2)
    sd = tmp_path / "sd.json"
    settings = registering_settings(consul, pgws, sd, wait="30s")
    assert settings.consul is not None
    settings = dataclasses.replace(settings, consul=dataclasses.replace(settings.consul, backoff=(0.2, 60.0)))
    daemon = Daemon(settings)
    with running(daemon):
        wait_until(lambda: len(daemon.damper._healthy) == 2, 20, what="registered and passing")
        consul.stop()
        wait_until(lambda: source_up(daemon) == 0, 15, what="the outage reported")
        # two failed queries: the next one is due in 60 s
        wait_until(lambda: daemon.registry.get_sample_value("pgwshard_health_source_errors_total") >= 2, 15,
                   what="the backoff's long step reached")
        again = Consul(http_port=consul.http_port)
        try:
            again.start()
            wait_until(lambda: source_up(daemon) == 1, 15, what="the restarted agent followed")
            wait_until(lambda: file_members(sd) == {p.address for p in pgws}, 20,
                       what="registered again, passing and in the ring")
        finally:
            again.stop()


def test_a_killed_pushgateway_leaves_before_consul_checks_it(consul, pushgateways, stop):
    """Its TTL check keeps it passing in Consul for a minute; the death watch sees its process
    end (its idle connection closed, a new one refused) and the next snapshot leaves it out."""
    pgws = pushgateways(2)
    for n, pgw in enumerate(pgws):
        register(consul, f"pgw-{n}", pgw.port)
    a, b = (Member("127.0.0.1", p.port) for p in pgws)
    source = ConsulHealth(ConsulSettings(address=consul.url, wait=10.0))
    snapshots = source.watch(stop)
    assert next(snapshots).members == {a, b}
    wait_until(lambda: source.deaths is not None and source.deaths.watching() == {a, b}, 10, what="both watched")
    pgws[1].kill()
    killed = time.monotonic()
    for snapshot in snapshots:  # an unchanged answer comes at the latest after the 10 s wait
        if snapshot.members == {a}:
            break
        assert time.monotonic() - killed < 8, "still listed after Consul's blocking wait"
    assert time.monotonic() - killed < 8
