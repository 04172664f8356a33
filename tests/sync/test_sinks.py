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

A, B, C = (Member.parse(f"10.0.0.{i}:9091") for i in (1, 2, 3))


def test_admin_sink_creates_the_upstream_and_makes_targets_equal(kong_admin):
    kong = kong_admin()
    sink = AdminApiSink(KongAdmin(kong.url), "pushgateways")
    sink.apply([A, B])
    assert kong.target_names("pushgateways") == [A.name, B.name]
    assert ("POST", "/upstreams") in kong.writes


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
    assert kong.writes == [("DELETE", f"/upstreams/pushgateways/targets/{A.name}")]
    kong.writes.clear()
    sink.apply([B, Member(C.host, C.port, 50)])
    assert [w[0] for w in kong.writes] == ["PATCH"]
    assert kong.targets["pushgateways"][-1]["weight"] == 50


def test_admin_sink_reads_every_page(kong_admin):
    kong = kong_admin()
    many = [Member("10.1.%d.%d" % (i // 200, i % 200 + 1), 9091) for i in range(2500)]
    kong.add_upstream("pushgateways", [m.name for m in many])
    AdminApiSink(KongAdmin(kong.url), "pushgateways").apply(many[:-1])
    assert kong.writes == [("DELETE", f"/upstreams/pushgateways/targets/{many[-1].name}")]


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
    with pytest.raises(UpstreamError, match="405.*kong.mode: declarative"):
        AdminApiSink(KongAdmin(kong.url), "pushgateways").apply([A])


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
