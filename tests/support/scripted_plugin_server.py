"""A fake plugin server that answers the host's msgpack RPCs from a script, for the failures a
real pgwshard-plugin does not produce on demand: RPC errors, garbage, a PDK call it names.

script maps an RPC method ("plugin.StartInstance", "plugin.HandleEvent", "plugin.Step", ...) to
a list of answers, used in order; the last one repeats. An answer is
  - a result (any msgpack value): [1, id, nil, result];
  - RPCError("text"): [1, id, "text", nil];
  - Raw(b"..."): these bytes, then the connection is closed;
  - Notified(answer): a notification [2, label, args] first, in the same write, then answer.
A method the script does not name gets RPCError("no method"). Every call is recorded as
(method, args) in `calls`.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
from dataclasses import dataclass

import msgpack

from kong_plugin_pgwshard.harness.processes import temp_dir


@dataclass(frozen=True)
class RPCError:
    text: str


@dataclass(frozen=True)
class Raw:
    data: bytes


@dataclass(frozen=True)
class Notified:
    answer: object
    label: str = "serverPid"
    args: object = 1


def started_instance(instance_id: int = 7) -> dict:
    """What StartInstance answers (kong-pdk's shape)."""
    return {"Id": instance_id, "Name": "pgwshard", "Config": "{}", "StartTime": 0}


def pdk_call(method: str, *args, event_id: int = 1) -> dict:
    """A HandleEvent or Step answer asking the host for one PDK call."""
    return {"EventId": event_id, "Data": {"Method": method, "Args": list(args)}}


def ret(event_id: int = 1) -> dict:
    """The answer that ends an event."""
    return {"EventId": event_id, "Data": "ret"}


class ScriptedPluginServer:
    def __init__(self, script: dict[str, list], path: str | None = None):
        """path: where to listen (another server's socket is replaced); default: a new directory."""
        self.script = {method: list(answers) for method, answers in script.items()}
        if path is None:
            directory = temp_dir("pgwshard-scripted-")
            os.chmod(directory, 0o711)  # nginx workers (never root) pass through to the socket
            path = os.path.join(directory, "pgwshard.sock")
        self.path = path
        self.calls: list[tuple[str, list]] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._clients: list[socket.socket] = []

    def start(self) -> ScriptedPluginServer:
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(self.path):
            os.remove(self.path)
        self._listener.bind(self.path)
        os.chmod(self.path, 0o666)  # nginx workers run as another user
        self._listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        with self._lock:
            sockets, self._clients = [self._listener, *self._clients], []
        for s in sockets:
            if s is not None:
                # shutdown first: close() alone does not end a connection another thread is
                # blocked reading, and the gateway would keep it pooled, dead (Kong then answered
                # "no data" on its next call there)
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def methods(self) -> list[str]:
        with self._lock:
            return [method for method, _ in self.calls]

    def __enter__(self) -> ScriptedPluginServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # stopped
            with self._lock:
                self._clients.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _next_answer(self, method: str):
        with self._lock:
            answers = self.script.get(method)
            if not answers:
                return RPCError("no method")
            return answers.pop(0) if len(answers) > 1 else answers[0]

    def _serve(self, client: socket.socket) -> None:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        with client:
            while True:
                try:
                    data = client.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                unpacker.feed(data)
                for _, msgid, method, args in unpacker:
                    with self._lock:
                        self.calls.append((method, args))
                    answer = self._next_answer(method)
                    prefix = b""
                    if isinstance(answer, Notified):
                        prefix, answer = msgpack.packb([2, answer.label, answer.args]), answer.answer
                    try:
                        if isinstance(answer, Raw):
                            client.sendall(answer.data)
                            return
                        if isinstance(answer, RPCError):
                            client.sendall(prefix + msgpack.packb([1, msgid, answer.text, None]))
                        else:
                            client.sendall(prefix + msgpack.packb([1, msgid, None, answer]))
                    except OSError:
                        return
