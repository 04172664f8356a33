"""A small client for Kong's Admin API: upstreams, targets, and DB-less /config.

Errors become UpstreamError where the I/O happens. The admin token travels in the
`Kong-Admin-Token` header and never appears in an error or a log line.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .errors import UpstreamError

_PAGE_LIMIT = 10_000  # bounded pagination: 10,000 pages of `size` entities


class KongAdmin:
    def __init__(self, url: str, token: str | None = None, timeout: float = 5.0):
        self.url = url.rstrip("/")
        self._token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200, 201, 204)) -> tuple[int, Any]:
        """One call; returns (status, decoded JSON or None). Raises UpstreamError otherwise."""
        headers = {"Accept": "application/json"}
        if self._token:
            headers["Kong-Admin-Token"] = self._token
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        except OSError as err:
            raise UpstreamError(f"Kong Admin API {self.url}: {method} {path}: {err}") from None
        if status not in ok:
            raise UpstreamError(f"Kong Admin API {self.url}: {method} {path}: {status} {raw[:300]!r}")
        return status, (json.loads(raw) if raw.strip() else None)

    def list(self, path: str, size: int = 1000) -> list[dict]:
        """Every entity of a paginated collection, following `next`."""
        entities: list[dict] = []
        url = f"{path}{'&' if '?' in path else '?'}size={size}"
        for _ in range(_PAGE_LIMIT):
            _, page = self.request("GET", url)
            entities += page.get("data", [])
            if not page.get("next"):
                return entities
            nxt = urllib.parse.urlsplit(page["next"])
            url = nxt.path + (f"?{nxt.query}" if nxt.query else "")
        raise UpstreamError(f"Kong Admin API: more than {_PAGE_LIMIT} pages at {path}")

    def ensure_upstream(self, name: str) -> None:
        status, _ = self.request("GET", f"/upstreams/{_q(name)}", ok=(200, 404))
        if status == 404:
            self.request("POST", "/upstreams", {"name": name}, ok=(201, 409))  # 409: created meanwhile

    def targets(self, upstream: str) -> list[dict]:
        return self.list(f"/upstreams/{_q(upstream)}/targets")

    def add_target(self, upstream: str, target: str, weight: int) -> None:
        self.request("POST", f"/upstreams/{_q(upstream)}/targets", {"target": target, "weight": weight})

    def set_weight(self, upstream: str, target_id: str, weight: int) -> None:
        self.request("PATCH", f"/upstreams/{_q(upstream)}/targets/{_q(target_id)}", {"weight": weight})

    def delete_target(self, upstream: str, target: str) -> None:
        self.request("DELETE", f"/upstreams/{_q(upstream)}/targets/{_q(target)}", ok=(204, 404))

    def post_config(self, declarative: dict) -> bool:
        """Load a whole declarative config (DB-less); False when Kong already had it (304)."""
        status, _ = self.request("POST", "/config?check_hash=1", {"config": json.dumps(declarative)}, ok=(200, 201, 304))
        return status != 304


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")
