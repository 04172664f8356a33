"""Kong's side of the plugin-server protocol, for tests and benchmarks.

Follows Kong 3.9.3's kong/runloop/plugin_servers (rpc/mp_rpc.lua, plugin.lua): msgpack messages
`[0, msgid, method, [args]]` answered by `[1, msgid, error, result]`; StartInstance with the
config as a JSON string; per request HandleEvent, then one Step per PDK call the plugin makes
(a nil result is sent without `Data`), until the plugin answers "ret" or calls a terminal method
(kong.response.exit / kong.response.error), after which Kong sends no Step. Each RPC takes a
connection from a keepalive pool, so a Step may travel on another connection than its event.

`KongRPC` and `run_access` are the wire; `KongPlugin` is one Kong worker's handling of one
plugin entity on top of it: the config as Kong sends it (`kong_config`), a new instance whenever
`__seq__` changes, "no plugin instance" answered by starting one again and retrying, and an
event that fails otherwise leaving the request to the route's own balancing.
"""
from __future__ import annotations

import copy
import itertools
import json
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

TERMINAL = {"kong.response.exit", "kong.response.error"}
# kong/constants.lua DECLARATIVE_DEFAULT_WORKSPACE_ID: the default workspace of a DB-less Kong
# (in DB mode a random id chosen at migration); every entity of an OSS Kong belongs to it
DEFAULT_WS_ID = "0dc6f45b-8f8d-40d2-a504-473544ee190b"
# Kong retries "no plugin instance" without limit (mp_rpc.lua Rpc:handle_event recurses); a
# driver stays bounded, far above the one retry a restarted plugin server needs.
NO_INSTANCE_RETRIES = 20


class RPCError(Exception):
    """The plugin server answered an RPC with an error string."""


class TruncatedAnswer(Exception):
    """Part of an answer, then the connection closed or timed out. Kong's decoder raises there
    (lua-MessagePack's unpacker protects only its first read; mp_rpc.lua's "no data" is for an
    answer that never began), so the error escapes the plugin's handler: 500."""


class PDKRaised(Exception):
    """A PDK call raised a Lua error in Kong: the request ends with 500 (the phase handler's
    error reaches kong/init.lua's runloop)."""


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
        begun = False  # bytes of an answer arrived
        fed = unpacker.tell()  # bytes given to the unpacker, to tell a message boundary
        try:
            sock.sendall(msgpack.packb([0, msgid, method, list(args)]))
            while True:
                for message in unpacker:
                    if message[0] == 2:  # a notification [2, label, args]: mp_rpc.lua Rpc:notification
                        begun = unpacker.tell() < fed  # at a message boundary again unless more is buffered
                        continue
                    kind, got_id, error, result = message
                    assert kind == 1 and got_id == msgid, message
                    self._idle.append(conn)
                    if error:
                        raise RPCError(error)
                    return result
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    if begun:
                        raise TruncatedAnswer(f"{method}: the answer stopped before its end") from None
                    raise
                if not chunk:
                    if begun:
                        raise TruncatedAnswer(f"{method}: the connection closed inside the answer")
                    raise ConnectionError("plugin server closed the connection")
                begun = True
                fed += len(chunk)
                unpacker.feed(chunk)
        except (OSError, TruncatedAnswer):
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
            # kong/pdk/service.lua set_target: a string host, an integer port 0-65535, else it
            # raises (Kong then aborts the request with 500); it returns nothing
            host, port = (list(args) + [None, None])[:2]
            if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool) \
                    or not 0 <= port <= 65535:
                raise PDKRaised(f"set_target({host!r}, {port!r})")
            self.target = (host, port)
            return None
        if method in TERMINAL:
            self.exit = (args[0], args[1] if len(args) > 1 else None)
            return None
        if method.startswith("kong.log."):
            self.logs.append((method.rsplit(".", 1)[1], " ".join(map(str, args))))
            return None
        # mp_rpc.lua call_pdk_method: a method Kong cannot find is logged, and the plugin gets a
        # plain Step without Data (nil). This double answers only the methods above.
        self.logs.append(("err", f"could not find pdk method: {method}"))
        return None


def run_access(rpc: KongRPC, instance_id: int, request: Request,
               rotate_connections: bool = False, on_step: Callable[[], None] | None = None) -> Request:
    """Drive one access phase to its end, as Kong does. Returns the request with what happened."""
    answer = rpc.call("plugin.HandleEvent", {"InstanceId": instance_id, "EventName": "access"})
    for _ in range(100):  # a plugin making more PDK calls than this is broken
        data = answer["Data"]
        if data == "ret":
            return request
        try:
            result = request.pdk(data["Method"], data.get("Args") or [])
        except PDKRaised:
            request.exit = (500, {"message": "An unexpected error occurred"})
            return request
        if data["Method"] in TERMINAL:
            return request
        step = {"EventId": answer["EventId"]}
        if result is not None:
            step["Data"] = result
        if on_step:
            on_step()
        answer = rpc.call("plugin.Step", step, fresh_connection=rotate_connections)
    raise AssertionError(f"plugin made more than 100 PDK calls for {request.path}")


