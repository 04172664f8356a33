"""pgwshard-sync's Daemon run in a thread of the test, and what its file_sd sink wrote."""
from __future__ import annotations

import threading
from contextlib import contextmanager

from kong_plugin_pgwshard.core.file_sd import parse_file_sd
from kong_plugin_pgwshard.sync.daemon import Daemon
from kong_plugin_pgwshard.sync.settings import Settings, parse_settings


def registering_settings(consul, pgws, sd_path, wait: str) -> Settings:
    """pgwshard-sync on `consul`, registering `pgws` with 1 s checks, writing file_sd to
    sd_path, rebalancing off."""
    return parse_settings({
        "pushgateways": [p.address for p in pgws],
        "consul": {"address": consul.url, "wait": wait, "backoff": [0.2, 0.5],
                   "register": {"enabled": True, "check_interval": "1s", "check_timeout": "1s"}},
        "membership": {"hold_down": "1s"},
        "file_sd": {"path": str(sd_path)},
        "rebalance": {"enabled": False},
    }, "test")


@contextmanager
def running(daemon: Daemon):
    """Run daemon.run() in a thread; on exit stop it and check that it stopped."""
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        yield daemon
    finally:
        daemon.stop.set()
        thread.join(15)
        assert not thread.is_alive()


def file_members(path) -> set[str] | None:
    """Every member a file_sd file lists (weights aside), None while it is absent or half-written."""
    try:
        return {m.name for m in parse_file_sd(path.read_text())}
    except (OSError, ValueError):
        return None
