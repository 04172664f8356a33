"""The plugin's configuration: Kong's schema for it, and its validation at instance start.

Kong validates the schema when the plugin is configured; `PluginConfig.from_kong` checks again at
instance start (kong-pdk passes the config through untouched, and the OpenResty host has no
schema validation), so a bad config fails StartInstance with a message naming the field.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.ring import Member
from ..errors import ConfigError

MEMBERSHIP_MODES = ("static", "upstream", "file")
ADMIN_TOKEN_ENV = "KONG_ADMIN_TOKEN"

# Kong plugin schema fields (kong-pdk wraps them in the `config` record).
SCHEMA = (
    {"membership": {"type": "string", "default": "static", "one_of": list(MEMBERSHIP_MODES),
                    "description": "where the ring's members come from: static `nodes`, the Kong "
                                   "`upstream`'s targets (kept by pgwshard-sync), or a file_sd `membership_file`"}},
    {"nodes": {"type": "array", "elements": {"type": "string"}, "default": [],
               "description": "membership static: pushgateways as host:port"}},
    {"upstream": {"type": "string", "description": "membership upstream: the Kong upstream whose targets are the members"}},
    {"admin_url": {"type": "string", "default": "http://127.0.0.1:8001",
                   "description": "membership upstream: the Kong API of this node that serves the upstream's "
                                  "targets: its Admin API (DB mode), or its Status API (status_listen) on "
                                  "DB-less nodes and hybrid data planes"}},
    # Kong resolves a {vault://...} reference in a referenceable field before the config reaches
    # the plugin server (kong/db/schema/init.lua process_auto_fields, plugins_iterator.lua).
    {"admin_token": {"type": "string", "referenceable": True,
                     "description": "membership upstream: sent as Kong-Admin-Token (Kong Enterprise RBAC or a "
                                    "proxy in front of the Admin API); best as {vault://env/kong-admin-token}; "
                                    "unset: env KONG_ADMIN_TOKEN"}},
    {"membership_file": {"type": "string", "description": "membership file: Prometheus file_sd JSON written by pgwshard-sync"}},
    {"refresh_interval": {"type": "number", "default": 2, "gt": 0,
                          "description": "seconds between background membership refreshes"}},
    {"route_prefix": {"type": "string", "default": "",
                      "description": "path prefix before /metrics/job when the route does not strip its path"}},
)


@dataclass(frozen=True)
class PluginConfig:
    membership: str = "static"
    nodes: tuple[Member, ...] = ()
    upstream: str | None = None
    admin_url: str = "http://127.0.0.1:8001"
    admin_token: str | None = field(default=None, repr=False)  # a secret: never in a repr or a log
    membership_file: str | None = None
    refresh_interval: float = 2.0
    route_prefix: str = ""

    @classmethod
    def from_kong(cls, config: Mapping[str, Any]) -> PluginConfig:
        """Validate the config Kong sends; keys Kong adds (route_id, __seq__, ...) are ignored."""
        if not isinstance(config, Mapping):
            raise ConfigError(f"plugin config must be an object, got {type(config).__name__}", key="config")
        get = lambda key, default=None: default if config.get(key) is None else config[key]  # noqa: E731

        membership = get("membership", "static")
        if membership not in MEMBERSHIP_MODES:
            raise ConfigError(f"must be one of {', '.join(MEMBERSHIP_MODES)}, got {membership!r}", key="membership")
        nodes = get("nodes", [])
        if not isinstance(nodes, list):
            raise ConfigError("must be a list of host:port strings", key="nodes")
        members = []
        for i, node in enumerate(nodes):
            try:
                members.append(Member.parse(str(node)))
            except ValueError as err:
                raise ConfigError(str(err), key=f"nodes[{i}]") from None
        interval = get("refresh_interval", 2)
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0:
            raise ConfigError(f"must be a number of seconds > 0, got {interval!r}", key="refresh_interval")
        for key in ("upstream", "admin_url", "admin_token", "membership_file", "route_prefix"):
            if not isinstance(get(key, ""), str):
                got = type(config[key]).__name__ if key == "admin_token" else repr(config[key])  # a secret
                raise ConfigError(f"must be a string, got {got}", key=key)
        required = {"static": "nodes", "upstream": "upstream", "file": "membership_file"}[membership]
        if not get(required):
            raise ConfigError(f"is required when membership is {membership!r}", key=required)
        return cls(
            membership=membership,
            nodes=tuple(members),
            upstream=get("upstream"),
            admin_url=get("admin_url", cls.admin_url).rstrip("/"),
            admin_token=get("admin_token") or os.environ.get(ADMIN_TOKEN_ENV) or None,
            membership_file=get("membership_file"),
            refresh_interval=float(interval),
            route_prefix=get("route_prefix", ""),
        )
