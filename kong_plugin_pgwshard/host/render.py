"""Renders the host's nginx.conf and its config files from the template shipped beside it."""
from __future__ import annotations

import json
import os
from pathlib import Path

HOST_DIR = Path(__file__).resolve().parent  # the Lua modules and nginx.conf.template

__all__ = ["HOST_DIR", "render"]


def render(prefix: str, listen: str, socket: str, plugin_config: dict, upstream: list[str],
           workers: int = 2, read_timeout_ms: int = 5000, keepalive_pool: int = 64,
           deletes: str | None = None) -> Path:
    """Write nginx.conf, the host config and the plugin config into prefix; returns nginx.conf.

    deletes: pgwshard-sync's delete API (host:port, its `deletes.listen`): every DELETE goes
    there, so it keeps a tombstone (README "Deletes"); the plugin still answers a bad push path."""
    base = Path(prefix)
    plugin_config_file = base / "plugin-config.json"
    plugin_config_file.write_text(json.dumps(plugin_config))
    host_config = base / "host.json"
    host_config.write_text(json.dumps({
        "socket": socket, "plugin": "pgwshard", "plugin_config_file": str(plugin_config_file),
        "upstream": upstream, "read_timeout_ms": read_timeout_ms, "keepalive_pool": keepalive_pool,
        "config_check_interval": 0.5}))
    conf = base / "nginx.conf"
    values = {"user": "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody"), "workers": workers,
              "prefix": prefix, "lua_dir": HOST_DIR, "host_config": host_config, "listen": listen,
              "deletes": (f"            if ($request_method = DELETE) {{ proxy_pass http://{deletes}; }}"
                          if deletes else "")}
    text = (HOST_DIR / "nginx.conf.template").read_text()
    for name, value in values.items():
        text = text.replace("{{%s}}" % name, str(value))
    conf.write_text(text)
    return conf
