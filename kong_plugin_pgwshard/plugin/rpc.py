"""The RPC loop: one thread, one epoll loop, every connection Kong opens.

A msgpack RPC `[0, id, method, args]` in, `[1, id, error, result]` out, dispatched to the
PgwshardPluginServer's method of the same name (`plugin.HandleEvent` -> `handle_event`).
"""
from __future__ import annotations

import os
import re
import select
import socket
import time
import traceback
from typing import Any

import msgpack
from kong_pdk.exception import PDKException, PluginServerException

from .events import PgwshardPluginServer

WATCHDOG_SECONDS = 1.0
SEND_TIMEOUT_SECONDS = 5.0


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
