"""Weights reach every reader of membership: `--nodes host:port=weight` and the file_sd file
pgwshard-sync writes build the same ring as the configured members (weight 0: owns nothing)."""
from __future__ import annotations

import json

import pytest

from kong_plugin_pgwshard.core.file_sd import (
    IN_RING_LABEL,
    WEIGHT_LABEL,
    parse_file_sd,
    parse_file_sd_outside,
    render_file_sd,
)
from kong_plugin_pgwshard.core.grouping import GroupingKey
from kong_plugin_pgwshard.core.members import Member
from kong_plugin_pgwshard.core.ring import Ring

MEMBERS = [Member.parse("10.0.0.1:9091"), Member.parse("10.0.0.2:9091", 50),
           Member.parse("10.0.0.3:9091", 0), Member.parse("[::1]:9091", 300)]
KEYS = [GroupingKey.from_labels({"job": "w", "instance": f"i{n}"}) for n in range(300)]


def owners(ring: Ring) -> list[str]:
    return [ring.owner(k).name for k in KEYS]


def test_file_sd_carries_weights_and_keeps_drained_members_scraped_but_out_of_the_ring():
    text = render_file_sd(MEMBERS, {"env": "prod"})
    groups = json.loads(text)
    assert groups[0] == {"targets": ["10.0.0.1:9091"], "labels": {"env": "prod"}}  # weight 100: no label
    assert {g["labels"].get(WEIGHT_LABEL) for g in groups[1:]} == {"0", "50", "300"}
    read = parse_file_sd(text)
    assert sorted(read) == sorted(MEMBERS)  # Prometheus scrapes a drained one while its groups move
    assert "10.0.0.3:9091" not in owners(Ring(read))  # ... and owns nothing
    # a ring built from the file puts every key where the configured members do (not on weights of 100)
    assert owners(Ring(read)) == owners(Ring(MEMBERS))
    assert owners(Ring(read)) != owners(Ring(Member(m.host, m.port) for m in read))


def test_every_member_of_weight_100_keeps_the_old_one_group_shape():
    text = render_file_sd([Member.parse("10.0.0.2:9091"), Member.parse("10.0.0.1:9091")], {})
    assert json.loads(text) == [{"targets": ["10.0.0.1:9091", "10.0.0.2:9091"], "labels": {}}]
    assert json.loads(render_file_sd([], {})) == [{"targets": [], "labels": {}}]


def test_known_members_out_of_the_ring_are_listed_apart_and_no_ring_takes_them():
    dead = Member.parse("10.0.0.9:9091")
    text = render_file_sd(MEMBERS, {"env": "prod"}, outside=[dead])
    assert json.loads(text)[-1] == {"targets": ["10.0.0.9:9091"], "labels": {"env": "prod", IN_RING_LABEL: "false"}}
    assert sorted(parse_file_sd(text)) == sorted(MEMBERS)  # the plugin's ring: as without it
    assert parse_file_sd_outside(text) == (parse_file_sd(text), [dead])
    assert render_file_sd(MEMBERS, {}, outside=[]) == render_file_sd(MEMBERS, {})  # none: the old shape


@pytest.mark.parametrize("labels", [{WEIGHT_LABEL: "heavy"}, {WEIGHT_LABEL: 50}, {WEIGHT_LABEL: "-1"}, ["x"]])
def test_a_bad_weight_label_is_an_error_naming_the_file(labels):
    with pytest.raises(ValueError, match="members.json"):
        parse_file_sd(json.dumps([{"targets": ["10.0.0.1:9091"], "labels": labels}]), "members.json")


def test_nodes_take_an_optional_weight():
    assert Member.parse_weighted("10.0.0.1:9091") == Member.parse("10.0.0.1:9091")
    assert Member.parse_weighted(" [::1]:9091=0 ") == Member.parse("[::1]:9091", 0)
    assert Member.parse_weighted("pgw-1:9091=250").weight == 250
    for bad in ("10.0.0.1:9091=", "10.0.0.1:9091=x", "10.0.0.1:9091=-1", "10.0.0.1:9091=70000", "=5"):
        with pytest.raises(ValueError):
            Member.parse_weighted(bad)
