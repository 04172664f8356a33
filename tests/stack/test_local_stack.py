"""The main job, run as README tells a user to: `bash kong/openresty/local-stack.sh` makes its own
virtualenv with the package alone (no test extras), starts the stack, routes the samples to their
owners, and (--once) stops."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from kong_plugin_pgwshard.harness.processes import temp_dir
from tests.support import REPO


def test_readme_main_command_routes_every_sample_where_locate_says_without_test_extras():
    work = Path(temp_dir("pgwshard-main-job-"))
    venv = work / "venv"
    # The Debian packages are installed here: the script must not reach for apt-get or sudo.
    fake_bin = work / "bin"
    fake_bin.mkdir()
    for tool in ("apt-get", "sudo"):
        (fake_bin / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {work}/called\nexit 1\n")
        (fake_bin / tool).chmod(0o755)
    env = {"PATH": f"{fake_bin}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": os.environ.get("HOME", "/root"),
           "PGWSHARD_VENV": str(venv)}
    for name in ("PIP_FIND_LINKS", "PIP_CERT", "PIP_DEFAULT_TIMEOUT", "PIP_INDEX_URL", "HTTPS_PROXY", "https_proxy"):
        if name in os.environ:  # how this machine reaches packages, nothing of pgwshard's
            env[name] = os.environ[name]
    result = subprocess.run(["bash", "kong/openresty/local-stack.sh", "--free-ports", "--once"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (work / "called").exists(), (work / "called").read_text()

    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("/metrics/job/")]
    assert len(rows) == 9
    assert all(landed == owner for _, landed, owner in rows)  # exactly one instance, the owner
    assert len({owner for *_, owner in rows}) > 1  # spread over more than one pushgateway
    assert "rules loaded from monitoring/pgwshard.rules.yml" in result.stdout  # and where to look
    assert "pgwshard status --nodes-file" in result.stdout
    # the stack ran without the test extras: nothing of it can have imported pytest
    probe = subprocess.run([str(venv / "bin/python"), "-c", "import pytest"], capture_output=True, timeout=60)
    assert probe.returncode != 0
