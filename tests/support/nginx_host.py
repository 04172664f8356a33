"""The OpenResty host (kong/openresty) as a real nginx process, and the plugin stack around it."""
from __future__ import annotations

import json
import os
from pathlib import Path

from tests.support.processes import REPO, ManagedProcess, PluginServer, free_port, http_get, temp_dir, wait_until

HOST_DIR = REPO / "kong" / "openresty"


def render(prefix: str, listen: str, socket: str, plugin_config: dict, upstream: list[str],
           workers: int = 2, read_timeout_ms: int = 5000) -> Path:
    """Write nginx.conf, the host config and the plugin config into prefix; returns nginx.conf."""
    base = Path(prefix)
    plugin_config_file = base / "plugin-config.json"
    plugin_config_file.write_text(json.dumps(plugin_config))
    host_config = base / "host.json"
    host_config.write_text(json.dumps({
        "socket": socket, "plugin": "pgwshard", "plugin_config_file": str(plugin_config_file),
        "upstream": upstream, "read_timeout_ms": read_timeout_ms, "config_check_interval": 0.5}))
    conf = base / "nginx.conf"
    values = {"user": "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody"), "workers": workers,
              "prefix": prefix, "lua_dir": HOST_DIR, "host_config": host_config, "listen": listen}
    text = (HOST_DIR / "nginx.conf.template").read_text()
    for name, value in values.items():
        text = text.replace("{{%s}}" % name, str(value))
    conf.write_text(text)
    return conf


class NginxHost(ManagedProcess):
    """A real nginx with the Lua host, in front of a plugin server's socket."""

    def __init__(self, socket: str, plugin_config: dict, upstream: list[str], workers: int = 2,
                 port: int | None = None):
        self.port = port or free_port()
        self.prefix = temp_dir("pgwshard-nginx-")
        self.conf = render(self.prefix, f"127.0.0.1:{self.port}", socket, plugin_config, upstream, workers)
        super().__init__("nginx-host", ["nginx", "-p", self.prefix, "-c", str(self.conf), "-g", "daemon off;"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_plugin_config(self, config: dict) -> None:
        """Change the plugin config; the host starts a new instance and closes the old."""
        (Path(self.prefix) / "plugin-config.json").write_text(json.dumps(config))

    def error_log(self) -> str:
        path = Path(self.prefix) / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> "NginxHost":
        super().start()

        def listening():
            if not self.running:
                raise RuntimeError(f"nginx exited: {self.log()[-2000:]} {self.error_log()[-2000:]}")
            http_get(self.url + "/-/pgwshard-host-probe", timeout=2)
            return True

        wait_until(listening, 15, what="nginx host listening")
        return self


class PluginHostStack:
    """The plugin server and the nginx host over the given pushgateways (static membership).
    Has `url`, `start()`, `stop()` like a single process, for benchmarks."""

    def __init__(self, backends: list[str], mode: str = "gevent", workers: int = 2):
        self.server = PluginServer(mode)
        self.backends = backends
        self.workers = workers
        self.host: NginxHost | None = None

    @property
    def url(self) -> str:
        return self.host.url

    def start(self) -> "PluginHostStack":
        self.server.start()
        self.host = NginxHost(self.server.socket_path, {"membership": "static", "nodes": self.backends},
                              self.backends, self.workers).start()
        return self

    def stop(self) -> None:
        if self.host:
            self.host.stop()
        self.server.stop()
