"""The ketama ring: which pushgateway owns a grouping key.

One `Ring.owner` answers for the plugin, the CLI and the daemon's rebalancer, so they can never
disagree. A ring is immutable: membership changes build a new one, and a lookup takes no lock
and does no I/O. Hashing is uhashring's ketama (MD5 over "host:port" points), so the owner of a
key is the same in every process and on every machine, whatever Python's hash seed.
"""
from __future__ import annotations

from collections.abc import Iterable

from uhashring import HashRing

from ..errors import NoMembersError
from .grouping import GroupingKey
from .members import DEFAULT_WEIGHT, Member

__all__ = ["DEFAULT_WEIGHT", "Member", "Ring"]  # Member lives in members.py; most callers import it here


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
