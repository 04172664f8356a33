"""pgwshard: shard Prometheus Pushgateway pushes by grouping key behind Kong.

The names below are imported when first used: `pgwshard-plugin` imports this package before it
binds Kong's socket (plugin/start.py), and must not pay for the ring's imports first.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "GroupingKey": ".core.grouping", "parse_push_path": ".core.grouping",
    "Member": ".core.ring", "Ring": ".core.ring",
    "ConfigError": ".errors", "GroupingKeyError": ".errors", "NoMembersError": ".errors",
    "PgwshardError": ".errors", "UpstreamError": ".errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
