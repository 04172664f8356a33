"""Sinks: Kong's Admin API (DB mode), DB-less /config, and the file_sd file."""
from __future__ import annotations

import json
import logging
import threading

import pytest
import yaml

from kong_plugin_pgwshard.clients.kong import KongAdmin
from kong_plugin_pgwshard.core.ring import Member
from kong_plugin_pgwshard.errors import UpstreamError
from kong_plugin_pgwshard.sync.settings import FileSdSettings, KongSettings, Settings
from kong_plugin_pgwshard.sync.sinks import (
    AdminApiSink,
    DeclarativeSink,
    FileSdSink,
    sinks_from_settings,
)
from tests.support.kong_admin_double import kong_target

A, B, C = (Member.parse(f"10.0.0.{i}:9091") for i in (1, 2, 3))


def test_admin_sink_creates_the_upstream_and_makes_targets_equal(kong_admin):
    kong = kong_admin()
    sink = AdminApiSink(KongAdmin(kong.url), "pushgateways")
    sink.apply([A, B])
    assert kong.target_names("pushgateways") == [A.name, B.name]
    assert ("POST", "/upstreams") in kong.writes


def test_an_upstream_pgwshard_creates_hashes_on_the_path_and_one_that_exists_is_left_alone(kong_admin, tmp_path):
    """As kong/kong.yml ships it: a push Kong lets through without the plugin lands on one target
    per path (it went round-robin over every target, a copy of the group on each in turn)."""
    kong = kong_admin()
    AdminApiSink(KongAdmin(kong.url), "pushgateways").apply([A, B])
    created = kong.upstreams["pushgateways"]
    assert (created["hash_on"], created["algorithm"]) == ("path", "consistent-hashing")
    kong.add_upstream("theirs", hash_on="header", hash_on_header="x-tenant")
    AdminApiSink(KongAdmin(kong.url), "theirs").apply([A])
    assert kong.upstreams["theirs"]["hash_on"] == "header"  # the owner's choice stays

    node = kong_admin(db_less=True)
    declarative = tmp_path / "kong.yml"
    declarative.write_text("_format_version: '3.0'\nupstreams: [{name: theirs, hash_on: ip}]\n")
    DeclarativeSink([KongAdmin(node.url)], str(declarative), "pushgateways").apply([A])
    upstreams = {u["name"]: u for u in node.config["upstreams"]}
    assert upstreams["pushgateways"]["hash_on"] == "path" and upstreams["theirs"] == {"name": "theirs", "hash_on": "ip"}


def test_admin_sink_makes_the_fewest_writes(kong_admin):
    kong = kong_admin()
    kong.add_upstream("pushgateways", [A.name, B.name])
    sink = AdminApiSink(KongAdmin(kong.url), "pushgateways")
    sink.apply([A, B])
    assert kong.writes == []  # equal: nothing written
    sink.apply([A, B, C])
    assert kong.writes == [("POST", "/upstreams/pushgateways/targets")]
    kong.writes.clear()
    sink.apply([B, C])
    assert [w[0] for w in kong.writes] == ["DELETE"] and kong.target_names("pushgateways") == [B.name, C.name]
    kong.writes.clear()
    sink.apply([B, Member(C.host, C.port, 50)])
    assert [w[0] for w in kong.writes] == ["PATCH"]
    assert kong.targets["pushgateways"][-1]["weight"] == 50


