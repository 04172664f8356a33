"""The few Pushgateway calls the rebalancer needs: list groups, PUT one, DELETE one, health.

These calls run on the control path (the sync daemon, the CLI), never on a request, through
clients/http.py: every failure, from a refused connection to a body that is not the documented
JSON, is raised as an UpstreamError (errors.py's tree) naming the instance.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.grouping import GroupingKey
from ..errors import GroupingKeyError, ProtocolError, UpstreamError
from .http import HttpClient, Timeouts

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

    def __init__(self, address: str, timeout: float | Timeouts = 5.0, proxy: str | None = None,
                 pool_size: int = 4):
        """pool_size: connections kept for threads calling at once (the delete API's)."""
        self.base_url = address.rstrip("/") if "://" in address else f"http://{address}"
        self.name = address
        self._http = HttpClient(self.base_url, name=address, timeout=timeout, proxy=proxy, pool_size=pool_size)

    def close(self) -> None:
        self._http.close()

    def groups(self) -> list[Group]:
        """Every group the instance holds, from GET /api/v1/metrics."""
        body = self._http.request("GET", "/api/v1/metrics", ok=(200,)).json()
        try:
            return [_group(entry) for entry in body["data"]]
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
            raise ProtocolError(f"{self.name}: /api/v1/metrics is not the expected JSON: {exc!r}",
                                target=self.name) from exc

    def put_group(self, key: GroupingKey, text: str) -> None:
        """Replace the group with the families in text (exposition format)."""
        self._http.request("PUT", key.path(), data=text.encode("utf-8"), ok=(200, 202),
                           headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def delete_group(self, key: GroupingKey) -> None:
        """Delete the group; Pushgateway queues it after earlier writes (202)."""
        self._http.request("DELETE", key.path(), ok=(200, 202))

    def healthy(self) -> bool:
        """True if /-/healthy answers 200; false on any error."""
        try:
            self._http.request("GET", "/-/healthy", ok=(200,))
            return True
        except UpstreamError:
            return False


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
