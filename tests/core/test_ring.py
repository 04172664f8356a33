"""The ring: ketama placement that every process agrees on, and minimal movement."""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from kong_plugin_pgwshard.core.ring import Member, Ring
from kong_plugin_pgwshard.errors import NoMembersError

VECTORS = json.loads((Path(__file__).parents[1] / "vectors/ring.json").read_text())
KEYS = [f'{{instance="i{i}",job="batch"}}' for i in range(3000)]


def ketama_reference(names: list[str], weights: dict[str, int], key: str) -> str:
    """libketama's placement, written from its description: per server
    floor(40 * n * weight / total) MD5 digests of "name-i", 4 points per digest (little-endian
    words), and a key goes to the first point at or after the key's own MD5 word."""
    total = sum(weights.values())
    points = []
    for name in names:
        for i in range(math.floor(40 * len(names) * weights[name] / total)):
            digest = hashlib.md5(f"{name}-{i}".encode()).digest()
            for h in range(4):
                points.append((int.from_bytes(digest[h * 4:h * 4 + 4], "little"), name))
    points.sort()
    word = int.from_bytes(hashlib.md5(key.encode()).digest()[:4], "little")
    index = bisect.bisect_left([p for p, _ in points], word)
    return points[index % len(points)][1]


def test_placement_is_ketama():
    members = [Member.parse(n) for n in VECTORS["members"]]
    ring = Ring(members)
    names = [m.name for m in members]
    for key in KEYS[:500]:
        assert ring.owner(key).name == ketama_reference(names, {n: 100 for n in names}, key)


def test_golden_owners_never_change():
    ring = Ring(Member.parse(n) for n in VECTORS["members"])
    for key, owner in VECTORS["owners"].items():
        assert ring.owner(key).name == owner, key


def test_same_owner_in_every_process_whatever_the_hash_seed():
    script = ("from kong_plugin_pgwshard.core.ring import Ring, Member; import json; "
              "r = Ring(Member.parse(n) for n in ['a:1', 'b:2', 'c:3']); "
              "print(json.dumps([r.owner(f'k{i}').name for i in range(200)]))")
    runs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("0", "1", "4242")}
    assert len(runs) == 1


def test_removing_a_member_moves_only_its_keys():
    members = [Member.parse(f"10.0.0.{i}:9091") for i in range(1, 6)]
    before, after = Ring(members), Ring(members[:-1])
    for key in KEYS:
        if before.owner(key) != members[-1]:
            assert after.owner(key) == before.owner(key)


def test_adding_a_member_moves_keys_only_to_it():
    members = [Member.parse(f"10.0.0.{i}:9091") for i in range(1, 5)]
    new = Member.parse("10.0.0.9:9091")
    before, after = Ring(members), Ring([*members, new])
    moved = [k for k in KEYS if before.owner(k) != after.owner(k)]
    assert all(after.owner(k) == new for k in moved)
    assert 0.1 < len(moved) / len(KEYS) < 0.3  # about 1/5


@pytest.mark.parametrize("weights", [
    {"10.0.0.1:9091": 300, "10.0.0.2:9091": 100},
    {"10.0.0.1:9091": 100, "10.0.0.2:9091": 50, "10.0.0.3:9091": 200, "10.0.0.4:9091": 0},
    {"pgw-a:9091": 1, "pgw-b:9091": 1000},
])
def test_weighted_placement_is_ketama_with_its_weights(weights):
    """Every owner is the one libketama's weighted placement gives (not just "the heavier one
    gets more") over the members that take groups: weight 0 drains a member, as Kong's balancer
    leaves out a target of weight 0, so it is no server of the ring at all."""
    ring = Ring(Member.parse(name, weight) for name, weight in weights.items())
    serving = {Member.parse(name).name: weight for name, weight in weights.items() if weight > 0}
    for key in KEYS[:500]:
        assert ring.owner(key).name == ketama_reference(list(serving), serving, key)


def test_weights_skew_load():
    ring = Ring([Member("a", 1, 300), Member("b", 1, 100)])
    load = Counter(ring.owner(k).host for k in KEYS)
    assert 2.0 < load["a"] / load["b"] < 4.5  # what a user sees; the placement itself is checked above


def test_weight_zero_takes_no_groups():
    ring = Ring([Member("a", 1, 100), Member("b", 1, 0)])
    assert {ring.owner(k).host for k in KEYS[:300]} == {"a"}
    assert len(ring) == 2


def test_empty_ring_says_so():
    with pytest.raises(NoMembersError, match="no healthy pushgateway"):
        Ring().owner("k")
    with pytest.raises(NoMembersError):
        Ring([Member("a", 1, 0)]).owner("k")


def test_equality_and_duplicates():
    assert Ring([Member.parse("a:1"), Member.parse("b:2")]) == Ring([Member.parse("b:2"), Member.parse("a:1")])
    assert len(Ring([Member.parse("a:1"), Member.parse("a:1")])) == 1
    assert Ring([Member("a", 1, 100)]) != Ring([Member("a", 1, 50)])


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9091", Member("127.0.0.1", 9091)),
    ("pgw-1.example:80", Member("pgw-1.example", 80)),
    ("[::1]:9091", Member("::1", 9091)),
])
def test_member_parse(text, expected):
    assert Member.parse(text) == expected
    assert Member.parse(expected.name) == expected


@pytest.mark.parametrize("text", ["host", "host:", ":9091", "host:99999", "a b:1", "::1:9091", "http://h:1"])
def test_member_parse_rejects(text):
    with pytest.raises(ValueError, match="host:port|port"):
        Member.parse(text)
