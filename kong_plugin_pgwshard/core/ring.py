"""The ketama ring: which pushgateway owns a grouping key.

One `Ring.owner` answers for the plugin, the CLI and the daemon's rebalancer, so they can never
disagree. A ring is immutable: membership changes build a new one, and a lookup takes no lock
and does no I/O. Hashing is uhashring's ketama (MD5 over "host:port" points), so the owner of a
key is the same in every process and on every machine, whatever Python's hash seed.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from uhashring import HashRing

from ..errors import NoMembersError
from .grouping import GroupingKey

DEFAULT_WEIGHT = 100  # Kong's default target weight
_HOST_PORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\s\[\]/]+)):(?P<port>\d+)\Z")


@dataclass(frozen=True, order=True)
class Member:
    """A pushgateway on the ring. Weight 0 means present but taking no groups (as in Kong)."""

    host: str
    port: int
    weight: int = DEFAULT_WEIGHT

    @property
    def name(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def parse(cls, text: str, weight: int = DEFAULT_WEIGHT) -> Member:
        """Parse "host:port" (or "[v6]:port"); raises ValueError with the offending text."""
        match = _HOST_PORT.match(text.strip())
        if not match:
            raise ValueError(f"expected host:port, got {text!r}")
        port = int(match["port"])
        if not 0 < port < 65536:
            raise ValueError(f"port out of range in {text!r}")
        if not 0 <= weight <= 65535:
            raise ValueError(f"weight must be 0..65535, got {weight} for {text!r}")
        return cls(match["v6"] or match["host"], port, weight)


class Ring:
    """Consistent hashing over members; build once per membership change."""

    __slots__ = ("members", "_hash_ring", "_by_name")

    def __init__(self, members: Iterable[Member] = ()):
        by_name = {m.name: m for m in members}  # the last spelling of a name wins
        self.members: tuple[Member, ...] = tuple(sorted(by_name.values()))
        self._by_name = by_name
        nodes = {m.name: {"weight": m.weight} for m in self.members if m.weight > 0}
        self._hash_ring = HashRing(nodes=nodes, hash_fn="ketama") if nodes else None

    def owner(self, key: GroupingKey | str) -> Member:
        """The member that owns `key`; NoMembersError when no member takes groups."""
        if self._hash_ring is None:
            raise NoMembersError("no healthy pushgateway is available to take this push")
        return self._by_name[self._hash_ring.get_node(str(key))]

    def __len__(self) -> int:
        return len(self.members)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ring) and self.members == other.members

    def __hash__(self) -> int:
        return hash(self.members)

    def __repr__(self) -> str:
        return f"Ring([{', '.join(f'{m.name}@{m.weight}' for m in self.members)}])"
