"""`pgwshard status` run as a user runs it, against real pushgateways with planted trouble."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from kong_plugin_pgwshard.clients.kong import KongAdmin
from kong_plugin_pgwshard.clients.pushgateway import PushgatewayClient
from kong_plugin_pgwshard.core.grouping import GroupingKey
from kong_plugin_pgwshard.core.ring import Member, Ring
from kong_plugin_pgwshard.harness.processes import free_port

KEYS = [GroupingKey.from_labels({"job": "status", "instance": f"i{n}"}) for n in range(8)]
MISPLACED = GroupingKey.from_labels({"job": "status", "instance": "misplaced"})
DUPLICATED = GroupingKey.from_labels({"job": "status", "instance": "duplicated"})
TOKEN = "kong-token-never-printed"


def pgwshard(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PGWSHARD_NODES", "KONG_ADMIN_TOKEN")}
    return subprocess.run([sys.executable, "-m", "kong_plugin_pgwshard.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**environ, **(env or {})})


def put(address: str, key: GroupingKey) -> None:
    PushgatewayClient(address).put_group(key, "items_done 1\n")


def held(address: str) -> list:
    return PushgatewayClient(address).groups()


def test_a_misplaced_and_a_duplicated_group_are_named_and_need_attention(pushgateways):
    pgws = pushgateways(3)
    ring = Ring(Member.parse(p.address) for p in pgws)
    for key in KEYS:
        put(ring.owner(key).name, key)
    owner_m, owner_d = ring.owner(MISPLACED).name, ring.owner(DUPLICATED).name
    stray_m = next(p.address for p in pgws if p.address != owner_m)
    stray_d = next(p.address for p in pgws if p.address != owner_d)
    put(stray_m, MISPLACED)  # only on a non-owner
    put(owner_d, DUPLICATED)  # on its owner and on one more
    put(stray_d, DUPLICATED)
    nodes = ",".join(p.address for p in pgws)

    run = pgwshard("status", "--nodes", nodes, "--json")

    assert run.returncode == 1, run.stderr
    report = json.loads(run.stdout)
    assert report["misplaced"] == [{"group": str(MISPLACED), "on": [stray_m], "owner": owner_m}]
    assert report["duplicated"] == [{"group": str(DUPLICATED), "on": sorted([owner_d, stray_d]), "owner": owner_d}]
    members = {m["pushgateway"]: m for m in report["members"]}
    assert set(members) == {p.address for p in pgws}
    for pgw in pgws:
        groups = held(pgw.address)
        member = members[pgw.address]
        assert (member["in_ring"], member["weight"], member["healthy"], member["error"]) == (True, 100, True, None)
        assert member["groups"] == len(groups)
        assert member["not_owned"] == sum(ring.owner(g.key).name != pgw.address for g in groups)
        pushes = [g.push_time for g in groups]  # the ring may give one member none of these keys
        assert (member["newest_push"], member["oldest_push"]) == ((max(pushes), min(pushes)) if pushes
                                                                  else (None, None))

    table = pgwshard("status", "--nodes", nodes)

    assert table.returncode == 1
    assert f"groups not on their owner (1):\n  {MISPLACED}  on {stray_m}  owner {owner_m}" in table.stdout
    assert "duplicated groups (1):" in table.stdout and str(DUPLICATED) in table.stdout
    assert "needs attention: 1 group not on its owner" in table.stdout
    assert "needs attention: 1 duplicated group" in table.stdout


def test_every_group_on_its_owner_once_is_all_well(pushgateways, tmp_path):
    pgws = pushgateways(2)
    ring = Ring(Member.parse(p.address) for p in pgws)
    for key in KEYS:
        put(ring.owner(key).name, key)
    members = tmp_path / "members.json"
    members.write_text(json.dumps([{"targets": [p.address for p in pgws], "labels": {}}]))

    run = pgwshard("status", "--nodes-file", str(members))

    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == f"ring from --nodes-file {members}"
    rows = {line.split()[0]: line.split() for line in lines[2:4]}
    for pgw in pgws:
        count = sum(ring.owner(k).name == pgw.address for k in KEYS)
        assert rows[pgw.address][1:6] == ["yes", "100", "healthy", str(count), "0"]
    assert lines[-1] == "all well: every group on its owner, once"


def test_config_with_file_sd_shows_a_configured_pushgateway_that_is_down(pushgateways, tmp_path):
    pgws = pushgateways(2)
    down = f"127.0.0.1:{free_port()}"  # configured, nothing listens: out of the ring
    sd = tmp_path / "members.json"
    sd.write_text(json.dumps([{"targets": [p.address for p in pgws], "labels": {}}]))
    config = tmp_path / "pgwshard.yml"
    config.write_text(json.dumps({"pushgateways": [p.address for p in pgws] + [down],
                                  "file_sd": {"path": str(sd)}, "rebalance": {"interval": "1m"}}))

    run = pgwshard("status", "--config", str(config), "--json", "--timeout", "1")

    assert run.returncode == 1, run.stderr
    report = json.loads(run.stdout)
    assert report["ring_source"] == f"file_sd {sd}"
    gone = next(m for m in report["members"] if m["pushgateway"] == down)
    assert (gone["in_ring"], gone["healthy"], gone["groups"]) == (False, False, None) and gone["error"]
    assert any(item.startswith(f"{down} (not in the ring) cannot be listed") for item in report["attention"])


def test_config_with_kong_reads_the_targets_and_their_weights(pushgateways, kong_admin, tmp_path):
    pgws = pushgateways(2)
    kong = kong_admin(token=TOKEN)
    admin = KongAdmin(kong.url, TOKEN)
    admin.ensure_upstream("pushgateways")
    admin.add_target("pushgateways", pgws[0].address, 100)
    admin.add_target("pushgateways", pgws[1].address, 0)
    put(pgws[1].address, KEYS[0])  # weight 0 owns nothing: this group belongs to pgws[0]
    config = tmp_path / "pgwshard.yml"
    config.write_text(json.dumps({"pushgateways": [p.address for p in pgws],
                                  "kong": {"admin_url": kong.url, "upstream": "pushgateways"}}))

    run = pgwshard("status", "--config", str(config), "--json", env={"KONG_ADMIN_TOKEN": TOKEN})

    assert run.returncode == 1, run.stderr
    report = json.loads(run.stdout)
    assert report["ring_source"] == f"Kong upstream pushgateways at {kong.url}"
    assert {m["pushgateway"]: m["weight"] for m in report["members"]} == {pgws[0].address: 100, pgws[1].address: 0}
    assert report["misplaced"] == [{"group": str(KEYS[0]), "on": [pgws[1].address], "owner": pgws[0].address}]
    assert TOKEN not in run.stdout + run.stderr


def test_config_with_weighted_pushgateways_and_the_file_pgwshard_sync_writes(pushgateways, tmp_path):
    """`{address, weight}` entries (pgwshard.yml's weights) were read as strings: status exited
    with "expected host:port"; the file's weights were lost (every member weighed 100)."""
    from kong_plugin_pgwshard.core.file_sd import render_file_sd

    pgws = pushgateways(2)
    members = [Member.parse(pgws[0].address), Member.parse(pgws[1].address, 0)]
    sd = tmp_path / "members.json"
    sd.write_text(render_file_sd(members, {}))
    put(pgws[1].address, KEYS[0])  # held by the drained one: misplaced
    config = tmp_path / "pgwshard.yml"
    config.write_text(json.dumps({"pushgateways": [pgws[0].address, {"address": pgws[1].address, "weight": 0}],
                                  "file_sd": {"path": str(sd)}}))

    run = pgwshard("status", "--config", str(config), "--json")

    assert run.returncode == 1, run.stderr
    report = json.loads(run.stdout)
    assert {m["pushgateway"]: m["in_ring"] for m in report["members"]} == {pgws[0].address: True,
                                                                            pgws[1].address: False}
    assert report["misplaced"] == [{"group": str(KEYS[0]), "on": [pgws[1].address], "owner": pgws[0].address}]


def test_a_config_that_cannot_be_read_is_a_clear_error(tmp_path):
    nothing = pgwshard("status")
    assert nothing.returncode != 0 and "status needs the ring's members" in nothing.stderr
    missing = pgwshard("status", "--config", str(tmp_path / "nope.yml"))
    assert missing.returncode != 0 and f"pgwshard: {tmp_path / 'nope.yml'}:" in missing.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text("pushgateways: [no-port]\n")
    wrong = pgwshard("status", "--config", str(bad))
    assert wrong.returncode != 0 and "expected host:port, got 'no-port'" in wrong.stderr


def test_nodes_file_and_config_agree_on_a_pushgateway_pgwshard_sync_saw_die(pushgateways, tmp_path):
    """Issue 22: with one pushgateway killed, `status --nodes-file` listed the two live ones and
    said "all well" (exit 0) while `--config` showed the dead one (exit 1). pgwshard-sync's file
    now lists known pushgateways out of the ring, and both forms report the dead one."""
    from kong_plugin_pgwshard.harness.processes import wait_until
    from kong_plugin_pgwshard.sync.daemon import Daemon
    from kong_plugin_pgwshard.sync.settings import parse_settings
    from tests.support.daemon import file_members, running

    pgws = pushgateways(3)
    sd = tmp_path / "members.json"
    doc = {"pushgateways": [p.address for p in pgws], "file_sd": {"path": str(sd)},
           "health": {"source": "probes", "probes": {"interval": "0.2s", "timeout": "1s"}},
           "rebalance": {"enabled": False}, "metrics": {"listen": f"127.0.0.1:{free_port()}"}}
    config = tmp_path / "pgwshard.yml"
    config.write_text(json.dumps(doc))
    dead = pgws[2]
    with running(Daemon(parse_settings(doc, "test"))):
        wait_until(lambda: file_members(sd) == {p.address for p in pgws}, 20, what="all three in the file")
        dead.kill()
        wait_until(lambda: file_members(sd) == {p.address for p in pgws[:2]}, 20, what="the dead one out of the ring")

    by_file = pgwshard("status", "--nodes-file", str(sd), "--json", "--timeout", "1")
    by_config = pgwshard("status", "--config", str(config), "--json", "--timeout", "1")

    for run in (by_file, by_config):
        assert run.returncode == 1, run.stdout + run.stderr
        report = json.loads(run.stdout)
        members = {m["pushgateway"]: m for m in report["members"]}
        assert set(members) == {p.address for p in pgws}
        assert (members[dead.address]["in_ring"], members[dead.address]["error"] is not None) == (False, True)
        assert any(dead.address in item for item in report["attention"])
    table = pgwshard("status", "--nodes-file", str(sd), "--timeout", "1")
    assert "all well" not in table.stdout and f"needs attention: {dead.address}" in table.stdout


def test_a_member_that_left_the_ring_but_answers_needs_attention(pushgateways, tmp_path):
    """Seen in the ring once, out of it now (held down after flapping): not "all well"."""
    from kong_plugin_pgwshard.sync.settings import FileSdSettings
    from kong_plugin_pgwshard.sync.sinks import FileSdSink

    pgws = pushgateways(2)
    sd = tmp_path / "members.json"
    sink = FileSdSink(FileSdSettings(str(sd)))  # no configured list: it remembers what it wrote
    sink.apply([Member.parse(p.address) for p in pgws])
    sink.apply([Member.parse(pgws[0].address)])

    run = pgwshard("status", "--nodes-file", str(sd))

    assert run.returncode == 1, run.stdout
    assert f"needs attention: {pgws[1].address} is known but not in the ring" in run.stdout
    rows = {line.split()[0]: line.split() for line in run.stdout.splitlines()[2:4]}
    assert rows[pgws[1].address][:4] == [pgws[1].address, "no", "-", "healthy"]


def test_an_empty_ring_from_a_nodes_file_is_reported_not_refused(pushgateways, tmp_path):
    """It said "status needs the ring's members (--nodes, --nodes-file ...)" although one was given."""
    from kong_plugin_pgwshard.core.file_sd import render_file_sd

    [pgw] = pushgateways(1)
    sd = tmp_path / "members.json"
    sd.write_text(render_file_sd([], {}, outside=[Member.parse(pgw.address)]))

    run = pgwshard("status", "--nodes-file", str(sd))

    assert run.returncode == 1, run.stderr
    assert "needs attention: no pushgateway in the ring takes groups" in run.stdout
    assert pgw.address in run.stdout and "--nodes-file" not in run.stderr
