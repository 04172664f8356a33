"""Prometheus' file_sd JSON format, the one place pgwshard reads and writes it.

pgwshard-sync writes the healthy set as target groups; the plugin's `membership: file` and
`pgwshard locate|rebalance --nodes-file` read it back. Pure: text in, members out, and back.

A member's weight travels in the `__meta_pgwshard_weight` label of its group (one group per
weight other than 100; the members of weight 100 form the first group, without it), so every
reader builds the ring pgwshard-sync and Kong use. Prometheus drops `__meta_` labels after
relabelling: scraped series do not gain it.

Pushgateways pgwshard-sync knows (configured, or once in the ring) but that are out of the ring
now (failing their checks, held down) are listed in a last group labelled
`__meta_pgwshard_in_ring: "false"`: no reader's ring takes them, `pgwshard status --nodes-file`
shows them as missing, and Prometheus scrapes them (their `up` says whether they answer, and any
groups they still hold stay visible until the rebalancer has moved them).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from .members import DEFAULT_WEIGHT, Member

WEIGHT_LABEL = "__meta_pgwshard_weight"
IN_RING_LABEL = "__meta_pgwshard_in_ring"

__all__ = ["parse_file_sd", "parse_file_sd_outside", "read_file_sd", "read_file_sd_outside", "render_file_sd"]


def parse_file_sd(text: str, source: str = "file_sd") -> list[Member]:
    """The ring's members listed in file_sd JSON (every group's targets but those out of the
    ring); ValueError names `source`."""
    return _parse(text, source)[0]


def parse_file_sd_outside(text: str, source: str = "file_sd") -> tuple[list[Member], list[Member]]:
    """The ring's members, and the known pushgateways listed as out of the ring."""
    return _parse(text, source)


def _parse(text: str, source: str) -> tuple[list[Member], list[Member]]:
    groups = json.loads(text)
    if not isinstance(groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("targets", []), list) for g in groups):
        raise ValueError(f"{source}: expected a JSON list of target groups, each with a list of targets")
    members: list[Member] = []
    outside: list[Member] = []
    for group in groups:
        labels = group.get("labels") or {}
        if not isinstance(labels, dict):
            raise ValueError(f"{source}: labels: expected a mapping, got {labels!r:.60}")
        weight = labels.get(WEIGHT_LABEL, str(DEFAULT_WEIGHT))
        if not isinstance(weight, str) or not weight.isdigit():
            raise ValueError(f"{source}: {WEIGHT_LABEL}: expected a whole number as a string, got {weight!r}")
        listed = [Member.parse(str(target), int(weight)) for target in group.get("targets", [])]
        (outside if labels.get(IN_RING_LABEL) == "false" else members).extend(listed)
    return members, outside


def read_file_sd(path: str) -> list[Member]:
    """parse_file_sd of a file (OSError when it cannot be read)."""
    with open(path, encoding="utf-8") as f:
        return parse_file_sd(f.read(), path)


def read_file_sd_outside(path: str) -> tuple[list[Member], list[Member]]:
    """parse_file_sd_outside of a file (OSError when it cannot be read)."""
    with open(path, encoding="utf-8") as f:
        return parse_file_sd_outside(f.read(), path)


def render_file_sd(members: Iterable[Member], labels: Mapping[str, str], outside: Iterable[Member] = ()) -> str:
    """The members, sorted, with `labels`: those of weight 100 in the first group (always there,
    empty when none), each other weight in a group of its own. A drained member (weight 0) is
    listed too: Prometheus keeps scraping it while the rebalancer moves its groups away (every
    reader's ring leaves it out, as Kong's balancer does a target of weight 0). `outside`: known
    pushgateways out of the ring, in a last group labelled as such (only when there are any)."""
    by_weight: dict[int, list[str]] = {DEFAULT_WEIGHT: []}
    for m in sorted(members):
        by_weight.setdefault(m.weight, []).append(m.name)
    groups = [{"targets": by_weight.pop(DEFAULT_WEIGHT), "labels": dict(labels)}]
    groups += [{"targets": targets, "labels": {**labels, WEIGHT_LABEL: str(weight)}}
               for weight, targets in sorted(by_weight.items())]
    away = sorted({m.name for m in outside})
    if away:
        groups.append({"targets": away, "labels": {**labels, IN_RING_LABEL: "false"}})
    return json.dumps(groups, indent=2) + "\n"
