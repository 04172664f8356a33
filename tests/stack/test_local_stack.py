"""The main job (kong/openresty/local_stack.py) starts, routes the samples to their owners, stops."""
from __future__ import annotations

import subprocess
import sys

from tests.support import REPO


def test_local_stack_routes_every_sample_where_locate_says():
    result = subprocess.run([sys.executable, str(REPO / "kong/openresty/local_stack.py"), "--free-ports", "--once"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("/metrics/job/")]
    assert len(rows) == 9
    assert all(landed == owner for _, landed, owner in rows)  # exactly one instance, the owner
    assert len({owner for *_, owner in rows}) > 1  # spread over more than one pushgateway
    assert "rules loaded from monitoring/pgwshard.rules.yml" in result.stdout  # and where to look
    assert "pgwshard status --nodes-file" in result.stdout
