"""A small client for Kong's Admin API: upstreams, targets, and DB-less /config; its reads also
work against Kong's Status API, which serves the upstreams' GET routes on nodes with
`database = off` (kong/status/init.lua).

It reads what Kong 3.9.3 answers: `next` links without `size` (kong/api/endpoints.lua), DB-less
writes refused with 405 (kong/db/strategies/off/init.lua), POST /config busy with 429 and
Retry-After (kong/api/routes/config.lua). Calls go through clients/http.py, which maps every
failure into errors.py's tree. The token travels in the `Kong-Admin-Token` header and never
appears in an error, a log line or a repr; OSS Kong never checks it (Kong Enterprise's RBAC or
a proxy in front of the Admin API does).
"""
from __future__ import annotations

import builtins
import json
import urllib.parse
from typing import Any

from ..errors import ClientStatusError, ProtocolError, status_error
from .http import ANY_STATUS, HttpClient, Timeouts

_PAGE_LIMIT = 10_000  # bounded pagination: 10,000 pages of `size` entities
PAGE_SIZE = 1000  # Kong's largest page (kong/api/endpoints.lua max_page_size): it clamps larger sizes
RETRY_AFTER_MAX = 10.0  # kong/db/declarative/import.lua DECLARATIVE_RETRY_TTL_MAX


class KongBusy(ClientStatusError):
    """POST /config answered 429: the node is still loading a previous configuration."""

    def __init__(self, message: str, retry_after: float, target: str | None = None):
        super().__init__(message, status=429, target=target)
        self.retry_after = retry_after


class KongAdmin:
    """One Kong node's Admin API. `token` is sent as `Kong-Admin-Token` and kept out of errors.
    `proxy`: an HTTP proxy to reach it through (none from the environment, ever)."""

    def __init__(self, url: str, token: str | None = None, timeout: float | Timeouts = 5.0,
                 proxy: str | None = None):
        self.url = url.rstrip("/")
        headers = {"Accept": "application/json"}
        if token:
            headers["Kong-Admin-Token"] = token
        self._http = HttpClient(self.url, name=f"Kong Admin API {self.url}", timeout=timeout, proxy=proxy,
                                headers=headers)

    def __repr__(self) -> str:
        return f"KongAdmin({self.url!r})"  # never the token

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200, 201, 204)) -> tuple[int, Any]:
        """One call; returns (status, decoded JSON or None). Raises an UpstreamError otherwise."""
        answer = self._http.request(method, path, json_body=body, ok=ANY_STATUS)
        status, raw = answer.status, answer.body
        where = f"Kong Admin API {self.url}: {method} {path}"
        if status == 429 and path.startswith("/config"):
            retry_after = _seconds(answer.headers.get("Retry-After"))
            raise KongBusy(f"{where}: 429 busy loading a previous configuration, retry after {retry_after:g} s",
                           retry_after, target=self.url)
        if status not in ok:
            raise status_error(f"{where}: {status} {answer.text()}{_hint(method, path, status, raw)}",
                               status=status, target=self.url, body=raw[:1000])
        return status, answer.json()

    def list(self, path: str, size: int = PAGE_SIZE) -> builtins.list[dict]:
        """Every entity of a paginated collection, following `next`. Kong's `next` for nested
        collections carries only the offset (kong/api/endpoints.lua), which would fall back to
        pages of 100: the size is added back to each link that lacks it."""
        entities: builtins.list[dict] = []
        url = path
        for _ in range(_PAGE_LIMIT):
            split = urllib.parse.urlsplit(url)
            query = urllib.parse.parse_qsl(split.query)
            if not any(name == "size" for name, _ in query):
                query.append(("size", str(size)))
            _, page = self.request("GET", f"{split.path}?{urllib.parse.urlencode(query)}")
            if not isinstance(page, dict) or not isinstance(page.get("data"), list):
                raise ProtocolError(f"Kong Admin API {self.url}: GET {path}: expected {{data, next}}, "
                                    f"got {page!r:.100}", target=self.url)
            entities += page["data"]
            if not page.get("next"):
                return entities
            url = page["next"]
        raise ProtocolError(f"Kong Admin API {self.url}: more than {_PAGE_LIMIT} pages at {path}", target=self.url)

    def ensure_upstream(self, name: str) -> None:
        """Create the upstream unless it exists (GET answers 404 for a missing one), as
        kong/kong.yml ships it; one that exists is left as its owner set it."""
        status, _ = self.request("GET", f"/upstreams/{_q(name)}", ok=(200, 404))
        if status == 404:
            self.request("POST", "/upstreams", new_upstream(name), ok=(201, 409))  # 409: created meanwhile

    def targets(self, upstream: str) -> builtins.list[dict]:
        """Every target entity of the upstream, newest first, as Kong lists them: `target` in Kong's
        normalised spelling (kong/db/dao/targets.lua), `weight` 0..65535 (0 included). Pages are
        offsets into a list that may change between two reads: a target seen twice counts once."""
        unique: dict = {}
        for entity in self.list(f"/upstreams/{_q(upstream)}/targets"):
            unique.setdefault(entity.get("target"), entity)  # the first (newest) of each
        return builtins.list(unique.values())

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

    def configuration_hash(self) -> str | None:
        """The hash of the declarative config a DB-less node runs (GET /status,
        kong/api/routes/health.lua); None where Kong gives none (a node with a database)."""
        _, status = self.request("GET", "/status")
        found = status.get("configuration_hash") if isinstance(status, dict) else None
        return found if isinstance(found, str) else None


def new_upstream(name: str) -> dict:
    """An upstream pgwshard-sync creates. `hash_on: path` (Kong then uses consistent-hashing):
    a push Kong lets through without the plugin (the plugin server down, README "When the plugin
    server fails") lands on one target per path (kong/runloop/balancer hashes the path), where
    the rebalancer finds and moves it, not on every target in turn."""
    return {"name": name, "hash_on": "path"}


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


def upstreams_of(doc: Any, source: str) -> list[dict]:
    """The `upstreams` list of a declarative config, checked enough to edit one upstream's
    targets; ValueError naming `source` otherwise (kong/db/schema/others/declarative_config.lua
    wants a mapping whose `upstreams` is a list of upstream records)."""
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: expected a declarative config (a mapping), got {type(doc).__name__}")
    upstreams = doc.setdefault("upstreams", [])
    if not isinstance(upstreams, list):
        raise ValueError(f"{source}: upstreams: expected a list, got {type(upstreams).__name__}")
    for i, upstream in enumerate(upstreams):
        if not isinstance(upstream, dict) or not isinstance(upstream.get("name"), str):
            raise ValueError(f"{source}: upstreams[{i}]: expected a mapping with a name, got {upstream!r:.60}")
        if not isinstance(upstream.get("targets", []), list):
            raise ValueError(f"{source}: upstreams[{i}].targets: expected a list")
    return upstreams
