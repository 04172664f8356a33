"""Layers point one way, as the package's folders say.

    core       push path -> grouping key -> owner; pure: imports nothing of the project above it
    clients    Kong Admin/Status API, pushgateways: core and errors only
    plugin     the Kong edge: core and clients, never pgwshard-sync or the rebalancer
    rebalance  core and clients
    sync       pgwshard-sync: core, clients, rebalance
    cli        core, clients, rebalance, host (`pgwshard host render|run`)
    host       the nginx + Lua host's files: nothing of the project
    harness    real processes for the local stack, benches and tests: anything but the tests

Read from the source (every import, also those inside functions), and for the plugin server
also from what a running interpreter loads.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

PACKAGE = "kong_plugin_pgwshard"
ALLOWED = {
    "core": {"core"},
    "clients": {"core"},
    "plugin": {"core", "clients"},
    "rebalance": {"core", "clients"},
    "sync": {"core", "clients", "rebalance"},
    "cli": {"core", "clients", "rebalance", "host"},
    "host": set(),
    "harness": {"core", "clients", "plugin", "rebalance", "sync", "cli", "host"},
}
SHARED = {"errors", ""}  # errors.py and the package's own __init__ (version, public names)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import x`
    return found


def _layer(module: str) -> str:
    rest = module.removeprefix(PACKAGE).lstrip(".")
    return rest.split(".")[0]


SOURCES = sorted((REPO / PACKAGE).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_each_module_imports_only_the_layers_below_it(path):
    here = _layer(_module_name(path))
    if here in SHARED:
        return
    allowed = ALLOWED[here] | SHARED | {here}
    reached = {_layer(m) for m in _imports(path) if m == PACKAGE or m.startswith(PACKAGE + ".")}
    # `from .. import __version__` reads as a layer named after the imported name: count it as shared
    reached = {layer if layer in ALLOWED or layer in SHARED else "" for layer in reached}
    assert reached <= allowed, f"{here} imports {sorted(reached - allowed)}"


def test_every_folder_of_the_package_has_a_layer():
    folders = {p.name for p in (REPO / PACKAGE).iterdir() if p.is_dir() and not p.name.startswith("__")}
    modules = {p.stem for p in (REPO / PACKAGE).glob("*.py")} - {"__init__"}
    assert folders | modules <= set(ALLOWED) | SHARED


def test_nothing_outside_the_tests_imports_them():
    outside = [p for p in REPO.rglob("*.py")
               if not {"tests", ".venv", "build"} & set(p.relative_to(REPO).parts)]
    assert outside, "no sources found"
    leaning = [str(p.relative_to(REPO)) for p in outside
               if any(m == "tests" or m.startswith("tests.") for m in _imports(p))]
    assert not leaning


def _loaded_by(module: str) -> set[str]:
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    return set(json.loads(out))


@pytest.mark.parametrize("module", [f"{PACKAGE}.plugin.handler", f"{PACKAGE}.plugin.server"])
def test_the_plugin_server_loads_nothing_of_the_control_path(module):
    loaded = _loaded_by(module)
    ours = {m for m in loaded if m.startswith(PACKAGE + ".")}
    assert not {m for m in ours if _layer(m) in {"sync", "rebalance", "cli", "harness"}}
    assert not loaded & {"consul", "prometheus_client", "yaml"}


def test_the_pure_core_loads_no_io_of_the_project():
    loaded = {m for m in _loaded_by(f"{PACKAGE}.core.ring") if m.startswith(PACKAGE + ".")}
    assert {_layer(m) for m in loaded} <= {"core", "errors"}


def test_the_plugin_servers_entry_point_binds_before_loading_anything_slow():
    """pgwshard-plugin's socket must exist before the slow imports (plugin/start.py): Kong
    answers 500 to a request whose StartInstance finds no socket. Importing the entry point
    loads nothing beyond the standard library and this package's own start module."""
    loaded = _loaded_by(f"{PACKAGE}.plugin.start")
    ours = {m for m in loaded if m.startswith(PACKAGE)}
    assert ours == {PACKAGE, f"{PACKAGE}.plugin", f"{PACKAGE}.plugin.start", f"{PACKAGE}.plugin.listener"}
    assert not loaded & {"kong_pdk", "msgpack", "requests", "uhashring", "greenlet", "yaml", "urllib3"}
