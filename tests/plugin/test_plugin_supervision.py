"""pgwshard-plugin under a supervisor (systemd, a container's init), and the local stack's
respawner: kong-pdk's watchdog exits as soon as init adopts the server, so nothing but Kong
could keep it running."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from kong_plugin_pgwshard.harness.kong_rpc import KongRPC
from kong_plugin_pgwshard.harness.nginx import NginxHost
from kong_plugin_pgwshard.harness.processes import PluginServer, Pushgateway, Respawner, proc_stat, temp_dir, wait_until


def _alive(pid: int) -> bool:
    try:
        return proc_stat(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def _orphan_server(prefix: str, *flags: str) -> int:
    """Start a plugin server from a shell that exits once the server listens (on a new socket
    file, should one be there already), as Kong exits under a running server. Returns the
    server's pid."""
    argv = [sys.executable, "-m", "kong_plugin_pgwshard.plugin.start", "-p", prefix, *flags]
    log = os.path.join(prefix, "server.log")
    sock = os.path.join(prefix, "pgwshard.sock")
    before = os.stat(sock).st_ino if os.path.exists(sock) else 0
    script = (f"{shlex.join(argv)} >>{log} 2>&1 & echo $!; "
              f"for i in $(seq 200); do [ -S {sock} ] && [ $(stat -c %i {sock}) != {before} ] && exit 0; "
              f"sleep 0.1; done; exit 1")
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True, timeout=60).stdout
    return int(out)



def _status(socket_path: str) -> dict:
    return KongRPC(socket_path, timeout=2).call("plugin.GetStatus")


def test_a_supervised_server_outlives_the_parent_that_started_it():
    prefix = temp_dir("pgwshard-supervised-")
    socket_path = os.path.join(prefix, "pgwshard.sock")
    pid = _orphan_server(prefix, "--no-parent-watchdog")
    try:
        wait_until(lambda: _status(socket_path) is not None, 20, what="the supervised server")
        # kong-pdk's watchdog ticks every second: three ticks without a parent, still serving
        deadline = time.monotonic() + 3.5
        answers = 0
        while time.monotonic() < deadline:
            assert _alive(pid), open(os.path.join(prefix, "server.log")).read()
            _status(socket_path)
            answers += 1
            time.sleep(0.1)
        assert answers > 10
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not _alive(pid), 10, what="the supervised server to stop")


def test_a_server_whose_socket_was_taken_over_or_removed_exits():
    prefix = temp_dir("pgwshard-takeover-")
    socket_path = os.path.join(prefix, "pgwshard.sock")
    first = _orphan_server(prefix, "--no-parent-watchdog")
    second = third = None
    try:
        wait_until(lambda: _status(socket_path) is not None, 20, what="the first server")
        second = _orphan_server(prefix, "--no-parent-watchdog")  # a restart that did not stop the first
        wait_until(lambda: not _alive(first), 15, what="the first server to give way")
        assert _status(socket_path) is not None  # the second one serves
        os.remove(socket_path)
        wait_until(lambda: not _alive(second), 15, what="the server whose socket was removed to exit")
    finally:
        for pid in (first, second, third):
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _push(url: str) -> int:
    req = urllib.request.Request(url, data=b"x 1\n", method="PUT")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def test_the_respawner_restarts_a_plugin_server_that_dies_as_kong_does():
    pgw = Pushgateway().start()
    server = PluginServer()
    respawner = Respawner(server).start()
    host = NginxHost(server.socket_path, {"membership": "static", "nodes": [pgw.address]}, [pgw.address]).start()
    try:
        assert _push(host.url + "/metrics/job/before") == 200
        dead = server.proc.pid
        os.kill(dead, signal.SIGKILL)
        wait_until(lambda: server.running and server.proc.pid != dead and respawner.restarts == 1, 15,
                   what="the plugin server respawned")
        wait_until(lambda: _push(host.url + "/metrics/job/after") == 200, 15, what="pushes served again")
        assert {g["labels"]["job"] for g in pgw.groups()} == {"before", "after"}
    finally:
        host.stop()
        respawner.stop()
        pgw.stop()


def test_a_server_told_to_stop_serves_its_open_connections_until_they_close():
    """`kong reload`: the old worker 0 sends SIGTERM to its plugin server on exit while other
    old workers still have requests on it. The server stops taking connections but answers on
    the open ones; it exits once they are closed, or quiet (a gateway keeps pooled ones open)."""
    server = PluginServer().start()
    try:
        rpc = KongRPC(server.socket_path, timeout=5)
        assert _status(server.socket_path) is not None
        rpc.call("plugin.GetStatus")  # a pooled connection, as an old worker holds one
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGTERM)
        # no new connections once it has seen the signal (within a watchdog tick)...
        wait_until(lambda: _refused(server.socket_path), 10, what="the server to stop taking connections")
        # ...while the open one is still answered as long as it is used, past a watchdog tick
        for _ in range(8):
            time.sleep(0.2)
            assert server.running
            assert rpc.call("plugin.GetStatus") is not None
        # quiet: it goes, though the connection is still open
        wait_until(lambda: not server.running, 10, what="the server to exit once its connections were quiet")
        rpc.close()
    finally:
        server.stop()


def _refused(socket_path: str) -> bool:
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(socket_path)
        except ConnectionRefusedError:
            return True
    return False
