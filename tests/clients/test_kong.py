"""The Kong Admin API client against a double that answers as Kong 3.9.3 does."""
from __future__ import annotations

import pytest

from kong_plugin_pgwshard.clients.kong import KongAdmin, KongBusy
from kong_plugin_pgwshard.core.ring import Member
from kong_plugin_pgwshard.errors import UpstreamError
from tests.support.kong_admin_double import kong_target

# kong/tools/ip.lua normalize_ip + format_host, as kong/db/dao/targets.lua stores and lists targets
KONG_SPELLINGS = [
    ("[::1]:9091", "[0000:0000:0000:0000:0000:0000:0000:0001]:9091"),
    ("[2001:DB8::1]:9091", "[2001:0db8:0000:0000:0000:0000:0000:0001]:9091"),
    ("[fe80::a:B:c]:80", "[fe80:0000:0000:0000:0000:000a:000b:000c]:80"),
    ("[::]:1", "[0000:0000:0000:0000:0000:0000:0000:0000]:1"),
    ("Host.Example:9091", "Host.Example:9091"),
    ("001.002.003.004:123", "1.2.3.4:123"),
    ("10.0.0.1:09091", "10.0.0.1:9091"),
    ("pgw-1.local.:9091", "pgw-1.local.:9091"),
]


def test_the_double_spells_targets_as_its_reading_of_targets_lua():
    for given, kong in KONG_SPELLINGS:
        assert kong_target(given) == kong, given
    # no port: Kong's default 8000; an address Kong refuses: None
    assert kong_target("127.0.0.1") == "127.0.0.1:8000"
    assert kong_target("::1") == "[0000:0000:0000:0000:0000:0000:0000:0001]:8000"
    for bad in ("1.2.3.256:1", "a..b:1", "host-:1", "[::1]:99999", "[::1]x", "::1::2:3", "ho st:1", "[1.2.3.4]:1"):
        assert kong_target(bad) is None, bad


def test_members_are_named_as_kong_names_its_targets():
    for given, kong in KONG_SPELLINGS:
        assert Member.parse(given).name == kong, given


def test_list_reads_every_page_at_the_size_asked_though_kong_drops_it_from_next(kong_admin):
    kong = kong_admin()
    names = [f"10.2.{i // 250}.{i % 250 + 1}:9091" for i in range(2500)]
    kong.add_upstream("pushgateways", names)
    listed = KongAdmin(kong.url).targets("pushgateways")
    assert sorted(t["target"] for t in listed) == sorted(names)  # every target once
    # kong/api/endpoints.lua: next = /upstreams/<u>/targets?offset=N; without `size` again each
    # later page would be 100 long (16 requests)
    gets = [path for method, path, _ in kong.requests if method == "GET"]
    assert len(gets) == 3


def test_targets_come_newest_first_and_one_per_target(kong_admin):
    kong = kong_admin()
    kong.add_upstream("pgw")
    first = kong.add_target("pgw", "a:1")
    first["created_at"] -= 10
    kong.add_target("pgw", "b:1")["created_at"] -= 5
    kong.add_target("pgw", "a:1", weight=0)  # a newer row for a:1 (as an older Kong left it)
    listed = KongAdmin(kong.url).targets("pgw")
    assert [(t["target"], t["weight"]) for t in listed] == [("a:1", 0), ("b:1", 100)]


def test_ensure_upstream_creates_a_missing_upstream_once(kong_admin):
    kong = kong_admin()
    admin = KongAdmin(kong.url)
    admin.ensure_upstream("pushgateways")
    admin.ensure_upstream("pushgateways")  # exists now: GET answers 200, nothing written
    assert list(kong.upstreams) == ["pushgateways"]
    assert kong.writes == [("POST", "/upstreams")]


def test_target_writes_in_kongs_spelling_and_a_target_already_gone(kong_admin):
    kong = kong_admin()
    admin = KongAdmin(kong.url)
    admin.ensure_upstream("pgw")
    admin.add_target("pgw", "[::1]:9091", 7)
    [target] = admin.targets("pgw")
    assert (target["target"], target["weight"]) == ("[0000:0000:0000:0000:0000:0000:0000:0001]:9091", 7)
    admin.set_weight("pgw", target["id"], 0)
    assert admin.targets("pgw")[0]["weight"] == 0  # Kong lists weight 0 targets too
    admin.delete_target("pgw", "[::1]:9091")  # Kong does not normalise the URL: 404, nothing removed
    assert len(admin.targets("pgw")) == 1
    admin.delete_target("pgw", target["id"])
    admin.delete_target("pgw", target["id"])  # 404: already what we wanted
    assert admin.targets("pgw") == []
    admin.add_target("pgw", "a:1", 100)
    with pytest.raises(UpstreamError, match="409"):  # a duplicate target is refused, not hidden
        admin.add_target("pgw", "a:1", 100)


def test_the_token_travels_in_the_header_and_never_in_errors_or_reprs(kong_admin):
    kong = kong_admin(token="t0ken-value")  # Enterprise RBAC or a proxy: OSS Kong checks nothing
    admin = KongAdmin(kong.url, "t0ken-value")
    admin.ensure_upstream("pgw")
    assert all(headers.get("Kong-Admin-Token") == "t0ken-value" for _, _, headers in kong.requests)
    assert "t0ken" not in repr(admin)
    with pytest.raises(UpstreamError) as err:
        KongAdmin(kong.url, "other-t0ken").targets("pgw")
    assert "401" in str(err.value) and "t0ken" not in str(err.value)