def kong_config(schema: dict, config: dict, *, plugin_id: str, seq: int, route_id: str | None = None,
                service_id: str | None = None, consumer_id: str | None = None,
                instance_name: str | None = None, ws_id: str = DEFAULT_WS_ID, name: str = "pgwshard") -> dict:
    """A plugin entity's config as Kong hands it to the plugin server.

    - defaults filled in, an unset field ABSENT, not null: the plugins iterator reads plugins
      without `nulls` (kong/runloop/plugins_iterator.lua), so kong/db/schema/init.lua
      process_auto_fields ("select") turns null into nil, and cjson.encode of a Lua table drops
      nil keys (kong/runloop/plugin_servers/rpc/mp_rpc.lua call_start_instance);
    - a string field holding "" is absent too unless it has `len_min = 0` (process_auto_fields);
    - then plugins_iterator.lua get_plugin_config's keys: route_id, service_id, consumer_id,
      plugin_instance_name (each absent when nil), __plugin_id, __ws_id, __key__ (the plugins
      DAO's cache key) and __seq__ (a counter shared by the workers, new on every rebuild).
    `schema` is the plugin's whole schema (`--dump`'s Schema).
    """
    (record,) = [f["config"] for f in schema["fields"] if "config" in f]
    sent = {}
    for item in record["fields"]:
        (key, spec), = item.items()
        value = config.get(key)
        if value is None:
            value = copy.deepcopy(spec.get("default"))
        if value is None or (spec.get("type") == "string" and value == "" and spec.get("len_min", 1) > 0):
            continue
        sent[key] = value
    injected = {"route_id": route_id, "service_id": service_id, "consumer_id": consumer_id,
                "plugin_instance_name": instance_name, "__plugin_id": plugin_id, "__ws_id": ws_id,
                # kong/db/dao/init.lua DAO:cache_key, fast path: name:key:arg2:arg3:arg4:arg5:ws_id
                "__key__": f"plugins:{name}:{route_id or ''}:{service_id or ''}:{consumer_id or ''}::{ws_id}",
                "__seq__": seq}
    return {**sent, **{k: v for k, v in injected.items() if v is not None}}


_SEQ = itertools.count(1)  # ngx.shared.kong "plugins_iterator:__seq__", shared by all workers


class KongPlugin:
    """One Kong worker's handling of one plugin entity (kong/runloop/plugin_servers/plugin.lua
    get_instance_id and rpc/mp_rpc.lua Rpc:handle_event).

    The instance id is cached per plugin entity and reused while the config's `__seq__` is the
    one it was started with; `reconfigure` is Kong rebuilding its plugins iterator (a config
    change, in DB-less mode every POST /config): a new `__seq__`, so the next event starts a new
    instance and then closes the old one. An event answered "no plugin instance" drops the
    cached id (reset_instance), starts an instance again and retries. Any other failure of an
    event is logged by Kong and the request goes on through the route's own balancing:
    `access` then returns the request untouched, with the error in `request.logs`.
    """

    def __init__(self, rpc: KongRPC, schema: dict, config: dict, *, name: str = "pgwshard",
                 plugin_id: str | None = None, **ids: Any):
        self.rpc, self.schema, self.name = rpc, schema, name
        self.plugin_id = plugin_id or str(uuid.uuid4())
        self._ids = ids
        self.instance: int | None = None
        self._instance_seq: int | None = None
        self.started: list[int] = []  # every instance id this worker started, in order
        self.reconfigure(config)

    def reconfigure(self, config: dict | None = None) -> None:
        """Kong rebuilt its plugins iterator: this entity's config table is new, with a new __seq__."""
        if config is not None:
            self.config = config
        self.conf = kong_config(self.schema, self.config, plugin_id=self.plugin_id, seq=next(_SEQ),
                                name=self.name, **self._ids)

    def instance_id(self) -> int:
        """plugin.lua get_instance_id: the cached id if its seq is the config's, else a new one."""
        if self.instance is not None and self._instance_seq == self.conf["__seq__"]:
            return self.instance
        old = self.instance
        self.instance = None
        # a failed StartInstance raises in Kong (error(err)): the request ends with 500
        self.instance = self.rpc.start_instance(self.name, self.conf)
        self._instance_seq = self.conf["__seq__"]
        self.started.append(self.instance)
        if old is not None:
            try:  # "don't care if there's an error, maybe other thread closed it first"
                self.rpc.call("plugin.CloseInstance", old)
            except RPCError:
                pass
        return self.instance

    def reset(self) -> None:
        """plugin.lua reset_instance: forget the instance (in every worker, through an event)."""
        self.instance = None

    def access(self, request: Request, **options: Any) -> Request:
        """One request's access phase as Kong runs it for this plugin."""
        for _ in range(NO_INSTANCE_RETRIES):
            try:
                instance = self.instance_id()
            except (RPCError, OSError, TruncatedAnswer) as err:  # get_instance_id: error(err), 500
                request.logs.append(("err", f"starting instance: {err}"))
                request.exit = (500, {"message": "An unexpected error occurred"})
                return request
            try:
                return run_access(self.rpc, instance, request, **options)
            except TruncatedAnswer as err:
                request.logs.append(("err", str(err)))
                request.exit = (500, {"message": "An unexpected error occurred"})
                return request
            except (RPCError, OSError) as err:  # refused, "no data" after a timeout, an RPC error
                if "no plugin instance" not in str(err).lower():
                    request.logs.append(("err", str(err)))  # kong.log.err(err); the request goes on
                    return request
                request.logs.append(("warn", str(err)))
                self.reset()
        raise AssertionError(f"still no plugin instance after {NO_INSTANCE_RETRIES} tries")
