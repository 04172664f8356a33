"""`pgwshard-plugin`: the dedicated plugin server Kong starts for pgwshard.

It speaks Kong's msgpack plugin-server protocol on `<prefix>/pgwshard.sock`. kong-pdk's
`PluginServer` keeps the instances and answers plugin info and status; what this module
replaces is how events run, because every push costs three round trips (HandleEvent and two
Steps) and kong-pdk spends most of its CPU on the machinery around them: a gevent or thread
hand-off per round trip, a greenlet or thread per event, and a new chain of PDK proxy objects
on every call. Here one thread serves every connection from an epoll loop; each event's phase
runs in a greenlet taken from a pool of idle ones; a PDK call switches straight back to the
loop, which sends the call to Kong as the RPC's answer, and the Step that carries its result
switches into the phase again. The PDK the plugin sees (`kong.request.get_raw_path()` and so
on) behaves as kong-pdk's, with its attribute chains built once. Measured with
bench/plugin_rpc_bench.py: see the README for CPU per push against kong-pdk's modes.

This also closes two leaks of kong-pdk 0.36 on `kong.response.exit`, which pgwshard uses for
every rejected push: its server keeps an event forever when the first PDK call is terminal, and
in gevent mode a greenlet per exit blocks forever on a channel nobody reads. Here a terminal
call ends the event at once, and an event Kong stops stepping is dropped after
EVENT_TTL_SECONDS. On CloseInstance the plugin's `close()`, if it has one, is called (kong-pdk
never tells a plugin its instance closed): pgwshard stops the membership poller nobody uses.

The loop waits on Kong only in one case: it reads only readable sockets, and answers are a few
hundred bytes, far below a unix socket's buffer, so a send waits (at most SEND_TIMEOUT_SECONDS)
only when a peer stopped reading. A plugin phase must not block either (pgwshard's does
no I/O); StartInstance does block the loop while a new instance makes its first membership
read (`membership: upstream`: the Admin API, 2 s at most, once per shared source). It stops
as `rpc.Watchdog` says: when the parent that started it (Kong) is gone, unless run supervised
(`--no-parent-watchdog`), and when its socket is removed or taken over.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys

from kong_pdk.logger import Logger
from kong_pdk.module import Module

from . import handler
from .events import PgwshardPluginServer
from .rpc import RPCServer

NAME = handler.NAME

__all__ = ["NAME", "RPCServer", "PgwshardPluginServer", "build_server", "run"]


class _Definition:
    """The plugin as kong-pdk's Module reads it."""

    Plugin = handler.Plugin
    Schema = handler.Schema
    version = handler.version
    priority = handler.priority


def build_server(verbose: int = 1, definition: type = _Definition) -> PgwshardPluginServer:
    """The server with pgwshard's plugin, or another definition's under its name (for tests)."""
    server = PgwshardPluginServer(loglevel=Logger.WARNING - verbose)
    server.plugins[NAME] = Module(NAME, module=definition)
    return server


def run(args: argparse.Namespace, listener: socket.socket | None) -> None:
    """Serve on `listener` (bound by `start.main` before these imports), or print the plugin
    info Kong asks for (`--dump`, no listener)."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s [pgwshard] %(levelname)s %(name)s: %(message)s")
    server = build_server(args.verbose)
    if listener is None:
        sys.stdout.write(json.dumps([server.get_plugin_info(NAME)]))
        return
    try:
        path = os.path.join(args.prefix, args.socket_name)
        RPCServer(server, listener, args.follow_parent, path).serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    from .start import main

    main()
