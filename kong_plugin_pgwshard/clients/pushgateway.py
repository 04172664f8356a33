"""The few Pushgateway calls the rebalancer needs: list groups, PUT one, DELETE one, health.

Plain urllib: these calls run on the control path (the sync daemon, the CLI), never on a request.
Every failure, from a refused connection to a body that is not the documented JSON, is raised as
UpstreamError naming the instance, so callers handle one error type.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.grouping import GroupingKey
from ..errors import GroupingKeyError, UpstreamError

# Pushgateway keeps these per group itself; it ignores them in a push.
PUSHGATEWAY_FAMILIES = frozenset({"push_time_seconds", "push_failure_time_seconds"})


@dataclass(frozen=True)
class Group:
    """One group as an instance holds it."""

    key: GroupingKey
    push_time: float  # push_time_seconds: when this instance last stored the group (0 if never)
    families: Mapping[str, Any] = field(repr=False)  # name -> family, Pushgateway's own left out


class PushgatewayClient:
    """HTTP client for one pushgateway, addressed as "host:port" (or a base URL)."""

    def __init__(self, address: str, timeout: float = 5.0):
        self.base_url = address.rstrip("/") if "://" in address else f"http://{address}"
        self.name = address
        self.timeout = timeout

    def groups(self) -> list[Group]:
        """Every group the instance holds, from GET /api/v1/metrics."""
        body = self._call("GET", "/api/v1/metrics")
        try:
            data = json.loads(body)["data"]
            return [_group(entry) for entry in data]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UpstreamError(f"{self.name}: /api/v1/metrics is not the expected JSON: {exc!r}") from None

    def put_group(self, key: GroupingKey, text: str) -> None:
        """Replace the group with the families in text (exposition format)."""
        self._call("PUT", key.path(), text.encode("utf-8"))

    def delete_group(self, key: GroupingKey) -> None:
        """Delete the group; Pushgateway queues it after earlier writes (202)."""
        self._call("DELETE", key.path())

    def healthy(self) -> bool:
        """True if /-/healthy answers 200; false on any error."""
        try:
            self._call("GET", "/-/healthy")
            return True
        except UpstreamError:
            return False

    def _call(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.base_url + path, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            detail = err.read(500).decode("utf-8", "replace").strip()
            raise UpstreamError(f"{self.name}: {method} {path} answered {err.code}: {detail}") from None
        except (OSError, ValueError) as exc:  # refused, reset, timed out, bad URL
            raise UpstreamError(f"{self.name}: {method} {path} failed: {exc}") from None


def _group(entry: Mapping[str, Any]) -> Group:
    try:
        key = GroupingKey.from_labels(entry["labels"])
    except GroupingKeyError as exc:
        raise ValueError(f"group {entry['labels']!r}: {exc}") from None
    # Every group lists push_time_seconds; if one did not, treat it as never pushed (oldest).
    stamp = entry.get("push_time_seconds")
    push_time = float(stamp["metrics"][0]["value"]) if stamp else 0.0
    families = {name: family for name, family in entry.items()
                if isinstance(family, dict) and "metrics" in family and name not in PUSHGATEWAY_FAMILIES}
    return Group(key=key, push_time=push_time, families=families)
