"""`pgwshard host render|run`: a complete nginx.conf for the user's own nginx, from the package."""
from __future__ import annotations

import grp
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kong_plugin_pgwshard.harness.nginx import NginxHost
from kong_plugin_pgwshard.harness.processes import (
    ManagedProcess,
    PluginServer,
    Pushgateway,
    free_port,
    http_get,
    http_request,
    temp_dir,
    wait_until,
)

pytestmark = pytest.mark.nginx
if shutil.which("nginx") is None:
    pytest.skip("needs Debian's nginx with the Lua module", allow_module_level=True)

BODY = b"# TYPE x gauge\nx 1\n"


def call(url: str, method: str = "PUT", data: bytes = BODY, timeout: float = 30) -> tuple[int, bytes]:
    return http_request(url, method, data if method in ("PUT", "POST") else None, timeout)


def _render(pgwshard: list[str], prefix: str, socket_path: str, plugin_config: Path, upstream: str,
            *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*pgwshard, "host", "render", "--prefix", prefix, "--listen", f"127.0.0.1:{free_port()}",
                           "--socket", socket_path, "--plugin-config", str(plugin_config), "--upstream", upstream,
                           *extra], capture_output=True, text=True, timeout=60, env=env, cwd="/")


def _open_dir(prefix: str) -> str:
    """A temporary directory nginx workers may enter, as /etc and /var/lib are."""
    path = temp_dir(prefix)
    os.chmod(path, 0o755)
    return path


def _plugin_config(nodes: list[str]) -> Path:
    path = Path(_open_dir("pgwshard-plugin-config-")) / "plugin.json"
    path.write_text(json.dumps({"membership": "static", "nodes": nodes}))
    return path


CHECKOUT_CLI = [sys.executable, "-m", "kong_plugin_pgwshard.cli"]


