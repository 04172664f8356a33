"""The main job, run as README tells a user to: `bash kong/openresty/local-stack.sh` from a fresh
clone makes its own virtualenv with the package alone (no test extras), starts the stack, routes
the samples to their owners, and (--once) stops; without --once every pointer it prints works
while it is up. Nothing it prints is a traceback or a warning.

The clone is of this checkout's HEAD with its uncommitted changes to tracked files applied, so
that the test checks the code being worked on."""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from kong_plugin_pgwshard.harness.processes import http_get, temp_dir, wait_until
from tests.support import REPO

NOISE = re.compile(r"Traceback|Warning|WARNING|warn\(|DEPRECAT", re.IGNORECASE)
URL = re.compile(r"https?://[^\s,)]+")


@pytest.fixture(scope="module")
def clone():
    """A fresh clone, the environment local-stack.sh runs in, and a place for its venv.
    One venv for the module: the first run installs, the next reuse it."""
    work = Path(temp_dir("pgwshard-main-job-"))
    checkout = work / "pgwshard"
    subprocess.run(["git", "clone", "-q", str(REPO), str(checkout)], check=True, timeout=120)
    diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=REPO, capture_output=True, check=True,
                          timeout=60).stdout
    if diff:
        subprocess.run(["git", "apply", "--whitespace=nowarn"], cwd=checkout, input=diff, check=True, timeout=60)
    # The Debian packages are installed here: the script must not reach for apt-get or sudo.
    fake_bin = work / "bin"
    fake_bin.mkdir()
    for tool in ("apt-get", "sudo"):
        (fake_bin / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {work}/called\nexit 1\n")
        (fake_bin / tool).chmod(0o755)
    env = {"PATH": f"{fake_bin}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": os.environ.get("HOME", "/root"),
           "PGWSHARD_VENV": str(work / "venv")}
    for name in ("PIP_FIND_LINKS", "PIP_CERT", "PIP_DEFAULT_TIMEOUT", "PIP_INDEX_URL", "HTTPS_PROXY", "https_proxy"):
        if name in os.environ:  # how this machine reaches packages, nothing of pgwshard's
            env[name] = os.environ[name]
    # an existing venv whose pip was upgraded, as .ci/run leaves .venv: current pip shows the
    # build backend's warnings (setuptools' editable-install banner was one)
    subprocess.run(["python3", "-m", "venv", env["PGWSHARD_VENV"]], check=True, timeout=120)
    subprocess.run([env["PGWSHARD_VENV"] + "/bin/pip", "install", "-q", "--upgrade", "pip"], env=env, check=True,
                   capture_output=True, timeout=300)
    yield checkout, env, work


def assert_quiet(text: str) -> None:
    noisy = [line for line in text.splitlines() if NOISE.search(line)]
    assert not noisy, "\n".join(noisy[:20])


@pytest.mark.timeout(900)
def test_readme_main_command_routes_every_sample_where_locate_says_without_test_extras(clone):
    checkout, env, work = clone
    result = subprocess.run(["bash", "kong/openresty/local-stack.sh", "--free-ports", "--once"], cwd=checkout,
                            env=env, capture_output=True, text=True, timeout=800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (work / "called").exists(), (work / "called").read_text()

    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("/metrics/job/")]
    assert len(rows) == 9
    assert all(landed == owner for _, landed, owner in rows)  # exactly one instance, the owner
    assert len({owner for *_, owner in rows}) > 1  # spread over more than one pushgateway
    # the stack has stopped: no address, file or command that would no longer work is printed
    assert not URL.search(result.stdout) and "pgwshard status" not in result.stdout, result.stdout
    assert_quiet(result.stdout + result.stderr)  # pip's install included
    # the stack ran without the test extras: nothing of it can have imported pytest
    probe = subprocess.run([env["PGWSHARD_VENV"] + "/bin/python", "-c", "import pytest"], capture_output=True,
                           timeout=60)
    assert probe.returncode != 0


def pointer_lines(stdout: str) -> list[str]:
    """The lines between the routing table and "The stack is up": where to look."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("/metrics/job/")) + 1
    end = next(i for i, line in enumerate(lines) if line.startswith("The stack is up"))
    return [line for line in lines[start:end] if line.strip()]


@pytest.mark.timeout(900)
def test_every_pointer_of_the_running_stack_works_as_printed(clone):
    checkout, env, work = clone
    out_path = work / "stack.out"
    with open(out_path, "w") as out:
        stack = subprocess.Popen(["bash", "kong/openresty/local-stack.sh", "--free-ports"], cwd=checkout, env=env,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: stack.poll() is not None or "The stack is up" in out_path.read_text(), 600,
                   interval=0.5, what="the stack to come up")
        assert stack.poll() is None, out_path.read_text()[-3000:]
        pointers = pointer_lines(out_path.read_text())
        printed = "\n".join(pointers)
        for label in ("gateway", "prometheus", "alerts", "dashboard", "config", "logs", "status", "plan", "delete"):
            assert any(line.startswith(label + " ") for line in pointers), f"no {label} pointer:\n{printed}"

        values = [line.split(None, 1)[1] if not line.startswith("pgwshard-sync metrics") else line for line in pointers]
        commands = [v.split("  (")[0] for v in values if _is_command(v)]
        others = [v for v in values if not _is_command(v)]

        urls = [url for v in others for url in URL.findall(v) if "<" not in url]  # not the push template
        assert len(urls) >= 8, printed
        for url in urls:  # the UI pages of the Prometheus it runs, metrics, pushgateways, the gateway
            assert http_get(url, timeout=10)[0] == 200, url
        paths = [Path(token.rstrip(")")) for v in others for token in v.split() if token.startswith("/")]
        assert len(paths) >= 4, printed
        for path in paths:  # the config, the membership file, the logs, the dashboard
            assert path.exists(), (path, printed)

        assert len(commands) >= 4, printed
        for command in commands:  # as printed: no activated venv, the PATH of a new shell
            run = subprocess.run(shlex.split(command), env={"PATH": "/usr/bin:/bin", "HOME": env["HOME"]},
                                 capture_output=True, text=True, timeout=60)
            assert run.returncode == 0, (command, run.stdout[-2000:], run.stderr[-2000:])
            assert_quiet(run.stdout + run.stderr)

        logs = Path(next(line for line in pointers if line.startswith("logs ")).split()[1])
        assert {p.name for p in logs.iterdir()} >= {"pgwshard-sync.log", "plugin-server.log", "nginx-host.log"}
        config = Path(next(line for line in pointers if line.startswith("config ")).split()[1])
        assert "deletes" in config.read_text()  # README "Deletes": DELETEs go through pgwshard-sync
    finally:
        if stack.poll() is None:
            os.killpg(stack.pid, signal.SIGINT)  # Ctrl-C
        code = stack.wait(60)
    output = out_path.read_text()
    assert code == 0, output[-3000:]
    assert_quiet(output)


def _is_command(value: str) -> bool:
    """A printed command: an executable named by its absolute path, or curl."""
    first = Path(value.split()[0])
    return value.startswith("curl ") or (first.is_absolute() and first.is_file() and os.access(first, os.X_OK))


def test_a_busy_port_is_one_line_naming_it(clone):
    """A second stack on the default ports ended after 23 s in a bare TimeoutError traceback."""
    checkout, env, _ = clone
    python = Path(env["PGWSHARD_VENV"]) / "bin/python"
    if not python.exists():
        pytest.skip("the venv is made by the main command's test")
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            holder.bind(("127.0.0.1", 19091))  # pushgateway 1's default
            holder.listen()
        except OSError:
            pass  # something else holds it already: as busy
        run = subprocess.run([str(python), "kong/openresty/local_stack.py"], cwd=checkout, env=env,
                             capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and not run.stdout
    [line] = run.stderr.splitlines()
    assert re.fullmatch(r"local-stack: port \d+ \(.+\) is in use: .*--free-ports.*", line), line
