"""kong/kong.conf and kong/kong.yml match the plugin server exactly."""
from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from kong_plugin_pgwshard.plugin.config import PluginConfig

KONG = Path(__file__).resolve().parents[2] / "kong"


def kong_conf() -> dict[str, str]:
    lines = (KONG / "kong.conf").read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if "=" in line and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def test_kong_conf_names_the_plugin_server_as_it_runs():
    conf = kong_conf()
    scripts = tomllib.loads((KONG.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert "pgwshard" in conf["plugins"].split(",")
    assert conf["pluginserver_names"] == "pgwshard"
    start = conf["pluginserver_pgwshard_start_cmd"].split()
    query = conf["pluginserver_pgwshard_query_cmd"].split()
    assert Path(start[0]).name == Path(query[0]).name == "pgwshard-plugin" and "pgwshard-plugin" in scripts
    prefix = start[start.index("-p") + 1]
    # the query holds the socket the server claims: the same prefix (README, "Kong starting, ...")
    assert query[1:] == ["--dump", "--hold-socket", "-p", prefix]
    # kong-pdk's dedicated server listens on <prefix>/<name>.sock
    assert conf["pluginserver_pgwshard_socket"] == f"{prefix.rstrip('/')}/pgwshard.sock"
    dump = subprocess.run([sys.executable, "-m", "kong_plugin_pgwshard.plugin.start", "--dump"],
                          capture_output=True, text=True, check=True, timeout=30).stdout
    assert json.loads(dump)[0]["Name"] == conf["pluginserver_names"]


def test_kong_yml_plugin_config_is_valid_and_routes_through_a_hostname():
    doc = yaml.safe_load((KONG / "kong.yml").read_text())
    assert doc["_format_version"] == "3.0"
    (service,) = doc["services"]
    with pytest.raises(ValueError):
        ipaddress.ip_address(service["host"])  # set_target fails in Kong when the service host is an IP
    assert service["host"] in {u["name"] for u in doc["upstreams"]}
    (plugin,) = service["plugins"]
    config = PluginConfig.from_kong(plugin["config"])
    assert config.membership == "upstream" and config.upstream == service["host"]

