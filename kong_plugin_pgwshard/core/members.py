"""A ring member and its one name: the address spelt as Kong spells an upstream target.

Kong rewrites every target it stores (kong/db/dao/targets.lua format_target = kong/tools/ip.lua
normalize_ip + format_host): IPv4 without leading zeros, IPv6 expanded to eight groups of four
lower-case hex digits in brackets, a hostname as given (case kept). The plugin reads its members
back from Kong, while pgwshard-sync, its sinks and the CLI read them from their own config,
Consul or a file: each hashes `Member.name`, so every path into a Member goes through
`normalize_host` here and all of them compute the same owners, and a sink comparing its wanted
set with Kong's listing finds them equal.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DEFAULT_WEIGHT", "Member", "normalize_host", "split_address"]

WEIGHT_SEPARATOR = "="  # "host:port=weight": no address spelling contains "="

DEFAULT_WEIGHT = 100  # Kong's default target weight
_HEX_GROUP = re.compile(r"[0-9A-Fa-f]{1,4}\Z")
_IPV4 = re.compile(r"([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})(?::([0-9]+))?\Z")
_NAME = re.compile(r"[0-9A-Za-z._-]+\Z")


def _kind(text: str) -> str:
    # ip.lua hostname_type: by exclusion, colons first
    if text.count(":") > 1:
        return "ipv6"
    return "ipv4" if re.fullmatch(r"[0-9.]+", text.replace(":", "")) else "name"


def _ipv6(address: str) -> str | None:
    # ip.lua normalize_ipv6 (the part after the brackets): one "::" stands for the zero groups
    # that make eight; each group padded to four digits, all lower case
    if address.startswith(":"):
        address = "0" + address
    if address.endswith(":"):
        address += "0"
    if "::" in address:
        address = address.replace("::", ":" + "0:" * max(0, 8 - address.count(":")), 1)
    groups = address.split(":")
    if len(groups) != 8 or not all(_HEX_GROUP.match(g) for g in groups):
        return None
    return ":".join(g.rjust(4, "0") for g in groups).lower()


def split_address(text: str) -> tuple[str, int | None]:
    """kong/tools/ip.lua normalize_ip: "host", "host:port", "a.b.c.d[:port]", "v6" or
    "[v6][:port]" -> (normalised host, IPv6 without brackets; port or None).
    ValueError, quoting `text`, where Kong answers "Invalid target"."""
    kind = _kind(text)
    port: str | None
    if kind == "ipv6":
        bracketed = re.fullmatch(r"\[([^\[\]]*)\](?::([0-9]+))?", text)
        address, port = bracketed.groups() if bracketed else (text, None)  # no brackets, no port
        host = _ipv6(address)
    elif kind == "ipv4":
        match = _IPV4.match(text)
        octets = match.groups()[:4] if match else ()
        host = ".".join(str(int(o)) for o in octets) if match and all(int(o) <= 255 for o in octets) else None
        port = match[5] if match else None
    else:
        # ip.lua check_hostname: letters, digits, "-", "." and "_"; no label ending in "-";
        # an empty label only last (a trailing dot)
        name, _, port = text.rpartition(":") if re.search(r":[0-9]+\Z", text) else (text, "", None)
        labels = name.split(".")
        valid = _NAME.match(name) and not any(
            label.endswith("-") or (not label and i != len(labels) - 1) for i, label in enumerate(labels))
        host = name if valid else None
    if host is None:
        raise ValueError(f"expected host:port with a hostname or IP address Kong accepts, got {text!r}")
    if port is not None and int(port) > 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host, None if port is None else int(port)


def normalize_host(host: str) -> str:
    """A host (no port) as Kong spells it in a target; a host Kong would refuse is left as given
    (Member.parse refuses it; a Consul address, say, is not ours to refuse)."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        normalised, port = split_address(bare)
    except ValueError:
        return host
    return normalised if port is None else host


@dataclass(frozen=True, order=True)
class Member:
    """A pushgateway on the ring. Weight 0 means present but taking no groups (as in Kong).
    `host` is always in Kong's spelling (IPv6 bare, without brackets)."""

    host: str
    port: int
    weight: int = DEFAULT_WEIGHT

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", normalize_host(self.host))

    @property
    def name(self) -> str:
        """"host:port" exactly as Kong lists the target (kong/tools/ip.lua format_host)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def parse(cls, text: str, weight: int = DEFAULT_WEIGHT) -> Member:
        """Parse "host:port" (or "[v6]:port"); raises ValueError with the offending text.
        Kong would add port 8000 to a target without one (targets.lua); a pushgateway listens
        on 9091 by default, so a missing port is refused rather than guessed."""
        host, port = split_address(text.strip())
        if port is None:
            raise ValueError(f"expected host:port, got {text!r}")
        if not 0 < port < 65536:
            raise ValueError(f"port out of range in {text!r}")
        if not 0 <= weight <= 65535:
            raise ValueError(f"weight must be 0..65535, got {weight} for {text!r}")
        return cls(host, port, weight)

    @classmethod
    def parse_weighted(cls, text: str) -> Member:
        """"host:port" (weight 100) or "host:port=weight", as `pgwshard --nodes` takes them;
        ValueError quoting `text`."""
        address, sep, weight = text.strip().partition(WEIGHT_SEPARATOR)
        if not sep:
            return cls.parse(address)
        if not weight.strip().isdigit():
            raise ValueError(f"expected host:port=weight with a whole number, got {text!r}")
        return cls.parse(address, int(weight))
