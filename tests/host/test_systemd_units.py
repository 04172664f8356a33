"""systemd/*.service: every unit is one systemd accepts, and every command it runs exists in the
installed package and takes the arguments the unit gives it."""
from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from kong_plugin_pgwshard.harness.processes import temp_dir
from tests.support import REPO

UNITS = sorted((REPO / "systemd").glob("*.service"))
INSTALL_DIR = "/opt/pgwshard"  # where the units expect the virtualenv

# How each installed command reads its arguments, run by the installed interpreter.
PARSERS = {
    "pgwshard-plugin": "from kong_plugin_pgwshard.plugin.start import parse_args as parse",
    "pgwshard": "from kong_plugin_pgwshard.cli import build_parser; parse = build_parser().parse_args",
}


def _commands(unit: Path) -> list[list[str]]:
    text = unit.read_text().replace("\\\n", " ")
    return [shlex.split(line.split("=", 1)[1]) for line in text.splitlines()
            if line.startswith(("ExecStart=", "ExecStartPre="))]


def test_there_is_a_unit_for_each_program():
    assert {u.name for u in UNITS} == {"pgwshard-plugin.service", "pgwshard-sync.service", "pgwshard-host.service"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_each_unit_runs_installed_commands_with_arguments_they_take(unit, installed_venv):
    for argv in _commands(unit):
        assert argv[0].startswith(INSTALL_DIR + "/bin/"), argv
        program = Path(argv[0]).name
        installed = installed_venv / "bin" / program
        assert installed.is_file(), f"{unit.name}: {program} is not installed by the package"
        if program == "pgwshard-sync":  # it reads its config at once: give it the example, checked
            args = [str(REPO / "kong/pgwshard.yml") if a.endswith(".yml") else a for a in argv[1:]]
            check = subprocess.run([str(installed), *dict.fromkeys([*args, "--check"])], capture_output=True,
                                   text=True, timeout=60, cwd="/")
            assert check.returncode == 0, f"{unit.name}: {shlex.join(argv)}: {check.stderr}"
            continue
        parse = subprocess.run([str(installed_venv / "bin/python"), "-c",
                                f"import sys; {PARSERS[program]}; parse(sys.argv[1:])", *argv[1:]],
                               capture_output=True, text=True, timeout=60, cwd="/")
        assert parse.returncode == 0, f"{unit.name}: {shlex.join(argv)}: {parse.stderr}"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_accepts_every_unit(installed_venv):
    units = Path(temp_dir("pgwshard-units-"))
    for unit in UNITS:
        (units / unit.name).write_text(unit.read_text().replace(INSTALL_DIR, str(installed_venv)))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *sorted(map(str, units.iterdir()))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr  # unknown keys only warn
