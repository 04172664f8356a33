"""pgwshard-sync's YAML configuration: one dataclass per concern, validated at start.

Every error names the key path and the file, e.g.
    consul.wait: expected a duration like '30s', got 'soon' (in /etc/pgwshard.yml)
Unknown keys are errors too (a typo must not silently fall back to a default), and every value
is checked here, at start and by `--check`: addresses, URLs, durations, files that must exist,
the declarative file's shape. Nothing that passes crashes later for its shape. Secrets may come
from the environment (CONSUL_HTTP_TOKEN, KONG_ADMIN_TOKEN) and are left out of every repr.
kong/pgwshard.yml is a commented example of every key.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload
from urllib.parse import urlsplit

import yaml

from ..clients.kong import upstreams_of
from ..core.ring import DEFAULT_WEIGHT, Member
from ..errors import ConfigError

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)\Z")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class ProbeSettings:
    interval: float = 1.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 2


@dataclass(frozen=True)
class TLSSettings:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True


@dataclass(frozen=True)
class RegisterSettings:
    enabled: bool = False
    check_interval: float = 1.0
    check_timeout: float = 1.0
    deregister_after: float = 60.0


@dataclass(frozen=True)
class ConsulSettings:
    address: str = "http://127.0.0.1:8500"
    service: str = "pushgateway"
    tag: str | None = None
    datacenter: str | None = None
    token: str | None = field(default=None, repr=False)
    tls: TLSSettings = TLSSettings()
    wait: float = 30.0
    backoff: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0)
    register: RegisterSettings = RegisterSettings()


@dataclass(frozen=True)
class KongSettings:
    mode: str = "admin"
    admin_url: str = "http://127.0.0.1:8001"
    admin_token: str | None = field(default=None, repr=False)
    upstream: str = "pushgateways"
    declarative_file: str | None = None
    nodes: tuple[str, ...] = ()
    proxy: str | None = field(default=None, repr=False)  # may carry credentials


@dataclass(frozen=True)
class FileSdSettings:
    path: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RebalanceSettings:
    enabled: bool = True
    interval: float = 60.0
    max_ops_per_second: float = 50.0
    # After a membership change, wait until every gateway can have read it (the plugin's
    # refresh_interval, 2 s by default, plus a margin) before moving anything: until then a
    # gateway may still push to the old owner.
    settle: float = 3.0
    # A second pass this long after each change's first one removes copies that pushes of
    # slow gateways recreated on old owners; 0 turns it off.
    follow_up: float = 5.0
    # A copy is PUT on its owner only once its client has not pushed it for this long: a client
    # still pushing pushes to the owner itself, and a PUT racing that push would overwrite it
    # (Pushgateway has no conditional write). 0 moves at once.
    quiet: float = 10.0
    # A pushgateway out of the ring that still answers (rising, held down after a restart)
    # keeps the groups of which it holds the best copy for this long, then is drained like
    # any leaver: moving them to stand-ins and back would be two moves and duplicates.
    gone_after: float = 60.0


@dataclass(frozen=True)
class DeletesSettings:
    """Client DELETEs through pgwshard-sync, kept as tombstones (sync/deletes.py)."""

    listen: str = "127.0.0.1:9552"
    tombstone_file: str = ""
    tombstone_ttl: float = 7 * 24 * 3600.0
    route_prefix: str = ""


@dataclass(frozen=True)
class Settings:
    pushgateways: tuple[Member, ...] = ()
    source: str = "probes"  # probes | consul
    probes: ProbeSettings = ProbeSettings()
    consul: ConsulSettings | None = None
    hold_down: float = 5.0
    kong: KongSettings | None = None
    file_sd: FileSdSettings | None = None
    rebalance: RebalanceSettings = RebalanceSettings()
    metrics_listen: str = "127.0.0.1:9550"
    log_level: str = "info"
    source_file: str = "<config>"
    deletes: DeletesSettings | None = None


class _Section:
    """Typed reads from one mapping of the file; errors name `prefix.key` and the file."""

    def __init__(self, data: Any, prefix: str, source: str):
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping, got {type(data).__name__}", key=prefix or "<top>", source=source)
        self.data, self.prefix, self.source = dict(data), prefix, source
        self.used: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, key=self._key(key), source=self.source)

    def _get(self, key: str, default: Any) -> Any:
        self.used.add(key)
        value = self.data.get(key)
        return default if value is None else value

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    @overload
    def string(self, key: str, default: str, choices: tuple[str, ...] = ()) -> str: ...
    @overload
    def string(self, key: str, default: None = None, choices: tuple[str, ...] = ()) -> str | None: ...

    def string(self, key: str, default: str | None = None, choices: tuple[str, ...] = ()) -> str | None:
        value = self._get(key, default)
        if value is not None and not isinstance(value, str):
            raise self.error(key, f"expected a string, got {value!r}")
        if choices and value not in choices:
            raise self.error(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}")
        return value

    def number(self, key: str, default: float, minimum: float = 0.0, integer: bool = False) -> Any:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            raise self.error(key, f"expected {'a whole number' if integer else 'a number'}, got {value!r}")
        if value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value!r}")
        return value

    def duration(self, key: str, default: float, minimum: float = 0.0) -> float:
        value = self._get(key, default)
        seconds = _parse_duration(value)
        if seconds is None:
            raise self.error(key, f"expected a duration like '30s', '500ms' or a number of seconds, got {value!r}")
        if seconds < minimum:
            raise self.error(key, f"must be at least {minimum}s, got {value!r}")
        return seconds

    @overload
    def url(self, key: str, default: str, value: Any = None) -> str: ...
    @overload
    def url(self, key: str, default: None = None, value: Any = None) -> str | None: ...

    def url(self, key: str, default: str | None = None, value: Any = None) -> str | None:
        """An http(s) URL with a host (and a port in range, if given); `value` checks a list item."""
        value = self._get(key, default) if value is None else value
        if value is None:
            return None
        problem = _url_problem(value)
        if problem:
            raise self.error(key, f"expected an http:// or https:// URL with a host, got {value!r}: {problem}")
        return value.rstrip("/")

    def existing_file(self, key: str) -> str | None:
        value = self.string(key)
        if value is not None and not Path(value).is_file():
            raise self.error(key, f"no such file: {value!r}")
        return value

    def list(self, key: str) -> list:
        value = self._get(key, [])
        if not isinstance(value, list):
            raise self.error(key, f"expected a list, got {value!r}")
        return value

    def section(self, key: str) -> _Section:
        self.used.add(key)
        return _Section(self.data.get(key), self._key(key), self.source)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _parse_duration(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value.strip())
        if match:
            return float(match[1]) * _UNITS[match[2]]
    return None


def _url_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return "not a string"
    try:
        url = urlsplit(value.strip())
        port = url.port  # ValueError when out of range or not a number
    except ValueError as err:
        return str(err)
    if url.scheme not in ("http", "https"):
        return "the scheme must be http or https"
    if not url.hostname:
        return "no host"
    if port == 0 or any(c.isspace() for c in value.strip()):
        return "bad port" if port == 0 else "contains spaces"
    return None


def _listen_problem(value: str) -> str | None:
    """host:port as the metrics server binds it (an empty host: every address; port 0: one the
    system picks, as tests do)."""
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\s\[\]/]*):(\d{1,5})", value)
    if not match:
        return "expected host:port (e.g. 127.0.0.1:9550, or :9550 for every address)"
    if not 0 <= int(match[2]) < 65536:
        return "port out of range"
    return None


def _pushgateway(top: _Section, i: int, entry: Any) -> Member:
    """`host:port`, or `{address: host:port, weight: N}` (weight 0 drains it: no groups)."""
    key = f"pushgateways[{i}]"
    if isinstance(entry, Mapping):
        item = _Section(entry, key, top.source)
        address = item.string("address")
        if not address:
            raise item.error("address", "is required (host:port)")
        weight = item.number("weight", DEFAULT_WEIGHT, integer=True)
        item.done()
    elif isinstance(entry, str):
        address, weight = entry, DEFAULT_WEIGHT
    else:
        raise top.error(key, f"expected host:port or {{address, weight}}, got {entry!r}")
    try:
        return Member.parse(address, weight)
    except ValueError as err:
        raise top.error(key, str(err)) from None


def load_settings(path: str, environ: Mapping[str, str] = os.environ) -> Settings:
    """Read and validate a config file; raises ConfigError naming the key and the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise ConfigError(f"cannot read the config file: {err.strerror}", source=path) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML: {err}", source=path) from None
    return parse_settings(data, path, environ)


