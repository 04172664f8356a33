"""The RPC loop: one thread, one epoll loop, every connection Kong opens.

A msgpack RPC `[0, id, method, args]` in, `[1, id, error, result]` out, dispatched to the
PgwshardPluginServer's method of the same name (`plugin.HandleEvent` -> `handle_event`).
"""
from __future__ import annotations

import os
import re
import select
import signal
import socket
import time
import traceback
from typing import Any

import msgpack
from kong_pdk.exception import PDKException, PluginServerException

from .events import PgwshardPluginServer

WATCHDOG_SECONDS = 1.0
DRAIN_SECONDS = 10.0  # past Kong's plugin-server read timeout (kong.conf: 5 s)
SEND_TIMEOUT_SECONDS = 5.0


_CAMEL = re.compile("([a-z])([A-Z])")


def _method_name(rpc_method: str) -> str | None:
    """`plugin.HandleEvent` -> `handle_event`, as kong-pdk maps them; None for other namespaces."""
    namespace, _, command = rpc_method.partition(".")
    if namespace != "plugin" or not command:
        return None
    return command[0].lower() + _CAMEL.sub(lambda m: f"{m.group(1)}_{m.group(2).lower()}", command[1:])


class Watchdog:
    """Says when the server should stop on its own: its parent (Kong) is gone, or its socket was
    removed or taken over by another server.

    Kong starts the plugin server from an nginx worker and respawns it, but never stops it
    (kong/runloop/plugin_servers/process.lua): the server must notice Kong's exit itself.
    kong-pdk's watchdog does that by exiting once init adopts it (parent PID 1), which also
    kills a server that init started on purpose (systemd, a container's init) within a second.
    Here the watchdog follows the parent the server started under, and only when that was not
    init; `follow_parent=False` (`--no-parent-watchdog`) leaves stopping to a supervisor. A
    supervised server still exits when a newer one owns its socket path, so a restart never
    leaves two serving.
    """

    def __init__(self, path: str, follow_parent: bool = True):
        self.path = path
        parent = os.getppid()
        self.parent = parent if follow_parent and parent != 1 else None
        self._socket: tuple[int, int] | None = None

    def bound(self) -> None:
        """Remember the socket file this server bound."""
        st = os.stat(self.path)
        self._socket = (st.st_dev, st.st_ino)

    def reason_to_stop(self) -> str | None:
        if self.parent is not None and os.getppid() != self.parent:
            return "Kong exits (the process that started this server is gone), terminating..."
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return f"the socket {self.path} was removed, terminating..."
        except OSError:
            return None  # cannot tell: keep serving
        if (st.st_dev, st.st_ino) != self._socket:
            return f"another server took over the socket {self.path}, terminating..."
        return None


class RPCServer:
    """One thread, one epoll loop, every connection Kong opens; a msgpack RPC in, its answer out.

    socket_mode: the socket file's mode (e.g. 0o660, so that nginx workers in the server's group
    may connect); None leaves it to the umask."""

    def __init__(self, server: PgwshardPluginServer, listener: socket.socket, follow_parent: bool = True,
                 path: str | None = None):
        """listener: a listening unix socket (start.listen_unix), bound before the slow imports;
        path: where Kong finds it (its bound name, unless it was bound elsewhere and renamed
        there, as listener.bind_unix does)."""
        self.server = server
        self.path = path or listener.getsockname()
        self._listener = listener
        self.watchdog = Watchdog(self.path, follow_parent)
        self.watchdog.bound()
        self._methods: dict[str, Any] = {}
        self._pack = msgpack.Packer(unicode_errors="surrogateescape").pack  # bytes go back as they came
        self._terminated = False

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
        """Serve until told to stop (SIGTERM, or a reason of the Watchdog's), then drain: no new
        connections, and the open ones served until Kong closes them or DRAIN_SECONDS pass.

        Kong stops a plugin server while requests still use it: on `kong reload` the old worker
        0 sends SIGTERM on its exit (process.lua) while the other old workers finish their
        requests, and the new worker 0 has already started a server on the same path. A server
        that died there broke those requests' RPCs ("broken pipe"), and Kong sent the pushes on
        without the plugin, to a non-owner."""
        listener = self._listener
        listener.setblocking(False)
        self._poller = select.epoll()
        self._poller.register(listener.fileno(), select.EPOLLIN)
        self._connections: dict[int, tuple[socket.socket, msgpack.Unpacker]] = {}
        self._accept_paused = False
        previous = signal.signal(signal.SIGTERM, self._terminate)
        self.server.logger.info(f"server started at path {self.path}")
        next_tick = time.monotonic() + WATCHDOG_SECONDS
        drain_until: float | None = None
        try:
            while drain_until is None or (self._connections and time.monotonic() < drain_until):
                for fd, _ in self._poller.poll(WATCHDOG_SECONDS):
                    if fd == listener.fileno():
                        self._accept()
                    else:
                        self._serve(fd)
                now = time.monotonic()
                if drain_until is None:
                    reason = "terminated (SIGTERM)" if self._terminated else None
                    if reason is None and now >= next_tick:
                        reason = self.watchdog.reason_to_stop()
                    if reason:
                        self.server.logger.info(f"{reason}; draining {len(self._connections)} connections")
                        self._poller.unregister(listener.fileno())
                        listener.close()  # the path stays: it may be a newer server's by now
                        drain_until = now + DRAIN_SECONDS
                        continue
                if now < next_tick:
                    continue
                next_tick = now + WATCHDOG_SECONDS
                self.server.expire_events(now)
                if self._accept_paused and drain_until is None:
                    self._accept_paused = False
                    self._poller.modify(listener.fileno(), select.EPOLLIN)
        finally:
            signal.signal(signal.SIGTERM, previous)
            for conn, _ in self._connections.values():
                conn.close()
            self._poller.close()
            listener.close()

    def _terminate(self, signum, frame) -> None:
        self._terminated = True

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
