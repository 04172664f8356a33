"""The package as a user installs it: `pip install .` (not editable) into a fresh virtualenv."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kong_plugin_pgwshard.harness.processes import temp_dir
from tests.support import REPO


@pytest.fixture(scope="session")
def installed_venv() -> Path:
    """A fresh virtualenv with pgwshard installed from a copy of the checkout (pip builds in the
    source tree: the copy keeps build/ out of it). Readable by nginx workers, as /opt would be."""
    base = Path(temp_dir("pgwshard-installed-"))
    os.chmod(base, 0o755)
    source = base / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run([str(venv / "bin/pip"), "install", "-q", str(source)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    shutil.rmtree(source)  # from here on, only the installed package exists
    return venv
