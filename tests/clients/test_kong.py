"""The Kong Admin API client against a double that follows Kong 3.x's documented contract."""
from __future__ import annotations

import pytest

from kong_plugin_pgwshard.clients.kong import KongAdmin
from kong_plugin_pgwshard.errors import UpstreamError


def test_list_follows_next_through_every_page(kong_admin):
    kong = kong_admin()
    names = [f"10.2.0.{i}:9091" for i in range(1, 251)]
    kong.add_upstream("pushgateways", names)
    listed = KongAdmin(kong.url).list("/upstreams/pushgateways/targets", size=100)
    assert [t["target"] for t in listed] == names  # every target once, in Kong's order
    gets = [r for r in kong.requests if r[0] == "GET"]
    assert len(gets) == 3  # 100 + 100 + 50: the last page has next = null


def test_ensure_upstream_creates_a_missing_upstream_once(kong_admin):
    kong = kong_admin()
    admin = KongAdmin(kong.url)
    admin.ensure_upstream("pushgateways")
    admin.ensure_upstream("pushgateways")  # exists now: GET answers 200, nothing written
    assert list(kong.upstreams) == ["pushgateways"]
    assert kong.writes == [("POST", "/upstreams")]


def test_target_writes_and_a_target_already_gone(kong_admin):
    kong = kong_admin()
    admin = KongAdmin(kong.url)
    admin.ensure_upstream("pgw")
    admin.add_target("pgw", "[::1]:9091", 7)
    [target] = admin.targets("pgw")
    assert (target["target"], target["weight"]) == ("[::1]:9091", 7)
    admin.set_weight("pgw", target["id"], 0)
    assert admin.targets("pgw")[0]["weight"] == 0
    admin.delete_target("pgw", "[::1]:9091")
    admin.delete_target("pgw", "[::1]:9091")  # 404: already what we wanted
    assert admin.targets("pgw") == []
    admin.add_target("pgw", "a:1", 100)
    with pytest.raises(UpstreamError, match="409"):  # a duplicate target is refused, not hidden
        admin.add_target("pgw", "a:1", 100)


def test_the_token_travels_in_the_header_and_never_in_errors(kong_admin):
    kong = kong_admin(token="t0ken-value")
    KongAdmin(kong.url, "t0ken-value").ensure_upstream("pgw")
    assert all(headers.get("Kong-Admin-Token") == "t0ken-value" for _, _, headers in kong.requests)
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


def test_db_less_refuses_entity_writes_and_loads_config_with_check_hash(kong_admin):
    kong = kong_admin(db_less=True)
    admin = KongAdmin(kong.url)
    with pytest.raises(UpstreamError, match="405"):
        admin.add_target("pgw", "a:1", 100)
    doc = {"_format_version": "3.0", "upstreams": [{"name": "pgw", "targets": [{"target": "a:1"}]}]}
    assert admin.post_config(doc) is True
    assert kong.target_names("pgw") == ["a:1"]
    assert admin.post_config(doc) is False  # unchanged: 304, Kong keeps what it has
    assert kong.writes == [("POST", "/config")]
    with pytest.raises(UpstreamError, match="400"):  # Kong refuses a config it cannot parse
        admin.post_config({"upstreams": []})
    assert kong.target_names("pgw") == ["a:1"]  # and the loaded one stays


def test_a_kong_with_a_database_refuses_declarative_config(kong_admin):
    kong = kong_admin()
    with pytest.raises(UpstreamError, match="400.*not use a database"):
        KongAdmin(kong.url).post_config({"_format_version": "3.0"})
    assert kong.writes == []
