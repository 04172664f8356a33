"""pgwshard-sync's config: every error names the key and the file; secrets stay out of reprs."""
from __future__ import annotations

import subprocess
import sys

import pytest

from kong_plugin_pgwshard.errors import ConfigError
from kong_plugin_pgwshard.sync.settings import load_settings

EXAMPLE = "kong/pgwshard.yml"


def write(tmp_path, text: str):
    path = tmp_path / "pgwshard.yml"
    path.write_text(text)
    return str(path)


def test_example_config_is_valid():
    settings = load_settings(EXAMPLE)
    assert settings.source == "consul" and settings.kong and settings.file_sd


def test_defaults(tmp_path):
    s = load_settings(write(tmp_path, "pushgateways: ['127.0.0.1:9091']\n"))
    assert s.source == "probes" and s.probes.rise == 2 and s.hold_down == 5.0 and s.kong is None


def test_metrics_on_a_port_the_system_picks(tmp_path):
    # port 0 binds a free port: what the stack tests run the daemon with
    s = load_settings(write(tmp_path, "pushgateways: ['a:1']\nmetrics: {listen: '127.0.0.1:0'}\n"))
    assert s.metrics_listen == "127.0.0.1:0"


@pytest.mark.parametrize("text, key, message", [
    ("pushgateways: ['nope']", "pushgateways[0]", "expected host:port"),
    ("pushgateways: ['a:1']\nhealth: {probes: {interval: soon}}", "health.probes.interval", "expected a duration"),
    ("pushgateways: ['a:1']\nhealth: {probes: {rise: 1.5}}", "health.probes.rise", "whole number"),
    ("pushgateways: ['a:1']\nhealth: {source: dns}", "health.source", "expected one of"),
    ("pushgateways: ['a:1']\nconsul: {wait: forever}", "consul.wait", "expected a duration"),
    ("pushgateways: ['a:1']\nconsul: {adress: x}", "consul.adress", "unknown key"),
    ("pushgateways: ['a:1']\nkong: {mode: declarative}", "kong.declarative_file", "is required"),
    ("pushgateways: ['a:1']\nkong: {mode: dbless}", "kong.mode", "expected one of"),
    ("pushgateways: ['a:1']\nfile_sd: {}", "file_sd.path", "is required"),
    ("health: {source: probes}", "pushgateways", "is required"),
    ("health: {source: consul}", "health.source", "no consul section"),
    ("pushgateways: ['a:1']\nrebalance: {max_ops_per_second: 0}", "rebalance.max_ops_per_second", "at least"),
    ("pushgateways: ['a:1']\nrebalance: {settle: soon}", "rebalance.settle", "expected a duration"),
    ("pushgateways: ['a:1']\nrebalance: {follow_up: -1}", "rebalance.follow_up", "at least"),
    ("pushgateways: ['a:1']\nconsul: {register: {deregister_after: 10s}}", "consul.register.deregister_after", "at least 60"),
    ("pushgateways: ['a:1']\nextra: 1", "extra", "unknown key"),
    ("- a\n- b", "<top>", "expected a mapping"),
    # --check passed these, and the daemon then crashed at start or at its first write
    ("pushgateways: ['a:1']\nmetrics: {listen: localhost}", "metrics.listen", "expected host:port"),
    ("pushgateways: ['a:1']\nmetrics: {listen: '127.0.0.1:99999'}", "metrics.listen", "port out of range"),
    ("pushgateways: ['a:1']\nkong: {admin_url: '127.0.0.1:8001'}", "kong.admin_url", "expected an http"),
    ("pushgateways: ['a:1']\nkong: {admin_url: 'http://:8001'}", "kong.admin_url", "no host"),
    ("pushgateways: ['a:1']\nkong: {admin_url: 'http://kong:80x1'}", "kong.admin_url", "expected an http"),
    ("pushgateways: ['a:1']\nkong: {admin_url: 'ftp://kong:8001'}", "kong.admin_url", "scheme"),
    ("pushgateways: ['a:1']\nkong: {nodes: ['http://k1:8001', 'k2:8001']}", "kong.nodes[1]", "expected an http"),
    ("pushgateways: ['a:1']\nkong: {proxy: 'proxy:3128'}", "kong.proxy", "expected an http"),
    ("pushgateways: ['a:1']\nkong: {upstream: ''}", "kong.upstream", "must not be empty"),
    ("pushgateways: ['a:1']\nkong: {mode: declarative, declarative_file: /nonexistent/kong.yml}",
     "kong.declarative_file", "cannot read"),
    ("pushgateways: ['a:1']\nconsul: {address: 'http://127.0.0.1:8500/v1'}", "consul.address", "without a path"),
    ("pushgateways: ['a:1']\nconsul: {address: '127.0.0.1:8500'}", "consul.address", "expected an http"),
    ("pushgateways: ['a:1']\nconsul: {tls: {ca_file: /nonexistent/ca.pem}}", "consul.tls.ca_file", "no such file"),
    ("pushgateways: ['a:1']\nconsul: {backoff: [1, soon]}", "consul.backoff[1]", "expected a duration"),
    ("pushgateways: ['a:1']\nhealth: {probes: {timeout: -1}}", "health.probes.timeout", "at least"),
    ("pushgateways: ['a:1']\nfile_sd: {path: /}", "file_sd.path", "is a directory"),
    ("pushgateways: ['a:1', 'a:1']", "pushgateways[1]", "listed twice"),
    ("pushgateways: [{address: 'a:1', weight: -1}]", "pushgateways[0].weight", "at least"),
    ("pushgateways: [{address: 'a:1', weight: 70000}]", "pushgateways[0]", "weight must be 0..65535"),
    ("pushgateways: [{weight: 5}]", "pushgateways[0].address", "is required"),
    ("pushgateways: [{address: 'a:1', wieght: 5}]", "pushgateways[0].wieght", "unknown key"),
    ("pushgateways: [[a, 1]]", "pushgateways[0]", "expected host:port or"),
    ("pushgateways: ['a:1']\nlog: {level: loud}", "log.level", "expected one of"),
])
def test_errors_name_the_key_and_the_file(tmp_path, text, key, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert err.value.key == key and err.value.source == path
    assert message in str(err.value) and path in str(err.value) and repr(key) in str(err.value)


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(str(tmp_path / "missing.yml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "a: [b"))


def test_secrets_from_environment_and_never_in_repr(tmp_path):
    path = write(tmp_path, "pushgateways: ['a:1']\nconsul: {}\nkong: {}\n")
    s = load_settings(path, environ={"CONSUL_HTTP_TOKEN": "consul-secret", "KONG_ADMIN_TOKEN": "kong-secret"})
    assert s.consul.token == "consul-secret" and s.kong.admin_token == "kong-secret"
    assert "consul-secret" not in repr(s) and "kong-secret" not in repr(s)


def test_bad_config_stops_the_daemon_at_start(tmp_path):
    path = write(tmp_path, "pushgateways: ['a:1']\nmembership: {hold_down: later}\n")
    result = subprocess.run([sys.executable, "-m", "kong_plugin_pgwshard.sync.daemon", "--config", path],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "membership.hold_down" in result.stderr and path in result.stderr


def test_a_declarative_file_pgwshard_cannot_edit_is_a_config_error(tmp_path):
    kong_yml = tmp_path / "kong.yml"
    kong_yml.write_text("_format_version: '3.0'\nupstreams: [pushgateways]\n")
    path = write(tmp_path, f"pushgateways: ['a:1']\nkong: {{mode: declarative, declarative_file: {kong_yml}}}\n")
    with pytest.raises(ConfigError, match=r"upstreams\[0\]: expected a mapping with a name") as err:
        load_settings(path)
    assert err.value.key == "kong.declarative_file"


def test_weights_and_plain_addresses(tmp_path):
    s = load_settings(write(tmp_path, "pushgateways: ['a:1', {address: 'b:2', weight: 0}, {address: 'c:3'}]\n"))
    assert [(m.name, m.weight) for m in s.pushgateways] == [("a:1", 100), ("b:2", 0), ("c:3", 100)]


@pytest.mark.parametrize("text, key", [
    ("metrics: {listen: localhost}", "metrics.listen"),
    ("kong: {admin_url: 'localhost:8001'}", "kong.admin_url"),
    ("kong: {nodes: [localhost]}", "kong.nodes[0]"),
])
def test_check_refuses_what_would_crash_the_daemon(tmp_path, text, key):
    path = write(tmp_path, "pushgateways: ['127.0.0.1:9091']\n" + text + "\n")
    result = subprocess.run([sys.executable, "-m", "kong_plugin_pgwshard.sync.daemon", "--config", path, "--check"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "ok" not in result.stdout
    assert repr(key) in result.stderr and path in result.stderr and "Traceback" not in result.stderr
