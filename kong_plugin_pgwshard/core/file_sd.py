"""Prometheus' file_sd JSON format, the one place pgwshard reads and writes it.

pgwshard-sync writes the healthy set as target groups; the plugin's `membership: file` and
`pgwshard locate|rebalance --nodes-file` read it back. Pure: text in, members out, and back.

A member's weight travels in the `__meta_pgwshard_weight` label of its group (one group per
weight other than 100; the members of weight 100 form the first group, without it), so every
reader builds the ring pgwshard-sync and Kong use. Prometheus drops `__meta_` labels after
relabelling: scraped series do not gain it.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from .members import DEFAULT_WEIGHT, Member

WEIGHT_LABEL = "__meta_pgwshard_weight"

__all__ = ["parse_file_sd", "read_file_sd", "render_file_sd"]


def parse_file_sd(text: str, source: str = "file_sd") -> list[Member]:
    """Members listed in file_sd JSON (every group's targets); ValueError names `source`."""
    groups = json.loads(text)
    if not isinstance(groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("targets", []), list) for g in groups):
        raise ValueError(f"{source}: expected a JSON list of target groups, each with a list of targets")
    members = []
    for group in groups:
        labels = group.get("labels") or {}
        if not isinstance(labels, dict):
            raise ValueError(f"{source}: labels: expected a mapping, got {labels!r:.60}")
        weight = labels.get(WEIGHT_LABEL, str(DEFAULT_WEIGHT))
        if not isinstance(weight, str) or not weight.isdigit():
            raise ValueError(f"{source}: {WEIGHT_LABEL}: expected a whole number as a string, got {weight!r}")
        members += [Member.parse(str(target), int(weight)) for target in group.get("targets", [])]
    return members


def read_file_sd(path: str) -> list[Member]:
    """parse_file_sd of a file (OSError when it cannot be read)."""
    with open(path, encoding="utf-8") as f:
        return parse_file_sd(f.read(), path)


def render_file_sd(members: Iterable[Member], labels: Mapping[str, str]) -> str:
    """The members, sorted, with `labels`: those of weight 100 in the first group (always there,
    empty when none), each other weight in a group of its own. A drained member (weight 0) is
    listed too: Prometheus keeps scraping it while the rebalancer moves its groups away (every
    reader's ring leaves it out, as Kong's balancer does a target of weight 0)."""
    by_weight: dict[int, list[str]] = {DEFAULT_WEIGHT: []}
    for m in sorted(members):
        by_weight.setdefault(m.weight, []).append(m.name)
    groups = [{"targets": by_weight.pop(DEFAULT_WEIGHT), "labels": dict(labels)}]
    groups += [{"targets": targets, "labels": {**labels, WEIGHT_LABEL: str(weight)}}
               for weight, targets in sorted(by_weight.items())]
    return json.dumps(groups, indent=2) + "\n"
