"""What real Kong 3.9.3 answers pgwshard, recorded in tests/vectors/kong-3.9.3.json.

tests/kong/test_kong_recordings.py plays EXCHANGES against a running DB-less Kong and compares
its answers with the file (PGWSHARD_RECORD=1 rewrites it); the Admin API double
(tests/support/kong_admin_double.py) and the protocol driver (harness/kong_rpc.py) are held to
the same file by tests that need no Kong. Answers are normalized so that one run equals the
next: ids are "<uuid>", times "<time>", a page offset "<offset>", __seq__ "<seq>".
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from kong_plugin_pgwshard.harness.processes import http_request

RECORDING = Path(__file__).resolve().parents[1] / "vectors" / "kong-3.9.3.json"

UPSTREAM = "pushgateways"
# as a user writes them in kong.yml: Kong lists them normalized (kong/db/dao/targets.lua)
TARGETS = [{"target": "127.0.0.1:9091"}, {"target": "[::1]:9092", "weight": 0}, {"target": "010.0.0.3:9093", "weight": 50}]
PLUGIN_CONFIG = {"membership": "upstream", "upstream": UPSTREAM, "admin_url": "http://127.0.0.1:8007"}

# (name, API, method, path, JSON body): each against a DB-less node holding config(TARGETS)
EXCHANGES: list[tuple[str, str, str, str, Any]] = [
    ("status: targets", "status", "GET", f"/upstreams/{UPSTREAM}/targets", None),
    ("status: targets, pages of 2", "status", "GET", f"/upstreams/{UPSTREAM}/targets?size=2", None),
    ("status: unknown upstream", "status", "GET", "/upstreams/nope/targets", None),
    ("status: a write", "status", "POST", f"/upstreams/{UPSTREAM}/targets", {"target": "1.2.3.4:1"}),
    ("admin: targets", "admin", "GET", f"/upstreams/{UPSTREAM}/targets", None),
    ("admin: a target write, DB-less", "admin", "POST", f"/upstreams/{UPSTREAM}/targets", {"target": "1.2.3.4:1"}),
    ("admin: an unknown target's delete", "admin", "DELETE", f"/upstreams/{UPSTREAM}/targets/9.9.9.9:1", None),
]

# raw request paths whose kong.request.get_path() (kong/tools/uri.lua normalize, the path Kong
# forwards before re-escaping it) is recorded: core/kong_uri.py must give the same
RAW_PATHS = [
    "/metrics/job/x/instance/a", "//metrics/job/x", "/metrics//job/x", "/./metrics/job/x", "/%2e/metrics/job/x",
    "/other/../metrics/job/x", "/metrics/job/x/./instance/a", "/metrics/job/x/y/../instance/a",
    "/metrics/job/x/instance/a/b/x/%2E%2E", "/metrics/job/x/instance/a/..", "/metrics/job/x/.", "/metrics/job/x/..",
    "/%6detrics/job/x", "/metrics/%6Aob/x", "/metrics/job%2Fx", "/metrics/job%2fx", "/metrics/job/x/i/%2541",
    "/metrics/job/x/i/a%2e", "/metrics/job/x/i/a+b", "/metrics/job/x/i/%C3%A9", "/metrics/job/x/i/\u00e9",
    "/metrics/job/x/i/a%20b", "/metrics/job/x/i/%7e%41", "/metrics/job/x/i@base64/YQ==", "/metrics/job/x/",
    "/metrics/job/x/i/a%3Fb%23c%40d", "/metrics/job/x/i/%2F%2F", "/a/b/../../metrics/job/x",
]

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def config(targets: list[dict] = TARGETS) -> dict:
    """The declarative config the exchanges run against: kong/kong.yml's shape."""
    return {"_format_version": "3.0",
            "upstreams": [{"name": UPSTREAM, "hash_on": "path", "targets": targets}],
            "services": [{"name": "pushgateway", "host": UPSTREAM, "port": 9091, "protocol": "http",
                          "routes": [{"name": "pushgateway", "paths": ["/"], "strip_path": False}],
                          "plugins": [{"name": "pgwshard", "config": PLUGIN_CONFIG}]}]}


def normalize(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: normalize(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    if key in ("created_at", "updated_at") and isinstance(value, (int, float)):
        return "<time>"
    if key == "__seq__":
        return "<seq>"
    if key in ("next", "offset") and isinstance(value, str):
        return re.sub(r"offset=[^&]+", "offset=<offset>", value) if key == "next" else "<offset>"
    if isinstance(value, str):
        return _UUID.sub("<uuid>", value)
    return value


def play(urls: dict[str, str]) -> dict[str, dict]:
    """Every exchange against urls {"status": ..., "admin": ...}: {name: {status, body}}."""
    answers = {}
    for name, api, method, path, body in EXCHANGES:
        data = json.dumps(body).encode() if body is not None else None
        status, raw = http_request(urls[api] + path, method, data, timeout=10,
                                   headers={"Content-Type": "application/json"} if data else None)
        answers[name] = {"status": status, "body": normalize(json.loads(raw)) if raw.strip() else None}
    return answers


def start_instance_config(config_json: str) -> dict:
    """The Config of a StartInstance call, normalized."""
    return normalize(json.loads(config_json))


def load() -> dict:
    return json.loads(RECORDING.read_text())
