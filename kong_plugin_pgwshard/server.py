"""`pgwshard-plugin`: the dedicated plugin server Kong starts for pgwshard.

It speaks Kong's msgpack plugin-server protocol on `<prefix>/pgwshard.sock` and is built from
kong-pdk's own parts: its `PluginServer` keeps the instances and answers plugin info and status,
its `Kong` object is the PDK the plugin calls. What it replaces is how events run, because every
push costs three round trips (HandleEvent and two Steps) and kong-pdk's gevent and thread modes
spend most of their CPU moving each one between greenlets or threads through the gevent hub:
measured with bench/plugin_rpc_bench.py, 345-420 µs of CPU per push in gevent mode against
130-280 µs here. Here one thread serves every connection from an epoll loop and each event's
phase runs in a bare greenlet: a PDK call switches straight back to the loop, which sends the
call to Kong as the RPC's answer, and the Step that carries its result switches into the
phase again.

This also closes two leaks of kong-pdk 0.36 on `kong.response.exit`, which pgwshard uses for
every rejected push: its server keeps an event forever when the first PDK call is terminal, and
in gevent mode a greenlet per exit blocks forever on a channel nobody reads. Here a terminal
call ends the event at once, and an event Kong stops stepping is dropped after
EVENT_TTL_SECONDS. On CloseInstance the plugin's `close()`, if it has one, is called (kong-pdk
never tells a plugin its instance closed): pgwshard stops the membership poller nobody uses.

The loop waits on Kong only in one case: it reads only readable sockets, and answers are a few
hundred bytes, far below a unix socket's buffer, so a send waits (at most SEND_TIMEOUT_SECONDS)
only when a peer stopped reading. A plugin phase must not block either (pgwshard's does
no I/O). Like kong-pdk's server it exits when its parent (Kong) is gone.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import select
import socket
import sys
import time
import traceback
from typing import Any

import msgpack
from greenlet import greenlet
from kong_pdk.exception import PDKException, PluginServerException
from kong_pdk.logger import Logger
from kong_pdk.module import Module
from kong_pdk.pdk import Kong
from kong_pdk.server import PluginServer, terminal_methods

from . import plugin

NAME = "pgwshard"
RET = "ret"  # the answer that ends an event
WATCHDOG_SECONDS = 1.0
# A phase waits for Kong's answer to a PDK call for milliseconds; Kong itself gives up on a
# plugin server after its socket timeout (60 s by default).
EVENT_TTL_SECONDS = 600.0
SEND_TIMEOUT_SECONDS = 5.0


class _Switch:
    """The channel kong-pdk's PDK talks through (`put` a call, `get` its result), as a greenlet
    switch: `put` hands the call to the loop and resumes when a Step brings the result back."""

    __slots__ = ("result",)

    def put(self, call: dict) -> None:
        self.result = greenlet.getcurrent().parent.switch(call)

    def get(self) -> tuple[Any, Any]:
        return self.result


def _run_phase(phase, lua_style: bool) -> str:
    phase(Kong(_Switch(), lua_style).kong)
    return RET


class PgwshardPluginServer(PluginServer):
    """kong-pdk's PluginServer whose events run in bare greenlets driven by the RPC loop."""

    def __init__(self, loglevel: int = Logger.WARNING):
        super().__init__(loglevel=loglevel, name=f"{NAME} version {plugin.version}", lua_style=False)

    def handle_event(self, event: dict) -> dict:
        iid = event["InstanceId"]
        instance = self.instances.get(iid)
        if instance is None:
            raise PluginServerException(f"no plugin instance #{iid}")  # Kong restarts it on these words
        eid = self.event_id
        self.event_id = eid + 1
        phase = greenlet(_run_phase)
        return self._advance(eid, phase, getattr(instance.cls, event["EventName"]), self.lua_style)

    def expire_events(self, now: float) -> None:
        """Forget events Kong stopped stepping (a worker killed mid-request), so they cannot pile
        up. Events are kept in the order of their last answer: the stale ones come first."""
        for eid, (_, answered) in list(self.events.items()):
            if now - answered < EVENT_TTL_SECONDS:
                return
            del self.events[eid]
            self.logger.warn(f"event #{eid}: no Step from Kong for {EVENT_TTL_SECONDS:.0f} s, dropped")

    def close_instance(self, iid: int) -> dict:
        instance = self.instances.get(iid)
        answer = super().close_instance(iid)  # "no plugin instance" when there is none
        close = getattr(instance.cls, "close", None)
        if callable(close):  # the plugin lets go of what it holds (pgwshard: its membership poller)
            try:
                close()
            except Exception:  # noqa: BLE001 - the instance is gone either way
                self.logger.error(f"closing instance #{iid}: {traceback.format_exc()}")
        return answer

    def _step(self, data: dict, is_error: bool) -> dict:
        eid = data["EventId"]
        phase, _ = self.events.pop(eid, (None, 0.0))
        if phase is None:
            raise PluginServerException(f"event id {eid} not found")
        result = data.get("Data")  # absent when the PDK call returned nil
        return self._advance(eid, phase, (None, result) if is_error else (result, None))

    def _advance(self, eid: int, phase: greenlet, *args) -> dict:
        """Run the phase up to its next PDK call (the answer to Kong) or its end."""
        phase.parent = greenlet.getcurrent()  # its next PDK call comes back here, to this RPC
        try:
            data = phase.switch(*args)
        except Exception as err:  # an answer instead of leaving Kong waiting on its socket
            self.logger.error(f"event #{eid}: the plugin raised: {traceback.format_exc()}")
            raise PluginServerException(f"the plugin raised {err!r}") from None
        if isinstance(data, dict):
            if data.get("Method") in terminal_methods:
                self._finish_after_exit(eid, phase)
            else:
                self.events[eid] = (phase, time.monotonic())  # waiting for Kong's Step
        return {"Data": data, "EventId": eid}

    def _finish_after_exit(self, eid: int, phase: greenlet) -> None:
        # Kong sends nothing more for this event. Let the phase run on to its end, as kong-pdk
        # does; a PDK call after the exit is never answered, so its greenlet is dropped and freed.
        try:
            phase.switch(None)
        except Exception:  # noqa: BLE001 - the exit is already Kong's answer
            self.logger.error(f"event #{eid}: the plugin raised after its exit: {traceback.format_exc()}")


