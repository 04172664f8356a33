"""A small HTTP double of Kong's Admin API (3.x), following its documented contract:

- GET /upstreams/{name or id}: 200, or 404 when missing.
- POST /upstreams {"name"}: 201 with the entity; 409 when the name exists (unique constraint).
- GET /upstreams/{u}/targets: paginated, `size` (default 100, 1..1000, else 400) entities per page in
  `data`, with `next` (a path with `offset`) and `offset` while more remain, `next: null` last.
- POST /upstreams/{u}/targets {"target": "host:port", "weight": 0..65535 (default 100)}: 201;
  409 when the target exists in the upstream.
- PATCH /upstreams/{u}/targets/{host:port or id}: 200; DELETE: 204 (404 if unknown).
- DB-less mode: entity writes answer 405 ("cannot create/update/delete ... in DB-less mode");
  POST /config {"config": <declarative config as a string>} loads it whole: 201, or 400 when
  it does not parse; with ?check_hash=1 an unchanged config answers 304. A Kong with a
  database answers POST /config with 400 ("only available when Kong is configured to not use
  a database").
- With an admin token configured, requests without the `Kong-Admin-Token` header get 401.
`stall` makes every request hang (as an overloaded Admin API would); `writes` records writes.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml


class KongAdminDouble:
    def __init__(self, db_less: bool = False, token: str | None = None):
        self.db_less = db_less
        self.token = token
        self.upstreams: dict[str, dict] = {}
        self.targets: dict[str, list[dict]] = {}  # upstream name -> targets in creation order
        self.writes: list[tuple[str, str]] = []
        self.requests: list[tuple[str, str, dict]] = []
        self.config_hash: str | None = None
        self.config: dict | None = None  # the last declarative config loaded through POST /config
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

    def target_names(self, upstream: str) -> list[str]:
        return sorted(t["target"] for t in self.targets.get(upstream, []))

    def add_upstream(self, name: str, targets: list[str] = ()) -> None:
        self.upstreams[name] = {"id": str(uuid.uuid4()), "name": name}
        self.targets[name] = [self._target(name, t, 100) for t in targets]

    def _target(self, upstream: str, target: str, weight: int) -> dict:
        return {"id": str(uuid.uuid4()), "target": target, "weight": weight,
                "upstream": {"id": self.upstreams[upstream]["id"]}, "created_at": time.time()}

    def _handler(self):
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict | None = None) -> None:
                raw = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _body(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"{}")

            def _route(self, method: str) -> None:
                if double.stall.is_set():
                    double.stalled += 1
                    for _ in range(600):  # hang while stalled, 60 s at most
                        if not double.stall.is_set():
                            break
                        time.sleep(0.1)
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/") if p]
                body = self._body() if method in ("POST", "PATCH", "PUT") else {}
                double.requests.append((method, url.path, dict(self.headers)))
                if double.token and self.headers.get("Kong-Admin-Token") != double.token:
                    return self._send(401, {"message": "Invalid authentication credentials"})
                if method in ("POST", "PATCH", "PUT", "DELETE") and parts != ["config"]:
                    if double.db_less:
                        return self._send(405, {"message": "cannot create/update/delete entities in DB-less mode"})
                    double.writes.append((method, urllib.parse.unquote(url.path)))
                handler = {"upstreams": self._upstreams, "config": self._config}.get(parts[0] if parts else "")
                if handler is None:
                    return self._send(404, {"message": "Not found"})
                handler(method, parts, query, body)

            def _upstreams(self, method, parts, query, body):
                if len(parts) == 1:
                    if method == "POST":
                        if body.get("name") in double.upstreams:
                            return self._send(409, {"message": "UNIQUE violation detected on '{name=...}'"})
                        double.add_upstream(body["name"])
                        return self._send(201, double.upstreams[body["name"]])
                    return self._send(200, {"data": list(double.upstreams.values()), "next": None})
                name = next((n for n, u in double.upstreams.items() if parts[1] in (n, u["id"])), None)
                if name is None:
                    return self._send(404, {"message": "Not found"})
                if len(parts) == 2:
                    return self._send(200, double.upstreams[name])
                targets = double.targets[name]
                if len(parts) == 3 and method == "GET":
                    size = int(query.get("size", 100))
                    if not 1 <= size <= 1000:  # Kong's DAO: "size must be an integer between 1 and 1000"
                        return self._send(400, {"message": "size must be an integer between 1 and 1000"})
                    offset = int(query.get("offset", 0))
                    page = targets[offset:offset + size]
                    more = offset + size < len(targets)
                    nxt = f"/upstreams/{name}/targets?offset={offset + size}&size={size}" if more else None
                    return self._send(200, {"data": page, "next": nxt, **({"offset": str(offset + size)} if more else {})})
                if len(parts) == 3 and method == "POST":
                    weight = int(body.get("weight", 100))
                    if not 0 <= weight <= 65535:
                        return self._send(400, {"message": "schema violation (weight: value should be between 0 and 65535)"})
                    if any(t["target"] == body["target"] for t in targets):
                        return self._send(409, {"message": "UNIQUE violation detected"})
                    targets.append(double._target(name, body["target"], weight))
                    return self._send(201, targets[-1])
                target = next((t for t in targets if parts[3] in (t["target"], t["id"])), None) if len(parts) == 4 else None
                if target is None:
                    return self._send(404, {"message": "Not found"})
                if method == "DELETE":
                    targets.remove(target)
                    return self._send(204)
                if method == "PATCH":
                    target.update({k: v for k, v in body.items() if k == "weight"})
                    return self._send(200, target)
                return self._send(405, {"message": "Method not allowed"})

            def _config(self, method, parts, query, body):
                if not double.db_less:  # kong/api/routes/config.lua: a DB-mode Kong refuses with 400
                    return self._send(400, {"message": "this endpoint is only available when Kong is "
                                                       "configured to not use a database"})
                if method != "POST":
                    return self._send(405, {"message": "Method not allowed"})
                try:
                    doc = yaml.safe_load(body["config"])
                    assert isinstance(doc, dict) and doc.get("_format_version")
                except Exception:  # noqa: BLE001
                    return self._send(400, {"message": "failed parsing declarative configuration"})
                digest = hashlib.md5(body["config"].encode()).hexdigest()
                if query.get("check_hash") == "1" and digest == double.config_hash:
                    return self._send(304)
                double.config_hash, double.config = digest, doc
                double.writes.append(("POST", "/config"))
                double.upstreams, double.targets = {}, {}
                for upstream in doc.get("upstreams", []):
                    double.add_upstream(upstream["name"])
                    double.targets[upstream["name"]] = [
                        double._target(upstream["name"], t["target"], int(t.get("weight", 100)))
                        for t in upstream.get("targets", [])]
                return self._send(201, {"upstreams": list(double.upstreams.values())})

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_PATCH(self):
                self._route("PATCH")

            def do_DELETE(self):
                self._route("DELETE")

        return Handler
