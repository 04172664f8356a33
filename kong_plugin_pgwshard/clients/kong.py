"""A small client for Kong's Admin API: upstreams, targets, and DB-less /config.

Errors become UpstreamError where the I/O happens. The admin token travels in the
`Kong-Admin-Token` header and never appears in an error or a log line.
"""
from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from ..errors import UpstreamError

_PAGE_LIMIT = 10_000  # bounded pagination: 10,000 pages of `size` entities


class KongAdmin:
    """One Kong node's Admin API. `token` is sent as `Kong-Admin-Token` and kept out of errors."""

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
        except (OSError, http.client.HTTPException) as err:  # refused, timed out, cut off mid-answer
            raise UpstreamError(f"Kong Admin API {self.url}: {method} {path}: {err}") from None
        if status not in ok:
            # DB-less Kong answers entity writes 405: say which setting fixes it
            hint = " (Kong is DB-less: set kong.mode: declarative)" if status == 405 and not path.startswith("/config") else ""
            raise UpstreamError(f"Kong Admin API {self.url}: {method} {path}: {status} {raw[:300]!r}{hint}")
        try:
            return status, (json.loads(raw) if raw.strip() else None)
        except ValueError:  # e.g. a proxy's HTML error page in front of the Admin API
            raise UpstreamError(f"Kong Admin API {self.url}: {method} {path}: not JSON: {raw[:100]!r}") from None

    def list(self, path: str, size: int = 1000) -> list[dict]:
        """Every entity of a paginated collection, following `next`."""
        entities: list[dict] = []
        url = f"{path}{'&' if '?' in path else '?'}size={size}"
        for _ in range(_PAGE_LIMIT):
            _, page = self.request("GET", url)
            if not isinstance(page, dict) or not isinstance(page.get("data"), list):
                raise UpstreamError(f"Kong Admin API {self.url}: GET {path}: expected {{data, next}}, got {page!r:.100}")
            entities += page["data"]
            if not page.get("next"):
                return entities
            nxt = urllib.parse.urlsplit(page["next"])
            url = nxt.path + (f"?{nxt.query}" if nxt.query else "")
        raise UpstreamError(f"Kong Admin API: more than {_PAGE_LIMIT} pages at {path}")

    def ensure_upstream(self, name: str) -> None:
        """Create the upstream unless it exists (GET answers 404 for a missing one)."""
        status, _ = self.request("GET", f"/upstreams/{_q(name)}", ok=(200, 404))
        if status == 404:
            self.request("POST", "/upstreams", {"name": name}, ok=(201, 409))  # 409: created meanwhile

    def targets(self, upstream: str) -> list[dict]:
        """Every target entity of the upstream (`target` is "host:port", `weight` 0..65535)."""
        return self.list(f"/upstreams/{_q(upstream)}/targets")

    def add_target(self, upstream: str, target: str, weight: int) -> None:
        """Add one "host:port" target with its weight."""
        self.request("POST", f"/upstreams/{_q(upstream)}/targets", {"target": target, "weight": weight})

    def set_weight(self, upstream: str, target_id: str, weight: int) -> None:
        """Change an existing target's weight in place (Kong 3.x targets can be PATCHed)."""
        self.request("PATCH", f"/upstreams/{_q(upstream)}/targets/{_q(target_id)}", {"weight": weight})

    def delete_target(self, upstream: str, target: str) -> None:
        """Remove a target by "host:port" or id; already gone (404) counts as done."""
        self.request("DELETE", f"/upstreams/{_q(upstream)}/targets/{_q(target)}", ok=(204, 404))

    def post_config(self, declarative: dict) -> bool:
        """Load a whole declarative config (DB-less); False when Kong already had it (304)."""
        status, _ = self.request("POST", "/config?check_hash=1", {"config": json.dumps(declarative)}, ok=(200, 201, 304))
        return status != 304


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")
