"""The plugin's configuration, stated once: Kong's schema for it, which also parses it.

`FIELDS` and `ENTITY_CHECKS` are the only statement of the rules. `kong_schema()` hands them to
Kong (`pgwshard-plugin --dump`), which checks the schema with its metaschema when it starts and
every plugin config against it; `PluginConfig.from_kong` applies the same definitions again at
instance start, the way Kong's kong/db/schema/init.lua does (defaults filled, then
`validate_field` and the entity checks), because kong-pdk passes the config through untouched
and the OpenResty host has no schema validation. A bad config fails StartInstance with a message
naming the field. Only the attributes this schema uses are interpreted; anything else is refused
when the module loads, so the two readings cannot drift apart.
"""
from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.ring import Member
from ..errors import ConfigError

MEMBERSHIP_MODES = ("static", "upstream", "file")
ADMIN_TOKEN_ENV = "KONG_ADMIN_TOKEN"
# kong/db/schema/typedefs.lua protocols_http (the protocols of kong/constants.lua whose
# subsystem is http, sorted): pgwshard routes HTTP pushes only.
HTTP_PROTOCOLS = ["grpc", "grpcs", "http", "https"]

# The `config` record's fields, in Kong's schema language (kong/db/schema/metaschema.lua).
FIELDS: tuple[dict[str, dict[str, Any]], ...] = (
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
    # the plugin server (kong/db/schema/init.lua process_auto_fields, kong/runloop/plugins_iterator.lua).
    {"admin_token": {"type": "string", "referenceable": True,
                     "description": "membership upstream: sent as Kong-Admin-Token (Kong Enterprise RBAC or a "
                                    "proxy in front of the Admin API); best as {vault://env/kong-admin-token}; "
                                    "unset: env KONG_ADMIN_TOKEN"}},
    {"membership_file": {"type": "string", "description": "membership file: Prometheus file_sd JSON written by pgwshard-sync"}},
    {"refresh_interval": {"type": "number", "default": 2, "gt": 0,
                          "description": "seconds between background membership reads"}},
    {"watch_interval": {"type": "number", "default": 0.1, "gt": 0,
                        "description": "seconds between cheap checks for a membership change (the file's "
                                       "mtime; the configuration hash on Kong's /status with database = off), "
                                       "read at once when seen; none when not below refresh_interval"}},
    # len_min = 0: Kong's string fields refuse "" unless they say so (init.lua validate_field),
    # and this default is "" (validated against its own field by metaschema.lua's `default`).
    {"route_prefix": {"type": "string", "default": "", "len_min": 0,
                      "description": "path prefix before /metrics/job when the route does not strip its path"}},
)

# What each membership mode needs, as Kong checks it (init.lua entity_checkers
# conditional_at_least_one_of: the field must be non-empty when the condition holds).
_REQUIRED_BY_MODE = {"static": "nodes", "upstream": "upstream", "file": "membership_file"}
ENTITY_CHECKS: tuple[dict[str, Any], ...] = tuple(
    {"conditional_at_least_one_of": {
        "if_field": "membership", "if_match": {"eq": mode}, "then_at_least_one_of": [needed],
        "then_err": f"{needed} is required when membership is {mode!r}"}}
    for mode, needed in _REQUIRED_BY_MODE.items())

# Keys Kong adds to the configs it sends a plugin server, not fields of the schema: accepted and
# ignored. kong/runloop/plugins_iterator.lua get_plugin_config adds the ids and the instance
# keys; kong/db/schema/init.lua process_auto_fields adds "$refs" (the references it resolved).
KONG_INJECTED_KEYS = frozenset({"route_id", "service_id", "consumer_id", "plugin_instance_name",
                                "__plugin_id", "__ws_id", "__key__", "__seq__", "$refs"})


def kong_schema(name: str) -> dict[str, Any]:
    """The plugin's schema as Kong loads it from `--dump` (kong/db/schema/plugin_loader.lua)."""
    return {"name": name, "fields": [
        {"config": {"type": "record", "fields": copy.deepcopy(list(FIELDS)),
                    "entity_checks": copy.deepcopy(list(ENTITY_CHECKS))}},
        {"protocols": {"type": "set", "required": True, "default": list(HTTP_PROTOCOLS),
                       "elements": {"type": "string", "one_of": list(HTTP_PROTOCOLS)},
                       "description": "A set of strings representing HTTP protocols."}},
    ]}


# --- Kong's validation of a config, for the attributes FIELDS uses (kong/db/schema/init.lua) ---

_TYPES = {"string", "number", "integer", "boolean", "array", "set"}
_ATTRIBUTES = {"type", "default", "description", "referenceable", "required", "elements",
               "one_of", "gt", "between", "len_min", "len_max"}


