"""A test-only kong-pdk plugin that exercises the OpenResty host's side of the PDK.

Run as a dedicated plugin server named "pgwshard" (so it listens on <prefix>/pgwshard.sock),
under kong-pdk's own server or under pgwshard-plugin's event loop and PDK:
  python -m tests.support.pdk_probe_plugin -p <prefix> --no-lua-style
  python -m tests.support.pdk_probe_plugin -p <prefix> --pgwshard-plugin
Each /probe/<case> path makes the PDK calls a test wants to see answered as Kong would.
"""
from __future__ import annotations

import os
import sys
import time

from kong_pdk.cli import start_dedicated_server


class Plugin:
    """Answers /probe/* itself; anything else is left to the host's upstream."""

    def __init__(self, config: dict):
        self.config = config

    def access(self, kong) -> None:
        path = kong.request.get_raw_path()
        if path == "/probe/unknown":
            result = kong.nope.nothing()  # no such PDK method: Kong answers a Step without Data
            kong.response.exit(200, {"result_is_none": result is None})
        elif path == "/probe/nil":
            absent = kong.request.get_header("x-absent")  # nil in Lua: a Step without Data
            kong.response.exit(200, {"absent_is_none": absent is None,
                                     "method": kong.request.get_method(),
                                     "query": kong.request.get_query(),
                                     "header": kong.request.get_header("x-probe")})
        elif path == "/probe/log":
            kong.log.notice("probe-marker ", self.config.get("tag", "none"), " ", 7)  # a number too
            kong.response.exit(201, {"logged": True}, {"X-Probe": "yes"})
        elif path == "/probe/text":
            kong.response.exit(418, "plain text body")
        elif path == "/probe/hang":
            time.sleep(30)  # a plugin stuck past the host's read timeout


def serve_with_pgwshard_plugin(prefix: str) -> None:
    from kong_plugin_pgwshard.plugin.server import RPCServer, build_server
    from kong_plugin_pgwshard.plugin.start import SOCKET_NAME, listen_unix

    definition = type("probe", (), {"Plugin": Plugin, "Schema": [], "version": "0.0.1", "priority": 0})
    path = os.path.join(prefix, SOCKET_NAME)
    RPCServer(build_server(definition=definition), listen_unix(path), path=path).serve_forever()


if __name__ == "__main__":
    if "--pgwshard-plugin" in sys.argv:
        serve_with_pgwshard_plugin(sys.argv[sys.argv.index("-p") + 1])
    else:
        start_dedicated_server("pgwshard", Plugin, "0.0.1", 0, [])
