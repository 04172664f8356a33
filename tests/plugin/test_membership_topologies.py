"""`membership: upstream` in each Kong topology, with the plugin server started as Kong starts it.

Kong spawns the plugin server from nginx worker 0 (kong/runloop/plugin_servers/process.lua), and
nginx workers keep only TZ and the variables named by `env` directives: the server starts with an
emptied environment. DB-less nodes and hybrid data planes serve no writable Admin API (a data
plane none at all); their Status API serves the upstreams' GET routes (kong/status/init.lua).
"""
from __future__ import annotations

import pytest

from kong_plugin_pgwshard.harness.kong_rpc import KongRPC, Request, run_access
from kong_plugin_pgwshard.harness.processes import PluginServer, wait_until
from kong_plugin_pgwshard.plugin.config import PluginConfig

A, B = "127.0.0.1:9401", "127.0.0.1:9402"
KONG_ENV = {"TZ": "UTC"}  # what an nginx worker passes on without `env` directives
TOKEN = "s3cret-adm1n-t0ken"
# What Kong 3.9.3 adds to the config it sends (kong/runloop/plugins_iterator.lua get_plugin_config)
# and, for a resolved {vault://...} reference, the reference itself (kong/db/schema/init.lua).
KONG_KEYS = {"route_id": "7f3c0d1e-0000-4000-8000-000000000001", "service_id": None, "consumer_id": None,
             "plugin_instance_name": None, "__plugin_id": "b1a0c0de-0000-4000-8000-000000000002",
             "__ws_id": "0dc4d3a3-0000-4000-8000-000000000003", "__key__": "plugins:pgwshard:...", "__seq__": 7}


@pytest.fixture
def kong_spawned_server(request):
    """The real pgwshard-plugin with the environment Kong's worker 0 gives it."""
    server = PluginServer()
    server.env = dict(KONG_ENV)
    request.addfinalizer(server.stop)
    server.start()
    rpc = KongRPC(server.socket_path)
    request.addfinalizer(rpc.close)
    return server, rpc


def owners(rpc, iid, n=20) -> set:
    return {run_access(rpc, iid, Request(f"/metrics/job/j/i/{i}")).target for i in range(n)}


def config(url: str, **extra) -> dict:
    return {**KONG_KEYS, "membership": "upstream", "upstream": "pushgateways", "admin_url": url,
            "admin_token": None, "refresh_interval": 0.2, **extra}


def test_the_token_in_the_plugin_config_authenticates_a_server_spawned_as_kong_does(kong_spawned_server, kong_admin):
    server, rpc = kong_spawned_server
    kong = kong_admin(token=TOKEN)  # RBAC (Kong Enterprise) or a proxy: OSS Kong checks no token
    kong.add_upstream("pushgateways", [A])
    # as Kong sends a resolved {vault://env/kong-admin-token}: the value, and the reference in $refs
    iid = rpc.start_instance("pgwshard", config(kong.url, admin_token=TOKEN,
                                                **{"$refs": {"admin_token": "{vault://env/kong-admin-token}"}}))
    assert owners(rpc, iid) == {("127.0.0.1", 9401)}
    kong.add_target("pushgateways", B)
    wait_until(lambda: owners(rpc, iid) == {("127.0.0.1", 9401), ("127.0.0.1", 9402)}, 10, what="B joins")
    assert kong.requests and all(h.get("Kong-Admin-Token") == TOKEN for _, _, h in kong.requests)
    assert TOKEN not in server.log()


def test_without_the_field_or_nginx_main_env_the_token_never_reaches_the_server(kong_spawned_server, kong_admin,
                                                                                 monkeypatch):
    server, rpc = kong_spawned_server
    monkeypatch.setenv("KONG_ADMIN_TOKEN", TOKEN)  # Kong's own environment has it; its workers drop it
    kong = kong_admin(token=TOKEN)
    kong.add_upstream("pushgateways", [A])
    iid = rpc.start_instance("pgwshard", config(kong.url))
    assert owners(rpc, iid, 3) == {None}  # no members: every push answered 503
    assert run_access(rpc, iid, Request("/metrics/job/j")).exit[0] == 503
    wait_until(lambda: "401" in server.log(), 10, what="the refused read in the log")
    assert all("Kong-Admin-Token" not in h for _, _, h in kong.requests)