def _check_definitions() -> None:
    for item in FIELDS:
        (name, spec), = item.items()
        for definition in (spec, spec.get("elements", {})):
            unknown = set(definition) - _ATTRIBUTES
            if unknown or definition.get("type", "string") not in _TYPES:
                raise AssertionError(f"config.py interprets no {sorted(unknown) or definition['type']} ({name})")


_check_definitions()


def _is_reference(value: str) -> bool:
    # kong/pdk/vault.lua is_reference: "{vault://...}"
    return value.startswith("{vault://") and value.endswith("}")


def _validate(spec: Mapping[str, Any], value: Any) -> str | None:
    """init.lua Schema:validate_field for one non-null value: None when valid, else Kong's message."""
    kind = spec["type"]
    if kind in ("array", "set"):
        if not isinstance(value, list):
            return f"expected {'an array' if kind == 'array' else 'a set'}"
        for element in value:
            error = "required field missing" if element is None else _validate(spec["elements"], element)
            if error:
                return error
    elif kind == "string":
        if not isinstance(value, str):
            return "expected a string"
        if spec.get("referenceable") and _is_reference(value):
            return None
        if len(value) < spec.get("len_min", 1):  # "empty strings are not accepted by default"
            return f"length must be at least {spec.get('len_min', 1)}"
        if "len_max" in spec and len(value) > spec["len_max"]:
            return f"length must be at most {spec['len_max']}"
    elif kind == "boolean":
        if not isinstance(value, bool):
            return "expected a boolean"
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"expected {'an integer' if kind == 'integer' else 'a number'}"
    elif kind == "integer" and value != int(value):
        return "expected an integer"
    if "one_of" in spec and value not in spec["one_of"]:
        return f"expected one of: {', '.join(map(str, spec['one_of']))}"
    if "gt" in spec and not value > spec["gt"]:
        return f"value must be greater than {spec['gt']}"
    if "between" in spec and not spec["between"][0] <= value <= spec["between"][1]:
        return f"value should be between {spec['between'][0]} and {spec['between'][1]}"
    return None


def _is_nonempty(value: Any) -> bool:
    # init.lua is_nonempty: not null, not an empty table, not ""
    return value is not None and value != "" and value != [] and value != {}


def kong_validated(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with defaults filled in, validated as Kong validates it; ConfigError names the key."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"plugin config must be an object, got {type(config).__name__}", key="config")
    specs = {name: spec for item in FIELDS for name, spec in item.items()}
    for key in config:
        if key not in specs and key not in KONG_INJECTED_KEYS:
            raise ConfigError("unknown field", key=str(key))
    values: dict[str, Any] = {}
    for name, spec in specs.items():
        value = config.get(name)  # absent and null alike: Kong sends neither for an unset field
        if value is None:
            value = copy.deepcopy(spec.get("default"))
        elif (error := _validate(spec, value)) is not None:
            if name == "admin_token" and error == "expected a string":  # a secret: its type only
                error = f"expected a string, got {type(value).__name__}"
            elif name != "admin_token":
                error = f"{error}, got {value!r}"
            raise ConfigError(error, key=name)
        if spec["type"] == "set" and value is not None:  # init.lua make_set: duplicates dropped
            value = list(dict.fromkeys(value))
        values[name] = value
    for check in ENTITY_CHECKS:
        rule = check["conditional_at_least_one_of"]
        if values[rule["if_field"]] == rule["if_match"]["eq"] and not any(
                _is_nonempty(values[f]) for f in rule["then_at_least_one_of"]):
            raise ConfigError(rule["then_err"], key=rule["then_at_least_one_of"][0])
    return values


@dataclass(frozen=True)
class PluginConfig:
    membership: str
    nodes: tuple[Member, ...]
    upstream: str | None
    admin_url: str
    admin_token: str | None = field(repr=False)  # a secret: never in a repr or a log
    membership_file: str | None
    refresh_interval: float
    watch_interval: float
    route_prefix: str

    @classmethod
    def from_kong(cls, config: Mapping[str, Any]) -> PluginConfig:
        """Validate the config Kong sends (the keys Kong injects are ignored)."""
        values = kong_validated(config)
        members = []
        for i, node in enumerate(values["nodes"]):
            try:
                members.append(Member.parse(node))
            except ValueError as err:
                raise ConfigError(str(err), key=f"nodes[{i}]") from None
        return cls(
            membership=values["membership"],
            nodes=tuple(members),
            upstream=values["upstream"],
            admin_url=values["admin_url"].rstrip("/"),
            admin_token=values["admin_token"] or os.environ.get(ADMIN_TOKEN_ENV) or None,
            membership_file=values["membership_file"],
            refresh_interval=float(values["refresh_interval"]),
            watch_interval=float(values["watch_interval"]),
            route_prefix=values["route_prefix"],
        )
