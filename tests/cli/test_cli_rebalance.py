"""`pgwshard rebalance` run as a user runs it, against real pushgateways."""
from __future__ import annotations

import os
import subprocess
import sys

from kong_plugin_pgwshard.clients.pushgateway import PushgatewayClient
from kong_plugin_pgwshard.core.grouping import GroupingKey
from kong_plugin_pgwshard.core.ring import Member, Ring

KEYS = [GroupingKey.from_labels({"job": "cli", "instance": f"i{n}"}) for n in range(12)]


def pgwshard(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PGWSHARD_NODES"}
    return subprocess.run([sys.executable, "-m", "kong_plugin_pgwshard.cli", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def holdings(pgws) -> dict[str, set[GroupingKey]]:
    return {p.address: {g.key for g in PushgatewayClient(p.address).groups()} for p in pgws}


def test_dry_run_prints_the_plan_and_changes_nothing_then_a_run_applies_it(pushgateways):
    pgws = pushgateways(3)
    leaving, staying = pgws[2], pgws[:2]
    for key in KEYS:  # everything sits on the instance that leaves
        PushgatewayClient(leaving.address).put_group(key, "jobs_done_total 1\n")
    ring = Ring(Member.parse(p.address) for p in staying)
    nodes = ",".join(p.address for p in staying)
    before = holdings(pgws)

    dry = pgwshard("rebalance", "--nodes", nodes, "--instances", leaving.address, "--dry-run")

    assert dry.returncode == 0, dry.stderr
    rows = [line.split("\t") for line in dry.stdout.splitlines()]
    assert sorted((r[0], r[1], r[2], r[3]) for r in rows) == sorted(
        (str(k), leaving.address, ring.owner(k).name, "copy") for k in KEYS)
    assert holdings(pgws) == before

    run = pgwshard("rebalance", "--nodes", nodes, "--instances", leaving.address)

    assert run.returncode == 0, run.stderr
    assert f"moved={len(KEYS)} " in run.stdout and "failed=0" in run.stdout
    after = holdings(pgws)
    assert after[leaving.address] == set()
    assert all(k in after[ring.owner(k).name] for k in KEYS)


def test_an_unreachable_instance_is_reported_with_a_failing_status(pushgateways):
    [pgw] = pushgateways(1)
    PushgatewayClient(pgw.address).put_group(KEYS[0], "x 1\n")
    gone = "127.0.0.1:9"  # discard port: nothing listens there

    run = pgwshard("rebalance", "--nodes", pgw.address, "--instances", gone)

    assert run.returncode == 1
    assert f"unreachable={gone}" in run.stdout
    assert holdings([pgw]) == {pgw.address: {KEYS[0]}}


def test_missing_or_bad_membership_is_a_clear_error():
    empty = pgwshard("rebalance", "--nodes", "")
    assert empty.returncode != 0 and "needs the ring's members" in empty.stderr
    bad = pgwshard("rebalance", "--nodes", "127.0.0.1:1", "--instances", "no-port")
    assert bad.returncode != 0 and "pgwshard: rebalance:" in bad.stderr


def test_rebalance_drains_a_member_of_weight_zero(pushgateways):
    """`--nodes a,b=0`: b stays a ring member that owns nothing, so its groups move to a."""
    pgws = pushgateways(2)
    keep, drain = pgws
    for key in KEYS:
        PushgatewayClient(drain.address).put_group(key, "jobs_done_total 1\n")

    run = pgwshard("rebalance", "--nodes", f"{keep.address},{drain.address}=0")

    assert run.returncode == 0, run.stderr
    assert f"moved={len(KEYS)} " in run.stdout
    assert holdings(pgws) == {keep.address: set(KEYS), drain.address: set()}


def test_dry_run_takes_pgwshard_sync_config_and_says_when_nothing_moves(pushgateways, tmp_path):
    """PgwshardGroupsMisplaced tells operators to run `rebalance --config ... --dry-run`: it was
    refused (only `status` took --config), and a plan with nothing to move printed nothing."""
    import json

    pgws = pushgateways(2)
    ring = Ring(Member.parse(p.address) for p in pgws)
    for key in KEYS:
        PushgatewayClient(ring.owner(key).name).put_group(key, "jobs_done_total 1\n")
    sd = tmp_path / "members.json"
    sd.write_text(json.dumps([{"targets": [p.address for p in pgws]}]))
    config = tmp_path / "pgwshard.yml"
    config.write_text(json.dumps({"pushgateways": [p.address for p in pgws], "file_sd": {"path": str(sd)}}))

    dry = pgwshard("rebalance", "--config", str(config), "--dry-run")

    assert dry.returncode == 0, dry.stderr
    assert dry.stdout == ""  # the plan: no move
    assert "nothing to move: every group is on its owner" in dry.stderr

    stray = next(k for k in KEYS if ring.owner(k).name == pgws[0].address)
    PushgatewayClient(pgws[1].address).put_group(stray, "jobs_done_total 2\n")  # a copy on a non-owner
    dry = pgwshard("rebalance", "--config", str(config), "--dry-run")
    assert dry.returncode == 0 and dry.stdout.startswith(f"{stray}\t{pgws[1].address}\t{pgws[0].address}\t")
    assert "nothing to move" not in dry.stderr