def test_a_data_plane_follows_the_upstream_through_its_status_api(kong_spawned_server, kong_admin):
    server, rpc = kong_spawned_server
    status = kong_admin(status_api=True)  # serves reads only, no token, no /upstreams route
    # what the control plane (or the DB-less node's /config) gave the node, IPv6 spelled by Kong
    status.load_config({"_format_version": "3.0", "upstreams": [
        {"name": "pushgateways", "targets": [{"target": A}, {"target": "[::1]:9403", "weight": 0}]}]})
    iid = rpc.start_instance("pgwshard", config(status.url))
    assert owners(rpc, iid) == {("127.0.0.1", 9401)}  # weight 0 owns nothing
    status.load_config({"_format_version": "3.0", "upstreams": [
        {"name": "pushgateways", "targets": [{"target": A}, {"target": B}]}]})  # the next config
    wait_until(lambda: owners(rpc, iid) == {("127.0.0.1", 9401), ("127.0.0.1", 9402)}, 10, what="B joins")
    # the plugin asked for nothing the Status API does not serve (/status: the configuration hash)
    assert {(m, p.split("?")[0]) for m, p, _ in status.requests} == {("GET", "/upstreams/pushgateways/targets"),
                                                                     ("GET", "/status")}
    assert "read failed" not in server.log()


def test_the_token_stays_out_of_reprs_and_errors():
    conf = PluginConfig.from_kong(config("http://127.0.0.1:8007", admin_token=TOKEN))
    assert conf.admin_token == TOKEN and TOKEN not in repr(conf)
    from kong_plugin_pgwshard.errors import ConfigError
    with pytest.raises(ConfigError, match="admin_token") as err:
        PluginConfig.from_kong(config("http://127.0.0.1:8007", admin_token=12345678))
    assert "12345678" not in str(err.value)


def _topologies_section() -> str:
    from tests.support import REPO
    text = (REPO / "README.md").read_text()
    return text.split("## Kong topologies", 1)[1].split("\n## ", 1)[0]


def test_the_readme_topologies_give_kong_conf_lines_and_pgwshard_yml_that_hold():
    import yaml

    from kong_plugin_pgwshard.sync.settings import parse_settings
    from tests.plugin.test_kong_config import kong_conf
    from tests.support import REPO

    section = _topologies_section()
    plugin_lines = section.split("The plugin lines, on every node:", 1)[1].split("\n\n")[1]
    push_lines = section.split("Also on every proxying node", 1)[1].split("\n\n")[1]
    said = dict(line.strip().split(" = ", 1) for line in [*plugin_lines.splitlines(), *push_lines.splitlines()])
    conf = kong_conf()
    assert said == conf  # every line kong/kong.conf sets
    blocks = section.split("```yaml\n")[1:]
    assert len(blocks) == 2  # DB mode (hybrid: the same with the CP's url) and DB-less
    for block in blocks:
        doc = yaml.safe_load(block.split("```", 1)[0])
        doc["kong"]["declarative_file"] = doc["kong"].get("declarative_file") and "kong/kong.yml"
        settings = parse_settings({"pushgateways": ["127.0.0.1:9091"], "health": {"source": "probes"}, **doc},
                                  "README.md", environ={})
        assert settings.kong.upstream == "pushgateways"
    # the Status API the plugin is told to read is Kong's default status_listen, as kong.conf says
    # (kong/templates/kong_defaults.lua: status_listen = 127.0.0.1:8007)
    assert "#status_listen = 127.0.0.1:8007" in (REPO / "kong" / "kong.conf").read_text()
    assert "status_listen = 127.0.0.1:8007" in section and "http://127.0.0.1:8007" in section


def test_the_dumped_schema_lets_kong_resolve_a_vault_reference_in_admin_token():
    import json
    import subprocess
    import sys

    dump = subprocess.run([sys.executable, "-m", "kong_plugin_pgwshard.plugin.start", "--dump"],
                          capture_output=True, text=True, check=True, timeout=30).stdout
    fields = {name: f for entry in json.loads(dump)[0]["Schema"]["fields"][0]["config"]["fields"]
              for name, f in entry.items()}
    # kong/db/schema/init.lua resolves references only in string fields marked referenceable,
    # and accepts a reference there without the field's other checks
    assert fields["admin_token"]["type"] == "string" and fields["admin_token"]["referenceable"] is True
    assert "default" not in fields["admin_token"]  # unset: null, then env KONG_ADMIN_TOKEN
