"""pgwshard-sync's Daemon run in a thread of the test, and what its file_sd sink wrote."""
from __future__ import annotations

import json
import threading
from contextlib import contextmanager

from kong_plugin_pgwshard.sync.daemon import Daemon


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
    """The targets of a file_sd file, None while it is absent or half-written."""
    try:
        return set(json.loads(path.read_text())[0]["targets"])
    except (OSError, ValueError):
        return None
