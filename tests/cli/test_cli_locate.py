"""`pgwshard locate` and the plugin agree on every owner."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kong_plugin_pgwshard.harness.kong_rpc import KongRPC, Request, run_access

NODES = ["127.0.0.1:9301", "127.0.0.1:9302", "127.0.0.1:9303", "127.0.0.1:9304"]
PATHS = [v["path"] for v in json.loads((Path(__file__).parents[1] / "vectors/grouping.json").read_text())]
PATHS += [f"/metrics/job/bench/instance/i{i}" for i in range(100)]


def locate(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kong_plugin_pgwshard.cli", "locate", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_locate_and_the_plugin_agree(plugin_server_factory):
    result = locate("--nodes", ",".join(NODES), *PATHS)
    assert result.returncode == 1  # some vectors are bad paths
    lines = dict(line.split("\t", 1) for line in result.stdout.splitlines())

    server = plugin_server_factory()
    rpc = KongRPC(server.socket_path)
    iid = rpc.start_instance("pgwshard", {"nodes": NODES})
    for path in PATHS:
        req = run_access(rpc, iid, Request(path))
        printed = lines[path]
        if req.target:
            assert printed.endswith("\t" + "%s:%d" % req.target), path
        elif req.exit:
            assert req.exit[0] == 400 and printed.startswith("error: "), path
            assert printed.removeprefix("error: ") in req.exit[1]["message"]
        else:
            assert printed.startswith("not a push path"), path
    rpc.close()


def test_locate_reads_a_file_sd_membership(tmp_path):
    sd = tmp_path / "members.json"
    sd.write_text(json.dumps([{"targets": NODES[:2], "labels": {}}, {"targets": NODES[2:]}]))
    by_file = locate("--nodes-file", str(sd), "/metrics/job/x")
    by_list = locate("--nodes", ",".join(NODES), "/metrics/job/x")
    assert by_file.returncode == 0 and by_file.stdout == by_list.stdout


def test_locate_without_members_names_the_options_that_give_them(tmp_path):
    # nothing named: the message says how to name members, not that none is healthy
    result = locate("/metrics/job/x", env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1 and not result.stdout
    assert all(option in result.stderr for option in ("--nodes ", "--nodes-file", "--config", "PGWSHARD_NODES"))
    # a file that lists no member in the ring: then no pushgateway is there to own the push
    sd = tmp_path / "members.json"
    sd.write_text(json.dumps([{"targets": []}]))
    result = locate("--nodes-file", str(sd), "/metrics/job/x")
    assert result.returncode == 1 and "no healthy pushgateway" in result.stdout


def test_locate_takes_pgwshard_sync_config(tmp_path):
    sd = tmp_path / "members.json"
    sd.write_text(json.dumps([{"targets": NODES}]))
    config = tmp_path / "pgwshard.yml"
    config.write_text(json.dumps({"pushgateways": NODES, "file_sd": {"path": str(sd)}}))
    by_config = locate("--config", str(config), *PATHS[-5:])
    assert by_config.returncode == 0, by_config.stderr
    assert by_config.stdout == locate("--nodes", ",".join(NODES), *PATHS[-5:]).stdout


def test_locate_takes_members_from_the_environment_and_a_prefix():
    env = {"PATH": "/usr/bin:/bin", "PGWSHARD_NODES": ",".join(NODES)}
    by_env = locate("--prefix", "/pgw", "/pgw/metrics/job/x/instance/a", "/metrics/job/x", env=env)
    by_list = locate("--nodes", ",".join(NODES), "/metrics/job/x/instance/a")
    assert by_env.returncode == 0, by_env.stderr
    first, second = by_env.stdout.splitlines()
    assert first.split("\t")[1:] == by_list.stdout.strip().split("\t")[1:]
    assert first.split("\t")[1] == '{instance="a",job="x"}'
    assert "not a push path" in second  # outside the prefix: not ours to route


def test_a_bad_path_is_reported_and_the_others_still_located():
    result = locate("--nodes", ",".join(NODES), "/metrics/job/x/__bad/1", "/metrics/job/y")
    bad, good = result.stdout.splitlines()
    assert result.returncode == 1
    assert bad == '/metrics/job/x/__bad/1\terror: improper label name "__bad"'
    assert good.startswith('/metrics/job/y\t{job="y"}\t127.0.0.1:930')


def test_bad_membership_is_a_clear_error():
    result = locate("--nodes", "127.0.0.1", "/metrics/job/x")
    assert result.returncode == 1 and "expected host:port" in result.stderr


def test_locate_honours_weights_from_nodes_and_from_the_file():
    weighted = [f"{NODES[0]}=0", f"{NODES[1]}=300", NODES[2], NODES[3]]
    by_nodes = locate("--nodes", ",".join(weighted), *PATHS[-100:])
    owners = {line.split("\t")[2] for line in by_nodes.stdout.splitlines()}
    assert by_nodes.returncode == 0 and NODES[0] not in owners and owners == set(NODES[1:])
    unweighted = locate("--nodes", ",".join(NODES[1:]), *PATHS[-100:])
    assert by_nodes.stdout != unweighted.stdout  # weight 300 takes more than its equal share


def test_locate_reads_the_weights_pgwshard_sync_writes(tmp_path):
    from kong_plugin_pgwshard.core.file_sd import render_file_sd
    from kong_plugin_pgwshard.core.members import Member

    weighted = [f"{NODES[0]}=0", f"{NODES[1]}=300", NODES[2], NODES[3]]
    sd = tmp_path / "members.json"
    sd.write_text(render_file_sd([Member.parse_weighted(n) for n in weighted], {}))
    by_file = locate("--nodes-file", str(sd), *PATHS[-100:])
    by_nodes = locate("--nodes", ",".join(weighted), *PATHS[-100:])
    assert by_file.returncode == 0 and by_file.stdout == by_nodes.stdout


def test_a_bad_weight_is_a_clear_error():
    result = locate("--nodes", f"{NODES[0]}=heavy", "/metrics/job/x")
    assert result.returncode == 1 and "host:port=weight" in result.stderr
