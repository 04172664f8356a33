"""`pgwshard-plugin --dump --hold-socket` (Kong's query_cmd): the socket exists and queues
connections before the server starts, the server claims it with what queued, and a holder
nobody claims cleans up. Real processes, as Kong's master and worker 0 run them."""
from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys

import msgpack
import pytest

from kong_plugin_pgwshard.harness.processes import ManagedProcess, proc_stat, temp_dir, wait_until
from kong_plugin_pgwshard.plugin import listener

PLUGIN = [sys.executable, "-m", "kong_plugin_pgwshard.plugin.start"]


def _alive(pid: int) -> bool:
    try:
        return proc_stat(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def _holders(prefix: str) -> list[int]:
    """pids of the holders left for prefix: processes whose command line names it with --hold-socket."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = open(f"/proc/{entry}/cmdline", "rb").read()
            except OSError:
                continue
            if b"--hold-socket" in cmd and prefix.encode() in cmd and _alive(int(entry)):
                found.append(int(entry))
    return found


def _query(prefix: str) -> subprocess.CompletedProcess:
    """The query command as Kong's master runs it: output read to its end (io.popen's
    read("*a")), so a holder that kept the pipe open would hang this."""
    return subprocess.run([*PLUGIN, "--dump", "--hold-socket", "-p", prefix], capture_output=True,
                          timeout=60, check=True)


def test_the_query_command_holds_the_socket_and_the_server_serves_what_queued_meanwhile():
    prefix = temp_dir("pgwshard-hold-")
    path = os.path.join(prefix, "pgwshard.sock")
    done = _query(prefix)
    assert json.loads(done.stdout)[0]["Name"] == "pgwshard"  # the plugin info, nothing else
    (holder,) = _holders(prefix)
    # a worker's StartInstance before any server runs: accepted and queued, not refused
    early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    early.settimeout(30)
    early.connect(path)
    early.sendall(msgpack.packb([0, 7, "plugin.NoSuchCall", []]))
    server = ManagedProcess("plugin-server", [*PLUGIN, "-p", prefix]).start()
    try:
        answer = msgpack.Unpacker()
        while True:
            chunk = early.recv(4096)
            assert chunk, "the queued connection was dropped"
            answer.feed(chunk)
            messages = list(answer)
            if messages:
                break
        assert messages[0][:2] == [1, 7]  # answered by the server that claimed the socket
        wait_until(lambda: not _alive(holder), 10, what="the holder to exit once claimed")
        assert not os.path.exists(path + listener.CLAIM_SUFFIX)
        assert os.path.exists(path)
    finally:
        early.close()
        server.stop()


def test_a_holder_nobody_claims_removes_the_socket_and_exits():
    prefix = temp_dir("pgwshard-hold-")
    path = os.path.join(prefix, "pgwshard.sock")
    code = ("import sys; from kong_plugin_pgwshard.plugin import listener; "
            "print(listener.hold(sys.argv[1], seconds=0.5))")
    holder = int(subprocess.run([sys.executable, "-c", code, path, "--hold-socket"], capture_output=True,
                                timeout=30, check=True, text=True).stdout)
    assert os.path.exists(path)
    wait_until(lambda: not _alive(holder), 10, what="the unclaimed holder to exit")
    assert not os.path.exists(path) and not os.path.exists(path + listener.CLAIM_SUFFIX)


def test_a_server_without_a_holder_binds_the_socket_itself():
    prefix = temp_dir("pgwshard-hold-")
    path = os.path.join(prefix, "pgwshard.sock")
    assert listener.claim(path) is None
    bound = listener.bind_unix(path)
    try:
        assert listener.claim(path) is None
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(path)  # the renamed socket answers at path
        probe.close()
        assert os.listdir(prefix) == ["pgwshard.sock"]  # no temporary name left behind
    finally:
        bound.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a claimer as another user")
def test_another_user_cannot_claim_the_held_socket():
    prefix = temp_dir("pgwshard-hold-")  # root's: the holder keeps root's sockets
    path = os.path.join(prefix, "pgwshard.sock")
    os.chmod(prefix, 0o755)
    _query(prefix)
    try:
        nobody = pwd.getpwnam("nobody")
        code = ("import sys; from kong_plugin_pgwshard.plugin import listener; "
                "print(listener.claim(sys.argv[1]) is None)")
        done = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=30,
                              user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert done.stdout.strip() == "True", done.stderr
        assert _holders(prefix), "the holder gave up its socket to a stranger"
    finally:
        for pid in _holders(prefix):
            os.kill(pid, 9)


def test_nothing_is_held_while_kong_runs_at_the_prefix():
    """`kong reload`: the running node's server serves on; a holder would queue every new
    connection until the new server starts, seconds later."""
    prefix = temp_dir("pgwshard-hold-")
    os.makedirs(os.path.join(prefix, "pids"))
    with open(os.path.join(prefix, "pids", "nginx.pid"), "w") as f:
        f.write(f"{os.getpid()}\n")  # a live process: "Kong's master"
    _query(prefix)
    assert _holders(prefix) == []
    assert not os.path.exists(os.path.join(prefix, "pgwshard.sock"))
    with open(os.path.join(prefix, "pids", "nginx.pid"), "w") as f:
        f.write("999999999\n")  # a stale pid file: nginx exited without removing it
    _query(prefix)
    assert len(_holders(prefix)) == 1
    for pid in _holders(prefix):
        os.kill(pid, 9)
    # a stale file naming a pid taken again since (a container's nginx is pid 1 each start)
    with open(os.path.join(prefix, "pids", "nginx.pid"), "w") as f:
        f.write(f"{os.getpid()}\n")
    os.utime(os.path.join(prefix, "pids", "nginx.pid"), (1, 1))
    wait_until(lambda: not _holders(prefix), 10, what="the first holder gone")
    _query(prefix)
    assert len(_holders(prefix)) == 1
    assert os.path.exists(os.path.join(prefix, "pgwshard.sock"))
    for pid in _holders(prefix):
        os.kill(pid, 9)


def test_a_query_that_cannot_hold_the_socket_still_prints_the_plugin_info():
    """Kong refuses to start without the plugin info: a socket path it cannot bind (here
    longer than a unix socket address takes) costs the holder, not the start."""
    prefix = temp_dir("pgwshard-hold-")
    deep = os.path.join(prefix, "p" * 120)
    os.makedirs(deep)
    done = _query(deep)
    assert json.loads(done.stdout)[0]["Name"] == "pgwshard"
    assert b"cannot hold" in done.stderr
    assert _holders(deep) == []
