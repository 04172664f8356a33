"""`pgwshard-plugin`: the dedicated kong-pdk plugin server Kong starts for pgwshard.

It is kong-pdk's own server (same flags as any kong-pdk dedicated server; it listens on
`<prefix>/pgwshard.sock`) with two leaks of kong-pdk 0.36 closed where they arise, both on
`kong.response.exit`, which pgwshard uses for every rejected push:
- when a request's first PDK call is terminal, `handle_event` keeps the event forever (only a
  Step deletes events, and no Step follows an exit);
- in gevent mode the plugin's greenlet, once its phase returns, blocks forever putting "ret"
  into a Channel that nobody reads after an exit.
PDK calls are Python-style: results are returned and errors raised (kong-pdk's Lua-style
`(data, err)` tuples are deprecated).
"""
from __future__ import annotations

import json
import logging
import sys

from kong_pdk.cli import parse
from kong_pdk.listener import DEFAULT_SOCKET_NAME, UnixStreamServer
from kong_pdk.logger import Logger
from kong_pdk.module import Module
from kong_pdk.server import PluginServer, terminal_methods

from . import plugin

NAME = "pgwshard"


def _is_terminal(data: object) -> bool:
    return isinstance(data, dict) and data.get("Method") in terminal_methods


class PgwshardPluginServer(PluginServer):
    """kong-pdk's PluginServer with the exit leaks closed."""

    def handle_event(self, event):
        ret = super().handle_event(event)
        if _is_terminal(ret["Data"]):
            self._finish(self.events.pop(ret["EventId"], None))
        return ret

    def _step(self, data, is_error):
        channel = self.events.get(data.get("EventId"))
        ret = super()._step(data, is_error)
        if _is_terminal(ret["Data"]):
            self._finish(channel)
        return ret

    def _finish(self, channel) -> None:
        # After an exit the plugin's phase returns and its runner puts "ret"; a gevent Channel
        # put waits for a reader, so read it. Threads use an unbounded Queue: nothing to do.
        if channel is not None and self.use_gevent:
            from gevent import spawn

            spawn(channel.get)


def build_server(args) -> tuple[PgwshardPluginServer, UnixStreamServer]:
    """The plugin server and its unix socket listener, configured from kong-pdk's CLI args."""
    server = PgwshardPluginServer(
        loglevel=Logger.WARNING - args.verbose,
        use_multiprocess=args.multiprocessing,
        use_gevent=args.gevent,
        name=f"{NAME} version {plugin.version}",
        lua_style=False,
    )

    class _Definition:
        Plugin = plugin.Plugin
        Schema = plugin.Schema
        version = plugin.version
        priority = plugin.priority

    server.plugins[NAME] = Module(NAME, module=_Definition)
    socket_name = f"{NAME}.sock" if args.socket_name == DEFAULT_SOCKET_NAME else args.socket_name
    listener = UnixStreamServer(server, args.prefix, sock_name=socket_name,
                                use_gevent=args.gevent, listen_queue_size=args.listen_queue_size)
    return server, listener


def main() -> None:
    args = parse(dedicated=True)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s [pgwshard] %(levelname)s %(name)s: %(message)s")
    server, listener = build_server(args)
    if args.dump:
        sys.stdout.write(json.dumps([server.get_plugin_info(NAME)]))
        return
    try:
        listener.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