def parse_settings(data: Any, source: str, environ: Mapping[str, str] = os.environ) -> Settings:
    top = _Section(data, "", source)
    pushgateways = [_pushgateway(top, i, entry) for i, entry in enumerate(top.list("pushgateways"))]
    names = [m.name for m in pushgateways]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise top.error(f"pushgateways[{i}]", f"{name} is listed twice")

    consul = _consul(top.section("consul"), environ) if top.has("consul") else None
    health = top.section("health")
    source_name = health.string("source", "consul" if consul else "probes", choices=("probes", "consul"))
    probes = _probes(health.section("probes"))
    health.done()
    if source_name == "consul" and consul is None:
        raise health.error("source", "is consul but there is no consul section")
    if source_name == "probes" and not pushgateways:
        raise top.error("pushgateways", "is required when health comes from probes")
    if consul and consul.register.enabled and not pushgateways:
        raise top.error("pushgateways", "is required when consul.register.enabled is true")

    membership = top.section("membership")
    hold_down = membership.duration("hold_down", 5.0)
    membership.done()
    kong = _kong(top.section("kong"), environ) if top.has("kong") else None
    file_sd = None
    if top.has("file_sd"):
        sd = top.section("file_sd")
        path = sd.string("path")
        if not path:
            raise sd.error("path", "is required")
        if Path(path).is_dir():
            raise sd.error("path", f"is a directory: {path!r}")
        labels = sd._get("labels", {})
        if not isinstance(labels, Mapping) or not all(isinstance(v, str) for v in labels.values()):
            raise sd.error("labels", "expected a mapping of label names to strings")
        sd.done()
        file_sd = FileSdSettings(path, dict(labels))
    rb = top.section("rebalance")
    rebalance = RebalanceSettings(rb.boolean("enabled", True), rb.duration("interval", 60.0, minimum=1.0),
                                  rb.number("max_ops_per_second", 50.0, minimum=0.1),
                                  rb.duration("settle", 3.0), rb.duration("follow_up", 5.0),
                                  rb.duration("quiet", 10.0), rb.duration("gone_after", 60.0))
    rb.done()
    deletes = None
    if top.has("deletes"):
        d = top.section("deletes")
        deletes = DeletesSettings(d.string("listen", "127.0.0.1:9552"), d.string("tombstone_file", ""),
                                  d.duration("tombstone_ttl", 7 * 24 * 3600.0, minimum=60.0),
                                  d.string("route_prefix", ""))
        if not deletes.tombstone_file:
            raise d.error("tombstone_file", "is required: tombstones must survive a restart")
        if not deletes.listen.rpartition(":")[2].isdigit():
            raise d.error("listen", f"expected host:port, got {deletes.listen!r}")
        d.done()
    metrics = top.section("metrics")
    listen = metrics.string("listen", "127.0.0.1:9550") or ""
    problem = _listen_problem(listen)
    if problem:
        raise metrics.error("listen", f"{problem}, got {listen!r}")
    metrics.done()
    log = top.section("log")
    level = log.string("level", "info", choices=("debug", "info", "warning", "error"))
    log.done()
    top.done()
    return Settings(tuple(pushgateways), source_name, probes, consul, hold_down, kong, file_sd, rebalance,
                    listen, level, source, deletes)


