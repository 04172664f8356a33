"""The host and the Kong advice agree on what nginx's defaults get wrong for pushes."""
from __future__ import annotations

import yaml

from kong_plugin_pgwshard.host.render import PushLimits
from tests.support import REPO


def _seconds(value: str) -> float:
    return float(value.removesuffix("s"))


def test_kong_conf_and_kong_yml_set_the_limits_the_host_renders():
    lines = (REPO / "kong/kong.conf").read_text().splitlines()
    conf = {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in lines
                                                if "=" in line and not line.lstrip().startswith("#"))}
    limits = PushLimits()
    assert conf["nginx_http_client_max_body_size"] == limits.body_limit
    assert conf["nginx_proxy_large_client_header_buffers"].split() == ["4", limits.header_buffer]
    for declarative in ("kong/kong.yml", "docker/kong.yml"):
        service = next(s for s in yaml.safe_load((REPO / declarative).read_text())["services"]
                       if s["name"] == "pushgateway")
        assert service["connect_timeout"] == _seconds(limits.connect_timeout) * 1000, declarative
        assert service["read_timeout"] == _seconds(limits.read_timeout) * 1000, declarative
        assert service["write_timeout"] == _seconds(limits.send_timeout) * 1000, declarative
