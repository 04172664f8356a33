"""An HTTP double of Kong 3.9.3's Admin API and Status API, as far as pgwshard meets them.

Kong is the reference: each behaviour names the Kong file (tag 3.9.3) it follows. Three modes:

- `KongAdminDouble()`: a traditional node's Admin API (database-backed).
- `KongAdminDouble(db_less=True)`: a DB-less node's Admin API: reads as above, entity writes
  refused with 405, the config loaded whole through POST /config.
- `KongAdminDouble(status_api=True)`: the Status API (`status_listen`) of a node with
  `database = off` (a DB-less node or a hybrid data plane): only the upstreams' GET routes, no
  writes, no auth. Tests give it data with `load_config` / `add_upstream`, as the control plane
  or the node's declarative file would.

`token` goes beyond OSS Kong, which never checks `Kong-Admin-Token` (no auth middleware in
kong/api/init.lua): it stands for Kong Enterprise's RBAC or a proxy in front of the Admin API,
answering 401 without the header. `stall` makes every request hang (an overloaded Admin API);
`busy` answers POST /config 429 (Kong loading a previous config); `writes` records writes.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

NOT_FOUND = {"message": "Not found"}  # kong/api/api_helpers.lua handle_404, routes/upstreams.lua
METHOD_NOT_ALLOWED = {"message": "Method not allowed"}  # kong/api/api_helpers.lua handle_error
DEFAULT_PORT = 8000  # kong/db/dao/targets.lua DEFAULT_PORT
INVALID_TARGET = "Invalid target; not a valid hostname or ip address"  # kong/db/dao/targets.lua
_HEX_GROUP = re.compile(r"[0-9A-Fa-f]{1,4}\Z")


def kong_target(text: str) -> str | None:
    """A target as Kong stores and lists it, or None where Kong answers "Invalid target".

    kong/db/dao/targets.lua format_target = kong/tools/ip.lua normalize_ip + format_host with
    port 8000: the kind is chosen by exclusion (more than one colon: IPv6; digits and dots once
    the colons are gone: IPv4; else a name); IPv4 loses leading zeros, IPv6 is expanded to 8
    groups of 4 lower-case hex digits in brackets, names keep their case.
    """
    if text.count(":") > 1:
        host, port = _kong_ipv6(text)
        host = host and f"[{host}]"
    elif re.fullmatch(r"[0-9.]+", text.replace(":", "")):
        host, port = _kong_ipv4(text)
    else:
        host, port = _kong_name(text)
    if host is None or (port is not None and port > 65535):
        return None
    return f"{host}:{DEFAULT_PORT if port is None else port}"


def _kong_ipv4(text: str) -> tuple[str | None, int | None]:
    # ip.lua normalize_ipv4: four groups of 1-3 digits, each 0..255, then ":port" if a colon
    match = re.fullmatch(r"([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})(?::([0-9]+))?", text)
    if not match or any(int(octet) > 255 for octet in match.groups()[:4]):
        return None, None
    return ".".join(str(int(octet)) for octet in match.groups()[:4]), match[5] and int(match[5])


def _kong_ipv6(text: str) -> tuple[str | None, int | None]:
    # ip.lua normalize_ipv6: "addr", or "[addr]" with an optional ":port"; no port without brackets
    port = None
    bracketed = re.fullmatch(r"\[([^\[\]]*)\](.*)", text)
    if bracketed:
        address, rest = bracketed.groups()
        if rest:
            if not re.fullmatch(r":[0-9]+", rest):
                return None, None
            port = int(rest[1:])
    else:
        address = text
    if address.startswith(":"):
        address = "0" + address
    if address.endswith(":"):
        address += "0"
    if "::" in address:  # the first "::" stands for as many zero groups as make 8
        address = address.replace("::", ":" + "0:" * max(0, 8 - address.count(":")), 1)
    groups = address.split(":")
    if len(groups) != 8 or not all(_HEX_GROUP.match(g) for g in groups):
        return None, None
    return ":".join(g.rjust(4, "0") for g in groups).lower(), port


def _kong_name(text: str) -> tuple[str | None, int | None]:
    # ip.lua check_hostname: an optional ":port", letters, digits, "-", "." and "_", no label
    # ending in "-", an empty label only last (a trailing dot); the case is kept
    match = re.fullmatch(r"(.*?)(?::([0-9]+))?", text)
    name, port = match[1], match[2] and int(match[2])
    if not re.fullmatch(r"[0-9A-Za-z._-]+", name):
        return None, None
    labels = name.split(".")
    if any(label.endswith("-") or (label == "" and i != len(labels) - 1) for i, label in enumerate(labels)):
        return None, None
    return name, port


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
        return True
    except ValueError:
        return False


# kong/db/schema/others/declarative_config.lua generate_uuid: a v5 uuid of the entity's key in a
# namespace that is itself the v5 uuid of the entity's name in this one
_DECLARATIVE_NAMESPACE = uuid.UUID("fd02801f-0957-4a15-a55a-c8d9606f30b5")


def _declarative_id(entity: str, key: str) -> str:
    """The id Kong gives an entity of a declarative config that names none (get_key_for_uuid_gen:
    an upstream by its name, a target by its cache key). Targets listed at once are ordered by it."""
    return str(uuid.uuid5(uuid.uuid5(_DECLARATIVE_NAMESPACE, entity), key))


def _now_ms() -> float:
    # kong/db/schema/typedefs.lua auto_timestamp_ms: seconds with millisecond precision
    return round(time.time(), 3)


class KongAdminDouble:
    def __init__(self, db_less: bool = False, token: str | None = None, status_api: bool = False):
        if status_api and token:
            raise ValueError("Kong's Status API has no authentication (kong/status/init.lua)")
        self.db_less = db_less or status_api  # the Status API serves upstreams only with database = off
        self.status_api = status_api
        self.token = token
        self.upstreams: dict[str, dict] = {}
        self.targets: dict[str, list[dict]] = {}  # upstream name -> stored targets, creation order
        self.writes: list[tuple[str, str]] = []
        self.requests: list[tuple[str, str, dict]] = []
        self.config_hash: str | None = None
        self.config: dict | None = None  # the last declarative config loaded through POST /config
        self.busy: float | None = None  # set: POST /config answers 429 with this Retry-After
        self.stall = threading.Event()
        self.stalled = 0  # requests that have been held by `stall` (a test waits on this)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> KongAdminDouble:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (idempotent): the port then refuses connections, like a Kong that is down."""
        self.stall.clear()
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()

    # --- state, as a test or a control plane sets it ---------------------------------------

    def target_names(self, upstream: str) -> list[str]:
        """The upstream's targets as Kong lists them, sorted."""
        return sorted(t["target"] for t in self.listed(upstream))

    def add_upstream(self, name: str, targets: list[str] = (), **fields) -> None:
        self.upstreams[name] = {"id": str(uuid.uuid4()), "name": name, **fields}
        self.targets[name] = []
        for target in targets:
            self.add_target(name, target)

    def add_target(self, upstream: str, target: str, weight: int = 100) -> dict:
        """Store a target as kong/db/dao/targets.lua insert does: normalised, timestamped."""
        normalised = kong_target(target)
        if normalised is None:
            raise ValueError(f"{target!r}: {INVALID_TARGET}")
        now = _now_ms()
        entity = {"id": str(uuid.uuid4()), "target": normalised, "weight": weight,
                  "upstream": {"id": self.upstreams[upstream]["id"]}, "created_at": now, "updated_at": now,
                  "tags": None}
        self.targets[upstream].append(entity)
        return entity

    def listed(self, upstream: str) -> list[dict]:
        """kong/db/dao/targets.lua page_for_upstream: every target (weight 0 included) sorted by
        created_at then id, read backwards (newest first), only the newest of each target."""
        ordered = sorted(self.targets.get(upstream, []), key=lambda t: (t["created_at"], t["id"]), reverse=True)
        seen: set[str] = set()
        return [t for t in ordered if not (t["target"] in seen or seen.add(t["target"]))]

    def load_config(self, doc: dict) -> dict:
        """Replace everything with a declarative config, as POST /config or a control plane does;
        returns Kong's flattened entity set. ValueError for a config Kong would refuse."""
        upstreams, targets, flat = self._flatten(doc)
        self.upstreams, self.targets, self.config = upstreams, targets, doc
        # kong/api/routes/health.lua: /status shows the loaded config's hash with database = off
        self.config_hash = hashlib.md5(json.dumps(flat, sort_keys=True).encode()).hexdigest()
        return flat

    @staticmethod
    def _flatten(doc: dict) -> tuple[dict, dict, dict]:
        """kong/db/declarative/export.lua sanitize_output: `{<entities>: {<id>: entity}}`, foreign
        keys as {"id": ...}, no workspaces. Unlike Kong, fields are not filled with defaults."""
        upstreams, targets = {}, {}
        for upstream in doc.get("upstreams") or []:
            # kong/db/schema/others/declarative_config.lua: ids derive from the entity's key
            uid = upstream.get("id") or _declarative_id("upstreams", upstream["name"])
            upstreams[upstream["name"]] = {**{k: v for k, v in upstream.items() if k != "targets"}, "id": uid}
            now = _now_ms()  # declarative_config.lua: created_at filled once, at load time
            targets[upstream["name"]] = []
            for t in upstream.get("targets") or []:
                normalised = kong_target(str(t.get("target", "")))
                if normalised is None:
                    raise ValueError(f"target {t.get('target')!r}: {INVALID_TARGET}")
                # the target as written, before Kong normalises it; "*": no workspace given
                tid = t.get("id") or _declarative_id("targets", f"targets:*:{uid}:{t.get('target', '')}")
                targets[upstream["name"]].append({
                    "id": tid, "target": normalised, "weight": int(t.get("weight", 100)), "upstream": {"id": uid},
                    "created_at": now, "updated_at": now, "tags": t.get("tags")})
        flat = {"upstreams": {u["id"]: u for u in upstreams.values()},
                "targets": {t["id"]: t for ts in targets.values() for t in ts}}
        for kind in ("services", "routes", "plugins", "consumers", "certificates"):
            for entity in doc.get(kind) or []:
                eid = entity.get("id") or str(uuid.uuid5(uuid.NAMESPACE_URL, f"{kind}:{json.dumps(entity, sort_keys=True)}"))
                flat.setdefault(kind, {})[eid] = {**entity, "id": eid}
        return upstreams, targets, flat

    # --- HTTP ------------------------------------------------------------------------------

    def _handler(self):
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict | None = None, headers: dict | None = None) -> None:
                raw = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _body(self) -> tuple[dict, bytes]:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if "json" in (self.headers.get("Content-Type") or "") and raw.strip():
                    try:
                        return json.loads(raw), raw
                    except ValueError:
                        return {"__unparsable": True}, raw
                return {}, raw

            def _route(self, method: str) -> None:
                if double.stall.is_set():
                    double.stalled += 1
                    for _ in range(600):  # hang while stalled, 60 s at most
                        if not double.stall.is_set():
                            break
                        time.sleep(0.1)
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                # kong/api/api_helpers.lua default_route: a trailing slash is tolerated
                parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/") if p]
                body, raw = self._body() if method in ("POST", "PATCH", "PUT") else ({}, b"")
                double.requests.append((method, url.path, dict(self.headers)))
                if body.get("__unparsable"):  # kong/api/api_helpers.lua parse_json
                    return self._send(400, {"message": "Cannot parse JSON body"})
                if double.token and self.headers.get("Kong-Admin-Token") != double.token:
                    # beyond OSS (see the module docstring): Enterprise RBAC's refusal
                    return self._send(401, {"message": "Invalid credentials. Token or User credentials required"})
                if double.status_api:
                    return self._status_api(method, parts, query)
                if parts[:1] == ["upstreams"]:
                    return self._upstreams(method, parts, query, body)
                if parts == ["config"]:
                    return self._config(method, query, body, raw)
                if parts == ["status"] and method == "GET":
                    # kong/api/routes/health.lua: a DB-less node adds the hash of its config
                    extra = {"configuration_hash": double.config_hash} if double.db_less else {}
                    return self._send(200, {"server": {}, "memory": {}, **extra})
                return self._send(404, NOT_FOUND)  # kong/api/routes/targets.lua: /targets is disabled too

            def _status_api(self, method, parts, query):
                # kong/status/init.lua: /status, /status/ready and, with database = off, only
                # the GET handlers of kong/api/routes/upstreams.lua; any other method: 405
                if parts == ["status"] and method == "GET":
                    return self._send(200, {"server": {}, "memory": {}, "configuration_hash": double.config_hash})
                if parts == ["status", "ready"] and method == "GET":
                    return self._send(200, {"message": "ready"})
                routed = parts[:1] == ["upstreams"] and len(parts) in (3, 4) and parts[2] == "targets"
                if not routed:
                    return self._send(404, NOT_FOUND)
                if method != "GET":
                    return self._send(405, METHOD_NOT_ALLOWED)
                return self._upstreams(method, parts, query, {})

            def _upstream(self, key: str) -> str | None:
                # kong/api/endpoints.lua select_entity: a UUID selects by id, anything else by name
                if _is_uuid(key):
                    return next((n for n, u in double.upstreams.items() if u["id"] == key), None)
                return key if key in double.upstreams else None

            def _upstreams(self, method, parts, query, body):
                if len(parts) == 1:
                    if method == "GET":
                        return self._send(200, {"data": list(double.upstreams.values()), "next": None})
                    if method != "POST":
                        return self._send(405, METHOD_NOT_ALLOWED)
                    if double.db_less:  # kong/db/strategies/off/init.lua
                        return self._unsupported("create", "upstreams")
                    if body.get("name") in double.upstreams:  # kong/db/errors.lua unique_violation
                        return self._send(409, {"code": 5, "name": "unique constraint violation",
                                                "message": f"UNIQUE violation detected on '{{name=\"{body['name']}\"}}'",
                                                "fields": {"name": body["name"]}})
                    double.writes.append((method, "/upstreams"))
                    # kong/db/schema/entities/upstreams.lua: round-robin by default; a hash_on in
                    # the body sets the algorithm too (shorthand_fields: none -> round-robin,
                    # else consistent-hashing), without one a posted algorithm stays
                    fields = {"hash_on": body.get("hash_on", "none"), "algorithm": body.get("algorithm", "round-robin")}
                    if "hash_on" in body:
                        fields["algorithm"] = "round-robin" if fields["hash_on"] == "none" else "consistent-hashing"
                    double.add_upstream(body["name"], **fields)
                    return self._send(201, double.upstreams[body["name"]])
                name = self._upstream(parts[1])
                if name is None:  # kong/api/endpoints.lua: an unknown upstream is 404 first
                    return self._send(404, NOT_FOUND)
                if len(parts) == 2:
                    return self._send(200, double.upstreams[name]) if method == "GET" else self._send(405, METHOD_NOT_ALLOWED)
                if len(parts) == 3 and parts[2] == "targets":
                    if method == "GET":
                        return self._page(parts[1], name, query)
                    if method == "POST":
                        return self._post_target(name, body)
                    return self._send(405, METHOD_NOT_ALLOWED)
                if len(parts) == 4 and parts[2] == "targets":
                    return self._target(method, name, parts[3], body)
                return self._send(404, NOT_FOUND)

            def _page(self, given: str, name: str, query):
                # kong/api/endpoints.lua get_page_size: size must be a number; default 100,
                # clamped to 1000 without an error (kong/db/dao/targets.lua page_for_upstream)
                size = 100
                if "size" in query:
                    try:
                        size = int(float(query["size"]))
                    except ValueError:
                        return self._send(400, {"code": 9, "name": "invalid size", "message": "size must be a number"})
                size = min(size, 1000)
                try:
                    offset = int(query.get("offset", 0))  # a plain index into the list
                except ValueError:  # Lua arithmetic on a non-number: lapis' 500
                    return self._send(500, {"message": "An unexpected error occurred"})
                rows = double.listed(name)
                page = rows[offset:offset + size] if size > 0 else []
                more = 0 <= offset + size < len(rows)  # size=0 gives an empty page and a `next`, as in Kong
                # kong/api/endpoints.lua get_collection_endpoint: `next` names the upstream as
                # the URL did and carries only the offset, not the size
                answer = {"data": page, "next": f"/upstreams/{given}/targets?offset={offset + size}" if more else None}
                if more:
                    answer["offset"] = str(offset + size)
                return self._send(200, answer)

            def _post_target(self, name: str, body):
                # kong/db/dao/targets.lua insert: normalise, then the schema, then the strategy
                if not body.get("target"):
                    return self._schema_violation({"target": "required field missing"})
                normalised = kong_target(str(body["target"]))
                if normalised is None:
                    return self._schema_violation({"target": INVALID_TARGET})
                weight = body.get("weight", 100)
                if not isinstance(weight, int) or not 0 <= weight <= 65535:
                    return self._schema_violation({"weight": "value should be between 0 and 65535"})
                if double.db_less:
                    return self._unsupported("create", "targets")
                if any(t["target"] == normalised for t in double.targets[name]):  # unique (upstream, target)
                    key = {"target": normalised, "upstream": {"id": double.upstreams[name]["id"]}}
                    return self._send(409, {"code": 5, "name": "unique constraint violation",
                                            "message": f"UNIQUE violation detected on '{key}'", "fields": key})
                double.writes.append(("POST", f"/upstreams/{name}/targets"))
                return self._send(201, double.add_target(name, normalised, weight))

            def _target(self, method, name: str, key: str, body):
                # kong/api/routes/upstreams.lua target_endpoint: by id, or the newest listed
                # target whose normalised string equals the URL value (not normalised itself)
                if _is_uuid(key):
                    target = next((t for t in double.targets[name] if t["id"] == key), None)
                else:
                    target = next((t for t in double.listed(name) if t["target"] == key), None)
                if target is None:  # 404 before any DB-less 405
                    return self._send(404, NOT_FOUND)
                if method == "GET":
                    return self._send(200, target)
                if method == "DELETE":
                    if double.db_less:
                        return self._unsupported("remove", "targets")
                    double.writes.append((method, f"/upstreams/{name}/targets/{key}"))
                    double.targets[name].remove(target)
                    return self._send(204)
                if method in ("PATCH", "PUT"):  # both an update by id, not an upsert
                    weight = body.get("weight", target["weight"])
                    if not isinstance(weight, int) or not 0 <= weight <= 65535:
                        return self._schema_violation({"weight": "value should be between 0 and 65535"})
                    if double.db_less:
                        return self._unsupported("update", "targets")
                    double.writes.append((method, f"/upstreams/{name}/targets/{key}"))
                    target.update(weight=weight, updated_at=_now_ms())
                    if "target" in body:  # _TARGETS does not override update: no normalisation
                        target["target"] = body["target"]
                    return self._send(200, target)
                return self._send(405, METHOD_NOT_ALLOWED)

            def _schema_violation(self, fields: dict):
                # kong/db/errors.lua schema_violation, kong/api/endpoints.lua: 400
                detail = ", ".join(f"{k}: {v}" for k, v in fields.items())
                return self._send(400, {"code": 2, "name": "schema violation",
                                        "message": f"schema violation ({detail})", "fields": fields})

            def _unsupported(self, operation: str, entity: str):
                # kong/db/strategies/off/init.lua operation_unsupported, as a 405 (endpoints.lua)
                return self._send(405, {"code": 12, "name": "operation unsupported",
                                        "message": f"cannot {operation} '{entity}' entities when not using a database"})

            def _config(self, method, query, body, raw):
                # kong/api/routes/config.lua
                if not double.db_less:
                    return self._send(400, {"message": "this endpoint is only available when Kong is "
                                                       "configured to not use a database"})
                if method != "POST":
                    return self._send(405, METHOD_NOT_ALLOWED)
                params = {**query, **body}
                check_hash = str(params.get("check_hash")) == "1"
                if "_format_version" in params:  # the body is the config: no string, no hash, never 304
                    doc, digest = {k: v for k, v in body.items() if k not in ("check_hash", "flatten_errors")}, None
                else:
                    text = params.get("config")
                    if text is None:
                        text = raw.decode("utf-8", "replace") if raw.strip() else None
                    if text is None:
                        return self._send(400, {"message": "expected a declarative configuration"})
                    try:  # kong/db/declarative/init.lua unserialize: JSON, else YAML; md5 of the string
                        doc = yaml.safe_load(text)
                    except yaml.YAMLError as err:
                        doc = str(err)
                    if not isinstance(doc, dict):
                        return self._declarative_error("failed parsing declarative configuration")
                    digest = hashlib.md5(text.encode()).hexdigest()
                if check_hash and digest is not None and digest == double.config_hash:
                    return self._send(304)
                if not doc.get("_format_version"):
                    return self._declarative_error("expected a field '_format_version'")
                try:
                    upstreams, targets, flat = double._flatten(doc)
                except (ValueError, KeyError, TypeError, AttributeError) as err:
                    return self._declarative_error(str(err))
                if double.busy is not None:  # kong/db/declarative/import.lua: busy, Retry-After <= 10
                    return self._send(429, {"message": "Currently loading previous configuration"},
                                      {"Retry-After": f"{double.busy:g}"})
                double.upstreams, double.targets, double.config = upstreams, targets, doc
                double.config_hash = digest or hashlib.md5(json.dumps(flat, sort_keys=True).encode()).hexdigest()
                double.writes.append(("POST", "/config"))
                return self._send(201, flat)

            def _declarative_error(self, message: str):
                # kong/db/errors.lua declarative_config: 400, code 14
                return self._send(400, {"code": 14, "name": "invalid declarative configuration",
                                        "message": f"declarative config is invalid: {message}",
                                        "fields": {"error": message}})

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_PATCH(self):
                self._route("PATCH")

            def do_PUT(self):
                self._route("PUT")

            def do_DELETE(self):
                self._route("DELETE")

        return Handler