def _probes(s: _Section) -> ProbeSettings:
    probes = ProbeSettings(s.duration("interval", 1.0, minimum=0.1), s.duration("timeout", 1.0, minimum=0.01),
                           s.number("rise", 2, minimum=1, integer=True), s.number("fall", 2, minimum=1, integer=True))
    s.done()
    return probes


def _consul(s: _Section, environ: Mapping[str, str]) -> ConsulSettings:
    address = s.url("address", "http://127.0.0.1:8500") or ""
    if urlsplit(address).path not in ("", "/"):
        raise s.error("address", f"expected http(s)://host:port without a path, got {address!r}")
    tls = s.section("tls")
    tls_settings = TLSSettings(tls.existing_file("ca_file"), tls.existing_file("cert_file"),
                               tls.existing_file("key_file"), tls.boolean("verify", True))
    if bool(tls_settings.cert_file) != bool(tls_settings.key_file):
        raise tls.error("cert_file" if tls_settings.key_file else "key_file", "cert_file and key_file go together")
    tls.done()
    backoff = s.list("backoff") or [0.5, 1, 2, 5, 10]
    steps: list[float] = []
    for i, step in enumerate(backoff):
        seconds = _parse_duration(step)
        if seconds is None:
            raise s.error(f"backoff[{i}]", f"expected a duration, got {step!r}")
        steps.append(seconds)
    reg = s.section("register")
    register = RegisterSettings(reg.boolean("enabled", False), reg.duration("check_interval", 1.0, minimum=1.0),
                                reg.duration("check_timeout", 1.0, minimum=0.1),
                                reg.duration("deregister_after", 60.0, minimum=60.0))
    reg.done()
    settings = ConsulSettings(
        address=address.rstrip("/"), service=s.string("service", "pushgateway"), tag=s.string("tag"),
        datacenter=s.string("datacenter"), token=s.string("token") or environ.get("CONSUL_HTTP_TOKEN") or None,
        tls=tls_settings, wait=s.duration("wait", 30.0, minimum=1.0),
        backoff=tuple(steps), register=register)
    s.done()
    return settings


