""".ci/build-consul.sh run twice at once (two helpers, two CI jobs sharing a cache): both used
to build into the same `consul.tmp`, so one run's rename took the other's file away or left a
half-written binary. A stand-in `go` holds both builds at the same moment and writes slowly."""
from __future__ import annotations

import os
import subprocess

from tests.support import REPO

FAKE_GO = r"""#!/usr/bin/env bash
set -e
[ "$1" = build ] || exit 0   # go mod tidy
while [ "$1" != -o ]; do shift; done
out="$2"
touch "$BARRIER/$$"
for _ in $(seq 100); do [ "$(ls "$BARRIER" | wc -l)" -ge 2 ] && break; sleep 0.1; done
for part in 1 2 3 4 5; do printf 'part %s of a consul binary\n' "$part" >> "$out"; sleep 0.1; done
"""


def test_two_concurrent_builds_both_succeed_with_one_whole_binary(tmp_path):
    bin_dir, barrier, cache = tmp_path / "bin", tmp_path / "barrier", tmp_path / "cache"
    bin_dir.mkdir()
    barrier.mkdir()
    (bin_dir / "go").write_text(FAKE_GO)
    (bin_dir / "go").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PGWSHARD_CACHE": str(cache),
           "BARRIER": str(barrier), "CONSUL_VERSION": "v0.0.0-test"}
    runs = [subprocess.Popen(["bash", str(REPO / ".ci/build-consul.sh")], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(60), *run.communicate()) for run in runs]

    binary = cache / "consul-v0.0.0-test" / "consul"
    for code, out, err in results:
        assert code == 0, err
        assert out.strip() == str(binary)
    assert len(list(barrier.iterdir())) == 2  # both really built at once
    assert binary.read_text() == "".join(f"part {n} of a consul binary\n" for n in range(1, 6))
    assert os.access(binary, os.X_OK)
    assert sorted(p.name for p in binary.parent.iterdir()) == ["consul"]  # no temporary file left
