"""The main job with Kong as its gateway (`local-stack.sh --gateway kong`, here its Python entry
with the same flags, in this virtualenv): a DB-less Kong node from the shipped kong.conf lines and
kong.yml, pgwshard-sync writing its /config, the samples routed to their owners through Kong."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.kong.conftest import kong_bin  # noqa: F401 (the fixture)
from tests.support import REPO

STACK = [sys.executable, "kong/openresty/local_stack.py", "--gateway", "kong", "--free-ports", "--once"]


@pytest.mark.kong
def test_the_main_job_with_kong_routes_every_sample_through_kong_to_its_owner(kong_bin):  # noqa: F811
    env = {**os.environ, "PGWSHARD_KONG": kong_bin}
    result = subprocess.run(STACK, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("/metrics/job/")]
    assert len(rows) == 9
    assert all(landed == owner for _, landed, owner in rows)  # exactly one instance, the owner
    assert len({owner for *_, owner in rows}) > 1  # spread over more than one pushgateway
    assert "http://" not in result.stdout  # --once: no pointer to a stack that has stopped


def test_the_main_job_without_kong_says_in_one_line_how_to_get_it(tmp_path):
    env = {**os.environ, "PGWSHARD_KONG": str(tmp_path / "no-kong"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(STACK, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stdout == ""  # nothing started
    (line,) = result.stderr.strip().splitlines()
    assert "PGWSHARD_KONG" in line and "build-kong.sh" in line
