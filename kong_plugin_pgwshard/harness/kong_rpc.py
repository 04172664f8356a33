"""Kong's side of the plugin-server protocol, for tests and benchmarks.

Follows Kong's kong/runloop/plugin_servers (mp_rpc): msgpack messages
`[0, msgid, method, [args]]` answered by `[1, msgid, error, result]`; StartInstance with the
config as a JSON string; per request HandleEvent, then one Step per PDK call the plugin makes
(a nil result is sent without `Data`), until the plugin answers "ret" or calls a terminal method
(kong.response.exit / kong.response.error), after which Kong sends no Step. Each RPC takes a
connection from a keepalive pool, so a Step may travel on another connection than its event.
"""
from __future__ import annotations

import itertools
import json
import socket
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack

TERMINAL = {"kong.response.exit", "kong.response.error"}


class RPCError(Exception):
    """The plugin server answered an RPC with an error string."""


class KongRPC:
    """A pool of connections to a plugin server's unix socket."""

    def __init__(self, socket_path: str, timeout: float = 5.0):
        self.socket_path = socket_path
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._idle: list[tuple[socket.socket, msgpack.Unpacker]] = []
        self.connections_opened = 0

    def _connect(self):
        if self._idle:
            return self._idle.pop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.connections_opened += 1
        return sock, msgpack.Unpacker(raw=False, strict_map_key=False)

    def call(self, method: str, *args: Any, fresh_connection: bool = False) -> Any:
        """One RPC. fresh_connection: do not reuse a pooled connection (as another worker would)."""
        if fresh_connection:
            idle, self._idle = self._idle, []
        conn = self._connect()
        if fresh_connection:
            self._idle = idle
        sock, unpacker = conn
        msgid = next(self._ids)
        try:
            sock.sendall(msgpack.packb([0, msgid, method, list(args)]))
            while True:
                for message in unpacker:
                    kind, got_id, error, result = message
                    assert kind == 1 and got_id == msgid, message
                    self._idle.append(conn)
                    if error:
                        raise RPCError(error)
                    return result
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("plugin server closed the connection")
                unpacker.feed(chunk)
        except (OSError, ConnectionError):
            sock.close()
            raise

    def close(self) -> None:
        for sock, _ in self._idle:
            sock.close()
        self._idle = []

    def plugin_info(self, name: str) -> dict:
        return self.call("plugin.GetPluginInfo", name)

    def start_instance(self, name: str, config: dict) -> int:
        return self.call("plugin.StartInstance", {"Name": name, "Config": json.dumps(config)})["Id"]


@dataclass
class Request:
    """One proxied request as the plugin sees it, and what the plugin did with it."""

    path: str
    method: str = "PUT"
    headers: dict = field(default_factory=dict)
    calls: list[tuple[str, list]] = field(default_factory=list)
    target: tuple[str, int] | None = None
    exit: tuple[int, Any] | None = None
    logs: list[tuple[str, str]] = field(default_factory=list)

    def pdk(self, method: str, args: list) -> Any:
        """Answer a PDK call the way Kong's PDK would for this request."""
        self.calls.append((method, args))
        if method == "kong.request.get_raw_path" or method == "kong.request.get_path":
            return self.path.partition("?")[0]
        if method == "kong.request.get_method":
            return self.method
        if method == "kong.request.get_header":
            return self.headers.get(args[0].lower())
        if method == "kong.service.set_target":
            self.target = (args[0], int(args[1]))
            return True
        if method in TERMINAL:
            self.exit = (args[0], args[1] if len(args) > 1 else None)
            return None
        if method.startswith("kong.log."):
            self.logs.append((method.rsplit(".", 1)[1], " ".join(map(str, args))))
            return None
        raise RPCError(f"PDK method {method} not answered by this test double")


def run_access(rpc: KongRPC, instance_id: int, request: Request,
               rotate_connections: bool = False, on_step: Callable[[], None] | None = None) -> Request:
    """Drive one access phase to its end, as Kong does. Returns the request with what happened."""
    answer = rpc.call("plugin.HandleEvent", {"InstanceId": instance_id, "EventName": "access"})
    for _ in range(100):  # a plugin making more PDK calls than this is broken
        data = answer["Data"]
        if data == "ret":
            return request
        result = request.pdk(data["Method"], data.get("Args") or [])
        if data["Method"] in TERMINAL:
            return request
        step = {"EventId": answer["EventId"]}
        if result is not None:
            step["Data"] = result
        if on_step:
            on_step()
        answer = rpc.call("plugin.Step", step, fresh_connection=rotate_connections)
    raise AssertionError(f"plugin made more than 100 PDK calls for {request.path}")