def test_render_writes_a_config_nginx_accepts_that_never_runs_workers_as_root():
    prefix = _open_dir("pgwshard-render-")
    lua = Path(_open_dir("pgwshard-lua-"))  # a user's own Lua tree, named with --lua-path: searched first
    shutil.copy("/usr/share/lua/5.1/MessagePack.lua", lua / "MessagePack.lua")
    result = _render(CHECKOUT_CLI, prefix, "/run/pgwshard-test-absent/pgwshard.sock",
                     _plugin_config(["127.0.0.1:9091"]), "127.0.0.1:9091", "--lua-path", str(lua))
    assert result.returncode == 0, result.stderr
    conf = Path(result.stdout.strip()).read_text()
    assert "user root" not in conf
    if os.geteuid() == 0:
        assert "\nuser www-data " in conf  # workers as www-data, in the socket's group
    path_line = next(line for line in conf.splitlines() if "lua_package_path" in line)
    assert path_line.index(str(lua)) < path_line.index("/usr/share/lua/5.1")
    assert "client_max_body_size 16m;" in conf and "large_client_header_buffers 4 64k;" in conf
    assert "proxy_read_timeout 10s;" in conf and "proxy_connect_timeout 2s;" in conf
    check = subprocess.run(["nginx", "-t", "-p", prefix, "-c", f"{prefix}/nginx.conf", "-e", f"{prefix}/error.log"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr


def test_render_sends_deletes_to_the_delete_api_and_keeps_fail_fast_a_choice():
    prefix = _open_dir("pgwshard-render-")
    result = _render(CHECKOUT_CLI, prefix, "/run/pgwshard-test-absent/pgwshard.sock",
                     _plugin_config(["127.0.0.1:9091"]), "127.0.0.1:9091",
                     "--deletes", "127.0.0.1:9552", "--fail-fast")
    assert result.returncode == 0, result.stderr
    conf = Path(result.stdout.strip()).read_text()
    assert "if ($request_method = DELETE) { return 418; }" in conf and "proxy_pass http://127.0.0.1:9552;" in conf
    assert json.loads((Path(prefix) / "host.json").read_text())["fail_fast"] is True
    plain = _open_dir("pgwshard-render-")
    result = _render(CHECKOUT_CLI, plain, "/run/pgwshard-test-absent/pgwshard.sock",
                     _plugin_config(["127.0.0.1:9091"]), "127.0.0.1:9091")
    assert "DELETE" not in Path(result.stdout.strip()).read_text()
    assert "fail_fast" not in json.loads((Path(plain) / "host.json").read_text())  # Kong's way by default


@pytest.mark.skipif(os.geteuid() != 0, reason="workers run as another user only when nginx starts as root")
def test_render_refuses_a_socket_the_workers_could_not_open():
    hidden = temp_dir("pgwshard-hidden-")  # 0700, root's
    path = os.path.join(hidden, "pgwshard.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        result = _render(CHECKOUT_CLI, _open_dir("pgwshard-render-"), path, _plugin_config(["127.0.0.1:9091"]),
                         "127.0.0.1:9091")
    assert result.returncode == 1
    assert f"cannot enter {hidden}" in result.stderr and path in result.stderr


def test_a_hung_pushgateway_gives_a_504_instead_of_holding_the_push():
    pgw = Pushgateway().start()
    server = PluginServer().start()
    host = NginxHost(server.socket_path, {"membership": "static", "nodes": [pgw.address]}, [pgw.address]).start()
    try:
        assert call(host.url + "/metrics/job/before")[0] == 200
        os.killpg(pgw.proc.pid, signal.SIGSTOP)
        try:
            status, _ = call(host.url + "/metrics/job/hung", timeout=40)  # nginx's default would hold it 60 s
        finally:
            os.killpg(pgw.proc.pid, signal.SIGCONT)
        assert status == 504
    finally:
        host.stop()
        server.stop()
        pgw.stop()


def test_the_installed_package_alone_renders_checks_and_runs_the_host(installed_venv):
    python = installed_venv / "bin/python"
    env = {"PATH": f"{installed_venv / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin"}  # no PYTHONPATH: no checkout
    where = subprocess.run([str(python), "-c", "import kong_plugin_pgwshard.host as h; print(h.__file__)"],
                           capture_output=True, text=True, check=True, cwd="/", env=env).stdout
    assert where.startswith(str(installed_venv)), where
    host_dir = Path(where).parent
    assert {"pgwshard_host.lua", "pgwshard_msgpack.lua", "nginx.conf.template"} <= {p.name for p in host_dir.iterdir()}

    pgws = [Pushgateway().start() for _ in range(2)]
    prefix = temp_dir("pgwshard-plugin-run-")
    group = None
    if os.geteuid() == 0:
        # the socket's group is the one nginx workers get, as with systemd/pgwshard-plugin.service
        group = "www-data"
        os.chown(prefix, 0, grp.getgrnam(group).gr_gid)
        os.chmod(prefix, 0o750)
    server = ManagedProcess("installed-plugin", [str(installed_venv / "bin/pgwshard-plugin"), "-p", prefix,
                                                 "--socket-mode", "0660"], env=env, cwd="/", group=group).start()
    socket_path = os.path.join(prefix, "pgwshard.sock")
    host_prefix = _open_dir("pgwshard-host-run-")
    port = free_port()
    host = ManagedProcess("installed-host", [
        str(installed_venv / "bin/pgwshard"), "host", "run", "--prefix", host_prefix, "--listen", f"127.0.0.1:{port}",
        "--socket", socket_path, "--plugin-config", str(_plugin_config([p.address for p in pgws])),
        "--upstream", ",".join(p.address for p in pgws), "--workers", "2"], env=env, cwd="/")
    try:
        wait_until(lambda: os.path.exists(socket_path), 20, what="the installed plugin server's socket")
        host.start()
        url = f"http://127.0.0.1:{port}"

        def listening():
            assert host.running, host.log()
            return http_get(url + "/-/healthy")[0] == 200
        wait_until(listening, 20, what="the installed host")
        conf = (Path(host_prefix) / "nginx.conf").read_text()
        assert "user root" not in conf
        assert (Path(host_prefix) / "lua/pgwshard_host.lua").read_bytes() == (host_dir / "pgwshard_host.lua").read_bytes()

        long_value = "v" * 20_000  # a 20 KB grouping key: nginx's 8 KiB header buffers give 414
        big = b"# TYPE big gauge\n" + b"".join(b'big{n="%d"} 1\n' % i for i in range(150_000))
        assert len(big) > 2 * 1024 * 1024  # nginx's 1 MiB body limit gives 413
        for path, body in [("/metrics/job/installed/instance/a", BODY), (f"/metrics/job/long/k/{long_value}", BODY),
                           ("/metrics/job/big", big)]:
            status, answer = call(url + path, data=body, timeout=60)
            assert status == 200, (path[:60], status, answer[:300])
        jobs = {g["labels"]["job"]: g["labels"] for p in pgws for g in p.groups()}
        assert {"installed", "long", "big"} <= set(jobs)
        assert jobs["long"]["k"] == long_value
    finally:
        host.stop()
        server.stop()
        for pgw in pgws:
            pgw.stop()
