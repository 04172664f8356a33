"""The plugin's schema and every shipped plugin config pass our reading of Kong 3.9.3's schema
rules (kong_schema_rules.py: rule tests, no Kong). Real Kong shows the same in tests/kong/:
test_kong_dbless.py starts on the dumped schema and the shipped kong.yml, takes docker/kong.yml,
and refuses bad plugin configs with the plugin's own field names.

Kong validates the `Schema` of `pgwshard-plugin --dump` when it starts (a rejected schema stops
Kong) and every plugin config against it; kong_schema_rules.py states those rules from Kong's
source. deck 1.4's `validate` knows no custom plugin schema (and accepts port 99999999 or protocol
`gopher`): it proves nothing here, so no test leans on it.
"""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kong_plugin_pgwshard.errors import ConfigError
from kong_plugin_pgwshard.plugin.config import PluginConfig
from tests.plugin.kong_schema_rules import config_errors, schema_errors
from tests.support import REPO


@pytest.fixture(scope="module")
def schema() -> dict:
    """The schema Kong reads: the real plugin server's `--dump` (kong.conf's query_cmd)."""
    out = subprocess.run([sys.executable, "-m", "kong_plugin_pgwshard.plugin.start", "--dump"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    (info,) = json.loads(out)
    return info["Schema"]


def _config_field(schema: dict, name: str) -> dict:
    (config,) = [f["config"] for f in schema["fields"] if "config" in f]
    (field,) = [f[name] for f in config["fields"] if name in f]
    return field


def test_the_dumped_schema_passes_the_metaschema_rules(schema):
    assert schema_errors(schema) == []


def test_the_rules_reject_a_string_defaulting_to_empty_without_len_min(schema):
    """The schema as it was: Kong refused it ("length must be at least 1") and did not start."""
    old = copy.deepcopy(schema)
    del _config_field(old, "route_prefix")["len_min"]
    assert schema_errors(old) == ["config.route_prefix.default: length must be at least 1"]


@pytest.mark.parametrize("change, error", [
    (lambda f: f.update(pattern="^/"), "config.route_prefix.pattern: unknown field"),
    (lambda f: f.update(description="short"), "config.route_prefix.description: length must be at least 10"),
    (lambda f: f.update(between=[0, 1]), "field of type 'string' cannot have attribute 'between'"),
    (lambda f: f.update(default=7), "config.route_prefix.default: expected a string"),
    (lambda f: f.update(one_of=["/a"]), "config.route_prefix.default: expected one of: /a"),
    (lambda f: f.update(type="text"), "config.route_prefix.type: expected one of"),
    (lambda f: f.pop("type"), "config.route_prefix: missing type declaration"),
    (lambda f: f.update(referenceable="yes"), "config.route_prefix.referenceable: expected a boolean"),
])
def test_the_rules_reject_what_kongs_metaschema_rejects(schema, change, error):
    bad = copy.deepcopy(schema)
    change(_config_field(bad, "route_prefix"))
    assert any(e.startswith(error) or error in e for e in schema_errors(bad)), schema_errors(bad)


def test_the_rules_reject_fields_a_plugin_schema_may_not_add_or_retype(schema):
    bad = copy.deepcopy(schema)
    bad["fields"].append({"upstream": {"type": "string"}})
    bad["fields"][1]["protocols"]["type"] = "array"
    errors = schema_errors(bad)
    assert "error in definition of 'pgwshard': upstream: cannot create a new field" in errors
    assert "error in definition of 'pgwshard': protocols: cannot change type in a specialized field" in errors
    nodes = _config_field(bad, "nodes")
    del nodes["elements"]
    assert "config.nodes: field of type 'array' must declare 'elements'" in schema_errors(bad)


def _plugin_entities(node):
    """Every pgwshard plugin entity in a declarative document: top level, services, routes."""
    if isinstance(node, dict):
        if node.get("name") == "pgwshard" and "config" in node:
            yield node
        for value in node.values():
            yield from _plugin_entities(value)
    elif isinstance(node, list):
        for value in node:
            yield from _plugin_entities(value)


def _yaml_blocks(markdown: Path):
    for block in re.findall(r"```ya?ml\n(.*?)```", markdown.read_text(), re.S):
        yield yaml.safe_load(block)


def _shipped_configs():
    found = []
    for path in sorted([*REPO.glob("kong/*.yml"), *REPO.glob("docker/**/*.yml")]):
        for doc in yaml.safe_load_all(path.read_text()):
            found += [(f"{path.relative_to(REPO)}", p) for p in _plugin_entities(doc)]
    for path in sorted([REPO / "README.md", *REPO.glob("docker/*.md"), *REPO.glob("kong/**/*.md")]):
        for i, doc in enumerate(_yaml_blocks(path)):
            found += [(f"{path.relative_to(REPO)} yaml block {i + 1}", p) for p in _plugin_entities(doc)]
    return found


SHIPPED = _shipped_configs()


def test_the_shipped_files_hold_plugin_configs():
    sources = {source for source, _ in SHIPPED}
    assert {"kong/kong.yml", "docker/kong.yml"} <= sources


@pytest.mark.parametrize("source, plugin", SHIPPED, ids=[s for s, _ in SHIPPED])
def test_every_shipped_plugin_config_passes_the_schema_rules_and_the_plugin(schema, source, plugin):
    assert config_errors(schema, plugin["config"], plugin.get("protocols")) == []
    PluginConfig.from_kong(plugin["config"])


@pytest.mark.parametrize("config, key", [
    ({"membership": "upstream"}, "upstream"),
    ({"membership": "file"}, "membership_file"),
    ({"membership": "static"}, "nodes"),
    ({"membership": "dns", "nodes": ["a:1"]}, "membership"),
    ({"nodes": ["a:1"], "refresh_interval": 0}, "refresh_interval"),
    ({"nodes": ["a:1"], "refresh_interval": "2"}, "refresh_interval"),
    ({"nodes": ["a:1"], "upstream": ""}, "upstream"),
    ({"nodes": "a:1"}, "nodes"),
    ({"nodes": ["a:1"], "admin_url": 80}, "admin_url"),
    ({"nodes": ["a:1"], "route_prefx": "/p"}, "route_prefx"),
])
def test_the_schema_rules_and_the_plugin_refuse_the_same_configs(schema, config, key):
    """One statement of the rules: what Kong refuses, the plugin refuses too, naming the key."""
    assert any(key in e for e in config_errors(schema, config)), config_errors(schema, config)
    with pytest.raises(ConfigError, match=f"at '{re.escape(key)}'"):
        PluginConfig.from_kong(config)


@pytest.mark.parametrize("config", [
    {"nodes": ["a:1"], "route_prefix": ""},
    {"nodes": ["a:1"], "route_prefix": "/pgw"},
    {"membership": "upstream", "upstream": "pushgateways", "admin_token": "{vault://env/kong-admin-token}"},
    {"membership": "file", "membership_file": "/etc/pgw.json", "refresh_interval": 0.5},
])
def test_the_schema_rules_and_the_plugin_accept_the_same_configs(schema, config):
    assert config_errors(schema, config) == []
    PluginConfig.from_kong(config)