def test_admin_sink_reads_every_page(kong_admin):
    kong = kong_admin()
    many = [Member("10.1.%d.%d" % (i // 200, i % 200 + 1), 9091) for i in range(2500)]
    kong.add_upstream("pushgateways", [m.name for m in many])
    AdminApiSink(KongAdmin(kong.url), "pushgateways").apply(many[:-1])
    assert [w[0] for w in kong.writes] == ["DELETE"]
    assert kong.target_names("pushgateways") == sorted(m.name for m in many[:-1])
    assert len([r for r in kong.requests if r[0] == "GET"]) == 1 + 3  # the upstream, then pages of 1000


def test_admin_token_is_sent_and_never_logged(kong_admin, caplog):
    kong = kong_admin(token="s3cr3t-admin-token")
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(UpstreamError) as err:
            AdminApiSink(KongAdmin(kong.url, "wrong-token"), "pushgateways").apply([A])
        AdminApiSink(KongAdmin(kong.url, "s3cr3t-admin-token"), "pushgateways").apply([A])
    assert "401" in str(err.value) and "wrong-token" not in str(err.value)
    assert kong.target_names("pushgateways") == [A.name]
    assert "s3cr3t-admin-token" not in caplog.text


def test_db_less_kong_refuses_entity_writes_so_the_declarative_sink_is_needed(kong_admin, tmp_path):
    kong = kong_admin(db_less=True)
    kong.add_upstream("pushgateways")  # POST /upstreams would be refused the same way
    with pytest.raises(UpstreamError, match="405.*cannot create 'targets'.*kong.mode: declarative"):
        AdminApiSink(KongAdmin(kong.url), "pushgateways").apply([A])


def test_the_admin_sink_pointed_at_a_status_api_says_so(kong_admin):
    status = kong_admin(status_api=True)
    with pytest.raises(UpstreamError, match="read-only Kong API"):
        AdminApiSink(KongAdmin(status.url), "pushgateways").apply([A])


V6 = [Member.parse("[::1]:9091"), Member.parse("[2001:DB8::7]:9091")]


def test_ipv6_members_that_kong_respells_cost_no_write_once_there(kong_admin):
    kong = kong_admin()
    sink = AdminApiSink(KongAdmin(kong.url), "pushgateways")
    sink.apply(V6)
    assert kong.target_names("pushgateways") == sorted(kong_target(m.name) for m in V6)
    kong.writes.clear()
    sink.apply(V6)  # Kong lists [0000:...:0001]:9091: the same member, nothing re-POSTed (no 409)
    assert kong.writes == []
    sink.apply(V6[:1])
    assert kong.target_names("pushgateways") == [kong_target(V6[0].name)]


def _user_config(tmp_path):
    path = tmp_path / "kong.yml"
    path.write_text(yaml.safe_dump({
        "_format_version": "3.0",
        "upstreams": [{"name": "pushgateways", "targets": [{"target": "old:9091"}]}, {"name": "other"}],
        "services": [{"name": "pushgateway", "host": "pushgateways", "routes": [{"paths": ["/"]}],
                      "plugins": [{"name": "pgwshard", "config": {"membership": "upstream", "upstream": "pushgateways"}}]}],
    }))
    return path


def test_declarative_sink_replaces_only_the_targets_on_every_node(kong_admin, tmp_path):
    nodes = [kong_admin(db_less=True), kong_admin(db_less=True)]
    path = _user_config(tmp_path)
    sink = DeclarativeSink([KongAdmin(n.url) for n in nodes], str(path), "pushgateways")
    user_text = path.read_text()
    doc = sink.render([A, B])
    original = yaml.safe_load(user_text)
    assert doc["services"] == original["services"] and doc["upstreams"][1] == {"name": "other"}
    sink.apply([A, B])
    for node in nodes:
        assert node.target_names("pushgateways") == [A.name, B.name]
        # what Kong loaded keeps the user's other entities exactly as written
        assert node.config["services"] == original["services"] and node.config["_format_version"] == "3.0"
        assert node.config["upstreams"][1] == {"name": "other"}
    assert path.read_text() == user_text  # the user's file is read, never rewritten
    sink.apply([A, B])  # unchanged: check_hash makes Kong answer 304, nothing reloaded
    assert all(n.writes == [("POST", "/config")] for n in nodes)


def test_declarative_sink_one_failing_node_does_not_block_the_others(kong_admin, tmp_path):
    good, bad = kong_admin(db_less=True), kong_admin(db_less=True)
    bad.stop()
    sink = DeclarativeSink([KongAdmin(bad.url, timeout=1), KongAdmin(good.url)], str(_user_config(tmp_path)),
                           "pushgateways")
    with pytest.raises(UpstreamError, match=bad.url):
        sink.apply([C])
    assert good.target_names("pushgateways") == [C.name]


def test_declarative_sink_leaves_a_busy_node_alone_for_its_retry_after(kong_admin, tmp_path):
    busy, free = kong_admin(db_less=True), kong_admin(db_less=True)
    busy.busy = 7  # kong/api/routes/config.lua: 429, Retry-After: 7
    now = [100.0]
    sink = DeclarativeSink([KongAdmin(busy.url), KongAdmin(free.url)], str(_user_config(tmp_path)),
                           "pushgateways", clock=lambda: now[0])
    with pytest.raises(UpstreamError, match="429"):
        sink.apply([A])
    assert free.target_names("pushgateways") == [A.name] and busy.target_names("pushgateways") == []
    posts = lambda: len([r for r in busy.requests if r[0] == "POST"])  # noqa: E731
    assert posts() == 1
    busy.busy = None
    now[0] += 6.9  # the daemon retries within the 7 s: the busy node is not asked again
    with pytest.raises(UpstreamError, match="next try in 0.1 s"):
        sink.apply([A])
    assert posts() == 1
    now[0] += 0.2
    sink.apply([A])  # after Retry-After: loaded; the other node answers 304
    assert busy.target_names("pushgateways") == [A.name] and posts() == 2
    assert free.writes == [("POST", "/config")]


def test_declarative_sink_notices_a_node_that_reloaded_its_own_file(kong_admin, tmp_path):
    # Kong 3.9.3's `kong reload` loads declarative_config again (tests/kong/test_kong_membership.py)
    node, other = kong_admin(db_less=True), kong_admin(db_less=True)
    sink = DeclarativeSink([KongAdmin(node.url), KongAdmin(other.url)], str(_user_config(tmp_path)), "pushgateways")
    sink.apply([A])
    assert sink.drifted() is False
    node.config_hash = "the file's hash"  # what a reload leaves: another config
    assert sink.drifted() is True
    sink.apply([A])  # loaded again (201: the node's hash is not ours)
    assert node.target_names("pushgateways") == [A.name] and sink.drifted() is False
    other.stop()  # a node that does not answer is no drift: the next apply reports it
    assert sink.drifted() is False


def test_file_sd_sink_writes_atomically(tmp_path):
    path = tmp_path / "sd" / "pushgateways.json"
    sink = FileSdSink(FileSdSettings(str(path), {"env": "test"}))
    sink.apply([A])
    seen, stop = [], threading.Event()

    def reader():
        for _ in range(20_000):  # bounded
            if stop.is_set():
                return
            seen.append(json.loads(path.read_text()))  # a partial file would not parse

    t = threading.Thread(target=reader)
    t.start()
    for i in range(300):
        sink.apply([A, B] if i % 2 else [C])
    stop.set()
    t.join(10)
    assert seen and all(g[0]["labels"] == {"env": "test"} for g in seen)
    assert {tuple(g[0]["targets"]) for g in seen} <= {(A.name,), (A.name, B.name), (C.name,)}


def test_a_malformed_declarative_file_is_an_error_and_nothing_is_posted(kong_admin, tmp_path):
    kong = kong_admin(db_less=True)
    path = tmp_path / "kong.yml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(UpstreamError, match="kong.yml"):
        DeclarativeSink([KongAdmin(kong.url)], str(path), "pushgateways").apply([A])
    assert kong.requests == []  # Kong keeps the config it has


def test_a_failed_file_sd_write_leaves_no_temp_file(tmp_path):
    path = tmp_path / "pushgateways.json"
    path.mkdir()  # a directory where the file should go: the rename fails
    with pytest.raises(UpstreamError, match="cannot write"):
        FileSdSink(FileSdSettings(str(path))).apply([A])
    assert [p.name for p in tmp_path.iterdir()] == ["pushgateways.json"]


def test_sinks_follow_the_settings(tmp_path):
    base = dict(pushgateways=(A,))
    [admin] = sinks_from_settings(Settings(**base, kong=KongSettings(admin_url="http://127.0.0.1:1", upstream="u")))
    assert isinstance(admin, AdminApiSink) and admin.upstream == "u"
    declarative, file_sd = sinks_from_settings(Settings(
        **base, kong=KongSettings(mode="declarative", declarative_file="kong.yml",
                                  nodes=("http://127.0.0.1:1", "http://127.0.0.1:2")),
        file_sd=FileSdSettings(str(tmp_path / "sd.json"))))
    assert isinstance(declarative, DeclarativeSink) and [n.url for n in declarative.nodes] == [
        "http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert isinstance(file_sd, FileSdSink)
    assert sinks_from_settings(Settings(**base)) == []