def test_unreachable_and_non_json_admin_apis_are_upstream_errors(kong_admin, pushgateways):
    kong = kong_admin()
    url = kong.url
    kong.stop()
    with pytest.raises(UpstreamError, match=url):
        KongAdmin(url, timeout=1).targets("pgw")
    # a 200 that is not JSON (here a pushgateway's text exposition) is not taken for a page
    [pgw] = pushgateways(1)
    with pytest.raises(UpstreamError, match="not JSON"):
        KongAdmin(pgw.url).request("GET", "/metrics")


def test_db_less_refuses_entity_writes_with_kongs_405_after_its_404s(kong_admin):
    kong = kong_admin(db_less=True)
    kong.add_upstream("pgw", ["a:1"])
    admin = KongAdmin(kong.url)
    with pytest.raises(UpstreamError, match="405.*cannot create 'targets' entities.*set kong.mode: declarative"):
        admin.add_target("pgw", "b:1", 100)
    with pytest.raises(UpstreamError, match="405.*cannot update 'targets'"):
        admin.set_weight("pgw", kong.targets["pgw"][0]["id"], 5)
    admin.delete_target("pgw", "zz:1")  # kong/api/routes/upstreams.lua: an unknown target is 404 first
    with pytest.raises(UpstreamError, match="404"):
        admin.set_weight("pgw", "0b7e5c2a-0000-4000-8000-000000000009", 5)
    with pytest.raises(UpstreamError, match="405.*cannot remove 'targets'"):
        admin.delete_target("pgw", "a:1")
    assert kong.target_names("pgw") == ["a:1"] and kong.writes == []


def test_config_is_loaded_whole_and_304_means_kong_has_it(kong_admin):
    kong = kong_admin(db_less=True)
    admin = KongAdmin(kong.url)
    doc = {"_format_version": "3.0", "upstreams": [{"name": "pgw", "targets": [{"target": "[::1]:1"}]}]}
    assert admin.post_config(doc) is True  # 201 with Kong's flattened entity set
    assert kong.target_names("pgw") == ["[0000:0000:0000:0000:0000:0000:0000:0001]:1"]
    assert admin.post_config(doc) is False  # unchanged: check_hash=1, Kong answers 304
    assert kong.writes == [("POST", "/config")]
    with pytest.raises(UpstreamError, match="400.*invalid declarative configuration"):
        admin.post_config({"upstreams": []})
    assert kong.target_names("pgw") == ["[0000:0000:0000:0000:0000:0000:0000:0001]:1"]  # the loaded one stays
    # why the client sends the config as a string: Kong hashes only a string (never 304 otherwise)
    for _ in range(2):
        assert admin.request("POST", "/config?check_hash=1", doc, ok=(201,))[0] == 201


def test_a_busy_node_answers_429_and_the_client_says_when_to_retry(kong_admin):
    kong = kong_admin(db_less=True)
    kong.busy = 2.5  # kong/api/routes/config.lua: loading a previous configuration
    doc = {"_format_version": "3.0", "upstreams": [{"name": "pgw", "targets": [{"target": "a:1"}]}]}
    with pytest.raises(KongBusy) as err:
        KongAdmin(kong.url).post_config(doc)
    assert err.value.retry_after == 2.5 and "429" in str(err.value)
    assert kong.target_names("pgw") == []
    kong.busy = None
    assert KongAdmin(kong.url).post_config(doc) is True


def test_a_kong_with_a_database_refuses_declarative_config(kong_admin):
    kong = kong_admin()
    with pytest.raises(UpstreamError, match="400.*not use a database.*set kong.mode: admin"):
        KongAdmin(kong.url).post_config({"_format_version": "3.0"})
    assert kong.writes == []


def test_the_status_api_serves_the_targets_and_refuses_writes(kong_admin):
    status = kong_admin(status_api=True)
    status.load_config({"_format_version": "3.0", "upstreams": [{"name": "pgw", "targets": [{"target": "a:1"}]}]})
    api = KongAdmin(status.url)
    assert [t["target"] for t in api.targets("pgw")] == ["a:1"]  # no token needed
    with pytest.raises(UpstreamError, match="404.*read-only Kong API"):  # no /upstreams route at all
        api.ensure_upstream("pgw")
    with pytest.raises(UpstreamError, match="405.*read-only Kong API"):
        api.add_target("pgw", "b:1", 100)
    with pytest.raises(UpstreamError, match="404"):
        api.post_config({"_format_version": "3.0"})
    assert status.target_names("pgw") == ["a:1"]


def test_the_admin_api_double_answers_as_kong_3_9_3_recorded(kong_admin):
    """The double against tests/vectors/kong-3.9.3.json, which tests/kong/test_kong_recordings.py
    holds to real Kong: a DB-less node's Admin API and its Status API, the same calls."""
    from tests.support import kong_recordings as rec

    admin, status = kong_admin(db_less=True), kong_admin(status_api=True)
    status.load_config(rec.config())
    recorded = rec.load()
    doc = {"config": __import__("json").dumps(rec.config())}
    client = KongAdmin(admin.url)
    try:
        sent = [client.post_config(rec.config()), client.post_config(rec.config())]
    finally:
        client.close()
    assert [201 if loaded else 304 for loaded in sent] == recorded["config: new, then the same with check_hash"]
    assert doc  # the client sends the config as a string, as the recording did
    played = rec.play({"admin": admin.url, "status": status.url})
    assert played == {name: recorded[name] for name in played}
