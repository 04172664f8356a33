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
read (`membership: upstream`: the Admin API, 2 s at most, once per shared source). Like kong-pdk's server it exits when its parent (Kong) is gone.
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
from kong_pdk.server import PluginServer, terminal_methods

from . import plugin

NAME = "pgwshard"
RET = "ret"  # the answer that ends an event
WATCHDOG_SECONDS = 1.0
# A phase waits for Kong's answer to a PDK call for milliseconds; Kong itself gives up on a
# plugin server after its socket timeout (60 s by default).
EVENT_TTL_SECONDS = 600.0
SEND_TIMEOUT_SECONDS = 5.0
IDLE_RUNNERS = 64  # phase greenlets kept for reuse: more than the events one server has in flight


class _PDKCall:
    """`kong`, `kong.request`, `kong.request.get_raw_path`...: as in kong-pdk, the attribute chain
    names the PDK call and calling it sends the call to Kong. Unlike kong-pdk, each link is built
    once and kept, and one chain serves every event: a call switches to the loop from whichever
    phase greenlet makes it."""

    def __init__(self, name: str):
        self._name = name
        self._terminal = name in terminal_methods
        self._log = name == "kong.log" or name.startswith("kong.log.")

    def __getattr__(self, attr: str) -> "_PDKCall":
        if attr.startswith("__"):  # copy, pickle and friends probe these: not PDK names
            raise AttributeError(attr)
        link = _PDKCall(f"{self._name}.{attr}")
        self.__dict__[attr] = link
        return link

    def __call__(self, *args: Any) -> Any:
        if self._log:  # kong-pdk's rule: a value msgpack may not carry is logged as its str()
            args = tuple(a if type(a) in (str, int, list, dict) else str(a) for a in args)
        result = greenlet.getcurrent().parent.switch({"Method": self._name, "Args": args})
        if self._terminal:
            return None  # Kong ends the request: no result comes back
        data, err = result
        if err:
            raise PDKException(f"exception from {self._name}: {err}")
        return data


KONG = _PDKCall("kong")


class _Raised:
    """How a phase runner reports that the plugin raised: it stays alive for the next event."""

    __slots__ = ("error", "trace")

    def __init__(self, error: Exception, trace: str):
        self.error, self.trace = error, trace


def _phase_runner(phase) -> None:
    """Body of a pooled greenlet: run a phase, hand its end (RET or _Raised) to the loop, wait
    for the next one. Creating a greenlet per event cost more than the rest of the event."""
    while True:
        try:
            phase(KONG)
            end = RET
        except Exception as err:  # noqa: BLE001 - reported to Kong by the loop
            end = _Raised(err, traceback.format_exc())
        phase = None  # a parked runner must not keep a closed instance alive
        phase = greenlet.getcurrent().parent.switch(end)


class PgwshardPluginServer(PluginServer):
    """kong-pdk's PluginServer whose events run in pooled greenlets driven by the RPC loop."""

    def __init__(self, loglevel: int = Logger.WARNING):
        super().__init__(loglevel=loglevel, name=f"{NAME} version {plugin.version}")
        self._idle: list[greenlet] = []

    def handle_event(self, event: dict) -> dict:
        iid = event["InstanceId"]
        instance = self.instances.get(iid)
        if instance is None:
            raise PluginServerException(f"no plugin instance #{iid}")  # Kong restarts it on these words
        phase = getattr(instance.cls, event["EventName"])
        eid = self.event_id
        self.event_id = eid + 1
        runner = self._idle.pop() if self._idle else greenlet(_phase_runner)
        return self._advance(eid, runner, phase)

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

    def _step(self, data: dict, is_error: bool) -> dict:  # kong-pdk's step and step_error call this
        eid = data["EventId"]
        runner, _ = self.events.pop(eid, (None, 0.0))
        if runner is None:
            raise PluginServerException(f"event id {eid} not found")
        result = data.get("Data")  # absent when the PDK call returned nil
        return self._advance(eid, runner, (None, result) if is_error else (result, None))

    def _advance(self, eid: int, runner: greenlet, arg: Any) -> dict:
        """Run the phase up to its next PDK call (the answer to Kong) or its end."""
        runner.parent = greenlet.getcurrent()  # its next PDK call comes back here, to this RPC
        data = runner.switch(arg)
        if type(data) is dict:
            if data["Method"] in terminal_methods:
                self._finish_after_exit(eid, runner)
            else:
                self.events[eid] = (runner, time.monotonic())  # waiting for Kong's Step
            return {"Data": data, "EventId": eid}
        self._ended(eid, runner, data)
        if type(data) is _Raised:  # an answer instead of leaving Kong waiting on its socket
            raise PluginServerException(f"the plugin raised {data.error!r}")
        return {"Data": RET, "EventId": eid}

    def _ended(self, eid: int, runner: greenlet, end: Any) -> None:
        """The phase ended (RET or _Raised): log a raise, keep the runner for another event."""
        if type(end) is _Raised:
            self.logger.error(f"event #{eid}: the plugin raised: {end.trace}")
        if len(self._idle) < IDLE_RUNNERS:
            self._idle.append(runner)

    def _finish_after_exit(self, eid: int, runner: greenlet) -> None:
        # Kong sends nothing more for this event. Let the phase run on to its end, as kong-pdk
        # does; a PDK call after the exit is never answered, so that runner is dropped and freed.
        end = runner.switch(None)
        if type(end) is not dict:
            self._ended(eid, runner, end)


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


class _Definition:
    """The plugin as kong-pdk's Module reads it."""

    Plugin = plugin.Plugin
    Schema = plugin.Schema
    version = plugin.version
    priority = plugin.priority


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
