"""Test-only plugin servers and an RPC relay around the nginx + Lua host."""
from __future__ import annotations

import os
import socket
import sys
import threading
import time

import msgpack

from kong_plugin_pgwshard.harness.processes import PluginServer, temp_dir


class ProbePluginServer(PluginServer):
    """tests/support/pdk_probe_plugin.py named pgwshard, under kong-pdk's stock dedicated server
    (threads mode) or, with ours=True, under pgwshard-plugin's loop and PDK: the host meets both,
    and pgwshard-plugin's PDK must answer the plugin as kong-pdk's does."""

    def __init__(self, ours: bool = False):
        super().__init__()
        flag = "--pgwshard-plugin" if ours else "--no-lua-style"
        self.argv = [sys.executable, "-m", "tests.support.pdk_probe_plugin", "-p", self.prefix, flag]


class RPCRelay:
    """A unix-socket relay between the host and a plugin server that watches the msgpack RPCs:
    how many connections the host opened, how many RPCs they carried, and how many Steps went on
    another connection than their event's HandleEvent.

    close_after_calls: hang up on the host after each answer asking for a PDK call, as a plugin
    server closing connections would, so that the Step must come on another connection;
    close_every: hang up after every Nth such answer only (the others keep their connection).
    split_answers: deliver every answer in two pieces a few ms apart, so the host must read on."""

    def __init__(self, target: str, close_after_calls: bool = False, split_answers: bool = False,
                 close_every: int = 0):
        self.target = target
        self.close_after_calls = close_after_calls
        self.close_every = close_every
        self.calls_asked = 0
        self.hang_ups = 0
        self.split_answers = split_answers
        directory = temp_dir("pgwshard-relay-")
        os.chmod(directory, 0o711)  # nginx workers (never root) pass through to the socket
        self.path = os.path.join(directory, "relay.sock")
        self.connections = 0
        self.rpcs = 0
        self.steps = 0
        self.steps_elsewhere = 0
        self._event_connection: dict[int, int] = {}
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None

    def start(self) -> RPCRelay:
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        os.chmod(self.path, 0o777)  # nginx workers may run as another user
        self._listener.listen(512)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in [self._listener, *sockets]:
            if s is not None:
                s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # stopped
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                server.connect(self.target)
            except OSError:
                client.close()
                server.close()
                continue
            with self._lock:
                self.connections += 1
                number = self.connections
                self._sockets += [client, server]
            closing = threading.Event()  # set before the answer that precedes a hang-up is sent
            threading.Thread(target=self._pump, args=(client, server, number, True, closing), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, number, False, closing), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, number: int, requests: bool,
              closing: threading.Event) -> None:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                _shut(src, dst)
                return
            if requests and closing.is_set():
                return  # sent after the hang-up: lost, as on a closed connection
            unpacker.feed(data)
            hang_up = False
            for message in unpacker:
                self._record(message, number, requests)
                if not requests and _asks_for_a_call(message):
                    with self._lock:
                        self.calls_asked += 1
                        nth = self.close_every and self.calls_asked % self.close_every == 0
                    hang_up |= self.close_after_calls or bool(nth)
            if hang_up:
                with self._lock:
                    self.hang_ups += 1
                closing.set()
            try:
                if self.split_answers and not requests and len(data) > 1:
                    dst.sendall(data[:len(data) // 2])
                    time.sleep(0.005)
                    data = data[len(data) // 2:]
                dst.sendall(data)
            except OSError:
                return
            if hang_up:
                _shut(src, dst)
                return

    def _record(self, message: list, number: int, request: bool) -> None:
        with self._lock:
            if request:
                self.rpcs += 1
                if message[2] in ("plugin.Step", "plugin.StepError"):
                    self.steps += 1
                    event = message[3][0].get("EventId")
                    if self._event_connection.get(event, number) != number:
                        self.steps_elsewhere += 1
            elif isinstance(message[3], dict) and "EventId" in message[3]:
                # the first answer naming an event is its HandleEvent's
                self._event_connection.setdefault(message[3]["EventId"], number)


def _asks_for_a_call(answer: list) -> bool:
    result = answer[3]
    return isinstance(result, dict) and isinstance(result.get("Data"), dict) and "Method" in result["Data"]


def _shut(*sockets: socket.socket) -> None:
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
