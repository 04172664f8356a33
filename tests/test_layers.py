"""Layers point one way: the request path never loads the control path."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


def loaded_by(module: str) -> set[str]:
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    return set(json.loads(out))


@pytest.mark.parametrize("module", ["kong_plugin_pgwshard.plugin", "kong_plugin_pgwshard.server"])
def test_the_plugin_loads_nothing_of_the_daemon(module):
    loaded = loaded_by(module)
    forbidden = {"consul", "kong_plugin_pgwshard.daemon", "kong_plugin_pgwshard.sinks", "kong_plugin_pgwshard.rebalance",
                 "kong_plugin_pgwshard.health_consul", "kong_plugin_pgwshard.config", "prometheus_client"}
    assert not loaded & forbidden


def test_the_pure_core_loads_no_io_of_the_project():
    loaded = {m for m in loaded_by("kong_plugin_pgwshard.ring") if m.startswith("kong_plugin_pgwshard.")}
    assert loaded <= {"kong_plugin_pgwshard.ring", "kong_plugin_pgwshard.grouping", "kong_plugin_pgwshard.errors"}
