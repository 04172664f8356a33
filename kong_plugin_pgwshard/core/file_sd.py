"""Prometheus' file_sd JSON format, the one place pgwshard reads and writes it.

pgwshard-sync writes the healthy set as one target group; the plugin's `membership: file` and
`pgwshard locate|rebalance --nodes-file` read it back. Pure: text in, members out, and back.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from .ring import Member

__all__ = ["parse_file_sd", "read_file_sd", "render_file_sd"]


def parse_file_sd(text: str, source: str = "file_sd") -> list[Member]:
    """Members listed in file_sd JSON (every group's targets); ValueError names `source`."""
    groups = json.loads(text)
    if not isinstance(groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("targets", []), list) for g in groups):
        raise ValueError(f"{source}: expected a JSON list of target groups, each with a list of targets")
    return [Member.parse(str(target)) for group in groups for target in group.get("targets", [])]


def read_file_sd(path: str) -> list[Member]:
    """parse_file_sd of a file (OSError when it cannot be read)."""
    with open(path, encoding="utf-8") as f:
        return parse_file_sd(f.read(), path)


def render_file_sd(members: Iterable[Member], labels: Mapping[str, str]) -> str:
    """One target group of the members that take groups (weight > 0), sorted, with `labels`."""
    targets = [m.name for m in sorted(members) if m.weight > 0]
    return json.dumps([{"targets": targets, "labels": dict(labels)}], indent=2) + "\n"
