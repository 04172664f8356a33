"""A small client for Kong's Admin API: upstreams, targets, and DB-less /config; its reads also
work against Kong's Status API, which serves the upstreams' GET routes on nodes with
`database = off` (kong/status/init.lua).

It reads what Kong 3.9.3 answers: `next` links without `size` (kong/api/endpoints.lua), DB-less
writes refused with 405 (kong/db/strategies/off/init.lua), POST /config busy with 429 and
Retry-After (kong/api/routes/config.lua). Errors become UpstreamError where the I/O happens. The
token travels in the `Kong-Admin-Token` header and never appears in an error, a log line or a
repr; OSS Kong never checks it (Kong Enterprise's RBAC or a proxy in front of the Admin API does).
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
PAGE_SIZE = 1000  # Kong's largest page (kong/api/endpoints.lua max_page_size): it clamps larger sizes
RETRY_AFTER_MAX = 10.0  # kong/db/declarative/import.lua DECLARATIVE_RETRY_TTL_MAX


class KongBusy(UpstreamError):
    """POST /config answered 429: the node is still loading a previous configuration."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class KongAdmin:
    """One Kong node's Admin API. `token` is sent as `Kong-Admin-Token` and kept out of errors."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 5.0):
        self.url = url.rstrip("/")
        self._token = token
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"KongAdmin({self.url!r})"  # never the token

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
                status, raw, resp_headers = resp.status, resp.read(), resp.headers
        except urllib.error.HTTPError as err:
            status, raw, resp_headers = err.code, err.read(), err.headers
        except (OSError, http.client.HTTPException) as err:  # refused, timed out, cut off mid-answer
            raise UpstreamError(f"Kong Admin API {self.url}: {method} {path}: {err}") from None
        if status == 429 and path.startswith("/config"):
            retry_after = _seconds(resp_headers.get("Retry-After"))
            raise KongBusy(f"Kong Admin API {self.url}: {method} {path}: 429 busy loading a previous "
                           f"configuration, retry after {retry_after:g} s", retry_after)
        if status not in ok:
            raise UpstreamError(f"Kong Admin API {self.url}: {method} {path}: {status} "
                                f"{raw[:300].decode('utf-8', 'replace')}"
                                f"{_hint(method, path, status, raw)}")
        try:
            return status, (json.loads(raw) if raw.strip() else None)
        except ValueError:  # e.g. a proxy's HTML error page in front of the Admin API
            raise UpstreamError(f"Kong Admin API {self.url}: {method} {path}: not JSON: {raw[:100]!r}") from None

    def list(self, path: str, size: int = PAGE_SIZE) -> list[dict]:
        """Every entity of a paginated collection, following `next`. Kong's `next` for nested
        collections carries only the offset (kong/api/endpoints.lua), which would fall back to
        pages of 100: the size is added back to each link that lacks it."""
        entities: list[dict] = []
        url = path
        for _ in range(_PAGE_LIMIT):
            split = urllib.parse.urlsplit(url)
            query = urllib.parse.parse_qsl(split.query)
            if not any(name == "size" for name, _ in query):
                query.append(("size", str(size)))
            _, page = self.request("GET", f"{split.path}?{urllib.parse.urlencode(query)}")
            if not isinstance(page, dict) or not isinstance(page.get("data"), list):
                raise UpstreamError(f"Kong Admin API {self.url}: GET {path}: expected {{data, next}}, got {page!r:.100}")
            entities += page["data"]
            if not page.get("next"):
                return entities
            url = page["next"]
        raise UpstreamError(f"Kong Admin API: more than {_PAGE_LIMIT} pages at {path}")

    def ensure_upstream(self, name: str) -> None:
        """Create the upstream unless it exists (GET answers 404 for a missing one)."""
        status, _ = self.request("GET", f"/upstreams/{_q(name)}", ok=(200, 404))
        if status == 404:
            self.request("POST", "/upstreams", {"name": name}, ok=(201, 409))  # 409: created meanwhile

    def targets(self, upstream: str) -> list[dict]:
        """Every target entity of the upstream, newest first, as Kong lists them: `target` in Kong's
        normalised spelling (kong/db/dao/targets.lua), `weight` 0..65535 (0 included). Pages are
        offsets into a list that may change between two reads: a target seen twice counts once."""
        seen: set = set()
        return [t for t in self.list(f"/upstreams/{_q(upstream)}/targets")
                if not (t.get("target") in seen or seen.add(t.get("target")))]

    def add_target(self, upstream: str, target: str, weight: int) -> None:
        """Add one "host:port" target with its weight."""
        self.request("POST", f"/upstreams/{_q(upstream)}/targets", {"target": target, "weight": weight})

    def set_weight(self, upstream: str, target_id: str, weight: int) -> None:
        """Change an existing target's weight in place (Kong 3.x targets can be PATCHed)."""
        self.request("PATCH", f"/upstreams/{_q(upstream)}/targets/{_q(target_id)}", {"weight": weight})

    def delete_target(self, upstream: str, target: str) -> None:
        """Remove a target by id, or by "host:port" as Kong spells it (Kong matches the URL value
        against its normalised strings without normalising it: kong/api/routes/upstreams.lua);
        already gone (404) counts as done."""
        self.request("DELETE", f"/upstreams/{_q(upstream)}/targets/{_q(target)}", ok=(204, 404))

    def post_config(self, declarative: dict) -> bool:
        """Load a whole declarative config (DB-less); False when Kong already had it (304).

        Sent as a string: Kong hashes the string for `check_hash` (a config sent as a JSON object
        has no hash and never gets 304, kong/api/routes/config.lua). Kong answers 201 with its
        whole flattened entity set, which is not needed here. KongBusy (429) carries Retry-After."""
        status, _ = self.request("POST", "/config?check_hash=1", {"config": json.dumps(declarative)}, ok=(201, 304))
        return status != 304


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _seconds(retry_after: str | None) -> float:
    """Kong's Retry-After is seconds (at most 10); anything else waits Kong's longest."""
    try:
        return min(max(float(retry_after or ""), 0.0), RETRY_AFTER_MAX)
    except ValueError:
        return RETRY_AFTER_MAX


def _hint(method: str, path: str, status: int, raw: bytes) -> str:
    """Which setting fixes a refusal that means "wrong kind of Kong API"."""
    if method == "GET":
        return ""
    if status == 405 and b"when not using a database" in raw:  # kong/db/strategies/off/init.lua
        return " (Kong is DB-less: set kong.mode: declarative)"
    if status == 400 and b"configured to not use a database" in raw:  # kong/api/routes/config.lua
        return " (Kong has a database: set kong.mode: admin)"
    # kong/status/init.lua serves the upstreams' reads only: no /upstreams route, 405 on writes
    if (status == 404 and path == "/upstreams") or (status == 405 and b"Method not allowed" in raw):
        return " (a read-only Kong API such as the Status API? pgwshard-sync writes to the Admin API)"
    return ""
