"""The nginx + Lua host as a real nginx process, and the plugin stack around it."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..host.render import PushLimits, render
from .processes import (
    ManagedProcess,
    PluginServer,
    free_port,
    http_get,
    temp_dir,
    wait_until,
)


class NginxHost(ManagedProcess):
    """A real nginx with the Lua host, in front of a plugin server's socket."""

    def __init__(self, socket: str, plugin_config: dict, upstream: list[str], workers: int = 2,
                 port: int | None = None, read_timeout_ms: int = 5000, keepalive_pool: int = 64,
                 host_settings: dict | None = None, deletes: str | None = None,
                 limits: PushLimits | None = None):
        """host_settings: more keys of the host config (render's), e.g. {"fail_fast": True};
        deletes: pgwshard-sync's delete API (render's); limits: nginx's timeouts and sizes
        towards the pushgateways (`pgwshard host render --read-timeout` ...)."""
        self.port = port or free_port()
        self.prefix = temp_dir("pgwshard-nginx-")
        os.chmod(self.prefix, 0o755)  # workers (never root) read the host config and write temp files here
        self.conf = render(self.prefix, f"127.0.0.1:{self.port}", socket, plugin_config, upstream, workers,
                           read_timeout_ms, keepalive_pool, host_settings=host_settings, deletes=deletes,
                           limits=limits or PushLimits())
        super().__init__("nginx-host", ["nginx", "-p", self.prefix, "-c", str(self.conf), "-g", "daemon off;"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_plugin_config(self, config: dict) -> None:
        """Change the plugin config; the host starts a new instance and closes the old."""
        path = Path(self.prefix) / "plugin-config.json"
        staged = path.with_suffix(".json.new")
        staged.write_text(json.dumps(config))
        os.chmod(staged, 0o644)
        os.replace(staged, path)  # whole, as Kong's configs arrive

    def error_log(self) -> str:
        path = Path(self.prefix) / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> NginxHost:
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

    def __init__(self, backends: list[str], workers: int = 2):
        self.server = PluginServer()
        self.backends = backends
        self.workers = workers
        self.host: NginxHost | None = None

    @property
    def url(self) -> str:
        assert self.host is not None, "not started"
        return self.host.url

    def start(self) -> PluginHostStack:
        self.server.start()
        self.host = NginxHost(self.server.socket_path, {"membership": "static", "nodes": self.backends},
                              self.backends, self.workers).start()
        return self

    def stop(self) -> None:
        if self.host:
            self.host.stop()
        self.server.stop()
