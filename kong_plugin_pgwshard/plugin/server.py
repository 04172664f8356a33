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
import sys

from kong_pdk.logger import Logger
from kong_pdk.module import Module

from . import handler
from .events import PgwshardPluginServer
from .rpc import RPCServer

NAME = handler.NAME

__all__ = ["NAME", "RPCServer", "PgwshardPluginServer", "build_server", "main"]


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pgwshard-plugin", description="The pgwshard Kong plugin server.")
    parser.add_argument("-p", "--kong-prefix", "-kong-prefix", dest="prefix", default="/usr/local/kong/",
                        help="directory of the unix socket (default: %(default)s)")
    parser.add_argument("--socket-name", default=f"{NAME}.sock", help="socket file name (default: %(default)s)")
    parser.add_argument("--listen-queue-size", type=int, default=4096)
    parser.add_argument("--socket-mode", type=_octal, help="the socket's mode, e.g. 0660 for nginx workers in "
                                                          "this server's group (default: from the umask)")
    parser.add_argument("--no-parent-watchdog", dest="follow_parent", action="store_false",
                        help="run under a supervisor (systemd, a container's init): do not exit when the "
                             "parent process does (a server started by init never follows it)")
    parser.add_argument("-v", "--verbose", action="count", default=1, help="more logging, repeatable")
    parser.add_argument("--dump", "-dump", action="store_true", help="print the plugin info Kong asks for, and exit")
    return parser.parse_args(argv)


def _octal(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal file mode: {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"not a file mode: {text!r}")
    return mode


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s [pgwshard] %(levelname)s %(name)s: %(message)s")
    server = build_server(args.verbose)
    if args.dump:
        sys.stdout.write(json.dumps([server.get_plugin_info(NAME)]))
        return
    if not os.path.isdir(args.prefix):
        sys.exit(f"pgwshard-plugin: the prefix {args.prefix} is not a directory")
    try:
        RPCServer(server, os.path.join(args.prefix, args.socket_name), args.listen_queue_size,
                  args.follow_parent, args.socket_mode).serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