_CAMEL = re.compile("([a-z])([A-Z])")


def _method_name(rpc_method: str) -> str | None:
    """`plugin.HandleEvent` -> `handle_event`, as kong-pdk maps them; None for other namespaces."""
    namespace, _, command = rpc_method.partition(".")
    if namespace != "plugin" or not command:
        return None
    return command[0].lower() + _CAMEL.sub(lambda m: f"{m.group(1)}_{m.group(2).lower()}", command[1:])


class RPCServer:
    """One thread, one epoll loop, every connection Kong opens; a msgpack RPC in, its answer out."""

    def __init__(self, server: PgwshardPluginServer, path: str, listen_queue_size: int = 4096):
        self.server = server
        self.path = path
        self.listen_queue_size = listen_queue_size
        self._methods: dict[str, Any] = {}
        self._pack = msgpack.Packer(unicode_errors="surrogateescape").pack  # bytes go back as they came

    def _dispatch(self, msgid: int, method: str, args: list) -> bytes:
        if not isinstance(method, str) or not isinstance(args, list):
            return self._answer(msgid, "malformed RPC: expected a method name and a list of arguments")
        handler = self._methods.get(method)
        if handler is None:
            name = _method_name(method)
            handler = getattr(self.server, name, None) if name and not name.startswith("_") else None
            if handler is None:
                return self._answer(msgid, f"RPC {method} is not supported")
            self._methods[method] = handler
        try:
            return self._answer(msgid, None, handler(*args))
        except (PluginServerException, PDKException) as err:
            return self._answer(msgid, str(err))
        except Exception as err:  # noqa: BLE001 - one bad call must not stop the server
            self.server.logger.error(f"rpc #{msgid} {method}: {traceback.format_exc()}")
            return self._answer(msgid, str(err))

    def _answer(self, msgid: int, error: str | None, result: Any = None) -> bytes:
        return self._pack([1, msgid, error, result])

    def serve_forever(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(self.listen_queue_size)
        listener.setblocking(False)
        self._listener, self._poller = listener, select.epoll()
        self._poller.register(listener.fileno(), select.EPOLLIN)
        self._connections: dict[int, tuple[socket.socket, msgpack.Unpacker]] = {}
        self._accept_paused = False
        self.server.logger.info(f"server started at path {self.path}")
        next_tick = time.monotonic() + WATCHDOG_SECONDS
        try:
            while True:
                for fd, _ in self._poller.poll(WATCHDOG_SECONDS):
                    if fd == listener.fileno():
                        self._accept()
                    else:
                        self._serve(fd)
                now = time.monotonic()
                if now < next_tick:
                    continue
                next_tick = now + WATCHDOG_SECONDS
                if os.getppid() == 1:  # Kong is gone and init adopted us
                    self.server.logger.info("Kong exits, terminating...")
                    return
                self.server.expire_events(now)
                if self._accept_paused:
                    self._accept_paused = False
                    self._poller.modify(listener.fileno(), select.EPOLLIN)
        finally:
            for conn, _ in self._connections.values():
                conn.close()
            self._poller.close()
            listener.close()

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            # Out of file descriptors, say. The connection stays queued and epoll would report
            # it again at once: stop listening until the next tick instead of spinning.
            self.server.logger.warn(f"cannot accept connections for a second: {err!r}")
            self._accept_paused = True
            self._poller.modify(self._listener.fileno(), 0)
            return
        # Non-blocking: a socket with a timeout would poll() before every recv and send.
        conn.setblocking(False)
        # Kong sends Lua strings as msgpack str whatever their bytes (a raw request path may not
        # be UTF-8): keep such bytes as surrogates, for the plugin to refuse, not the connection.
        unpacker = msgpack.Unpacker(strict_map_key=False, unicode_errors="surrogateescape")
        self._connections[conn.fileno()] = (conn, unpacker)
        self._poller.register(conn.fileno(), select.EPOLLIN)

    def _serve(self, fd: int) -> None:
        conn, unpacker = self._connections[fd]
        try:
            chunk = conn.recv(65536)
            if chunk:
                unpacker.feed(chunk)
                for message in unpacker:
                    if not isinstance(message, list) or len(message) != 4:
                        raise ValueError(f"not an RPC message: {message!r:.100}")
                    _, msgid, method, args = message
                    _send(conn, self._dispatch(msgid, method, args))
                return
        except BlockingIOError:  # a spurious wakeup
            return
        except (OSError, ValueError, TypeError, msgpack.UnpackException) as err:
            self.server.logger.warn(f"dropping a connection: {err!r}")
        self._poller.unregister(fd)
        del self._connections[fd]
        conn.close()


def _send(conn: socket.socket, data: bytes) -> None:
    """Send all of an answer. It fits a unix socket's buffer unless Kong stopped reading: only
    then wait, and for 5 s at most."""
    try:
        sent = conn.send(data)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        conn.settimeout(SEND_TIMEOUT_SECONDS)
        try:
            conn.sendall(data[sent:])
        finally:
            conn.setblocking(False)


def build_server(verbose: int = 1) -> PgwshardPluginServer:
    server = PgwshardPluginServer(loglevel=Logger.WARNING - verbose)

    class _Definition:
        Plugin = plugin.Plugin
        Schema = plugin.Schema
        version = plugin.version
        priority = plugin.priority

    server.plugins[NAME] = Module(NAME, module=_Definition)
    return server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pgwshard-plugin", description="The pgwshard Kong plugin server.")
    parser.add_argument("-p", "--kong-prefix", "-kong-prefix", dest="prefix", default="/usr/local/kong/",
                        help="directory of the unix socket (default: %(default)s)")
    parser.add_argument("--socket-name", default=f"{NAME}.sock", help="socket file name (default: %(default)s)")
    parser.add_argument("--listen-queue-size", type=int, default=4096)
    parser.add_argument("-v", "--verbose", action="count", default=1, help="more logging, repeatable")
    parser.add_argument("--dump", "-dump", action="store_true", help="print the plugin info Kong asks for, and exit")
    return parser.parse_args(argv)


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
        RPCServer(server, os.path.join(args.prefix, args.socket_name), args.listen_queue_size).serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