def _kong(s: _Section, environ: Mapping[str, str]) -> KongSettings:
    mode = s.string("mode", "admin", choices=("admin", "declarative"))
    nodes = tuple(s.url(f"nodes[{i}]", value=n) or "" for i, n in enumerate(s.list("nodes")))
    upstream = s.string("upstream", "pushgateways")
    if not upstream:
        raise s.error("upstream", "must not be empty")
    settings = KongSettings(
        mode=mode, admin_url=s.url("admin_url", "http://127.0.0.1:8001") or "",
        admin_token=s.string("admin_token") or environ.get("KONG_ADMIN_TOKEN") or None,
        upstream=upstream, declarative_file=s.string("declarative_file"),
        nodes=nodes, proxy=s.url("proxy"))
    if mode == "declarative" and not settings.declarative_file:
        raise s.error("declarative_file", "is required when kong.mode is declarative")
    if mode == "declarative" and settings.declarative_file:
        _check_declarative(s, settings.declarative_file)
    s.done()
    return settings


def read_declarative(path: str) -> tuple[dict, list[dict]]:
    """A declarative config file and its `upstreams` list (upstreams_of); OSError, yaml.YAMLError
    or ValueError naming the file. (Here, not in clients/kong.py: the plugin imports that, and
    the request path loads no YAML.)"""
    doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    return doc, upstreams_of(doc, path)


def _check_declarative(s: _Section, path: str) -> None:
    """The declarative file must be readable and hold a config whose upstreams pgwshard can edit
    (it is re-read at every write; a later bad edit is reported by the sink, not fatal)."""
    try:
        read_declarative(path)
    except OSError as err:
        raise s.error("declarative_file", f"cannot read {path!r}: {err.strerror}") from None
    except (yaml.YAMLError, ValueError) as err:
        raise s.error("declarative_file", str(err)) from None
