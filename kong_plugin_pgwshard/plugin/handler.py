"""The Kong plugin: send each push to the pushgateway that owns its grouping key.

Every PDK call is a round trip between Kong and this process, so a request makes as few as the
job allows: one to read the raw path, then one `set_target` (a push), one `exit` (a bad push
path or no members) or none (anything else). The method is not read: a push path is routed to
its owner whatever the method, and the owner answers a GET there with its own 405, exactly as a
lone Pushgateway would; that saves a round trip on every push.

Pushes repeat (a fleet pushes the same groups every interval), so each push path's owner is
remembered for the ring it was computed on: a repeated push skips parsing and hashing.
"""
from __future__ import annotations

import weakref
from typing import Any

from .. import __version__
from ..core.grouping import bad_push_path_message, parse_push_path
from ..core.kong_uri import forwarded_path
from ..core.ring import Member, Ring
from ..errors import GroupingKeyError, NoMembersError
from .config import FIELDS, PluginConfig, kong_schema
from .membership import membership_for, release

NAME = "pgwshard"  # the plugin's name in kong.conf's `plugins` and in kong.yml
Schema = FIELDS  # the `config` record's fields, as kong-pdk's Module reads them
KONG_SCHEMA = kong_schema(NAME)  # the whole schema --dump gives Kong (with `protocols`, entity checks)
version = __version__
# After authentication (1000+) and rate limiting (910), before request-transformer (801) and the
# logging plugins: a rejected or throttled push never reaches a pushgateway.
priority = 850
# Push paths whose owner is remembered, bounded in bytes for the whole process (a bound in
# entries let 16,384 paths of 8 KB each take ~130 MB per instance; a bound per instance still
# grew with Kong's workers, each of which starts its own instance): when a new entry would pass
# the bound, every instance's memo starts afresh. A path longer than MEMO_MAX_PATH is never
# remembered: it is parsed each time (a fleet's paths are ~100 bytes).
OWNER_MEMO_BYTES = 2 * 1024 * 1024
MEMO_MAX_PATH = 1024
# What one entry costs besides its path's characters: the str header, a dict slot, a reference.
_MEMO_ENTRY_OVERHEAD = 120
# Every instance with a memo, and the bytes all of them hold (an instance dropped unclosed keeps
# its share counted until the next fresh start). Only the RPC loop's thread runs phases (in
# greenlets), so no lock: nothing else reads or writes these.
_memos: weakref.WeakSet[Plugin] = weakref.WeakSet()
_memo_total = 0


def _forget_all_owners() -> None:
    global _memo_total
    for plugin in list(_memos):
        plugin._forget_owners()
    _memo_total = 0


class Plugin:
    """One instance per plugin config (Kong starts a new one when the config changes)."""

    def __init__(self, config: dict[str, Any]):
        self.config = PluginConfig.from_kong(config)  # ConfigError names the field
        self.membership = membership_for(self.config)
        self._memo_ring: Ring | None = None
        self._owners: dict[str, Member] = {}
        self._memo_bytes = 0  # what self._owners holds, by the estimate above

    def close(self) -> None:
        """Kong closed this instance (pgwshard-plugin calls this; kong-pdk's own server does not)."""
        release(self.membership)
        self._forget_owners()

    def _forget_owners(self) -> None:
        global _memo_total
        _memo_total -= self._memo_bytes
        self._owners, self._memo_bytes = {}, 0

    def access(self, kong: Any) -> None:
        # An exception escaping here would leave Kong waiting on its socket until it times out.
        try:
            path = kong.request.get_raw_path()
            try:
                owner = self._owner(path)
                if owner is None:
                    return  # reads and other paths: the route's own upstream balancing
            except GroupingKeyError as err:
                kong.response.exit(400, {"message": bad_push_path_message(err)})
                return
            except NoMembersError as err:
                kong.response.exit(503, {"message": f"pgwshard: {err}"})
                return
            kong.service.set_target(owner.host, owner.port)
        except Exception as err:  # noqa: BLE001 - the last line of defence, see above
            try:
                kong.log.err(f"pgwshard: unexpected error: {err!r}")
                kong.response.exit(500, {"message": "pgwshard: internal error, see the gateway's error log"})
            except Exception:  # noqa: BLE001 - the gateway connection itself is gone
                pass

    def _owner(self, path: str) -> Member | None:
        global _memo_total
        ring = self.membership.ring()
        if ring is not self._memo_ring:  # membership changed: owners may have too
            self._forget_owners()
            self._memo_ring = ring
        owner = self._owners.get(path)
        if owner is None:
            # the key of the path the pushgateway will receive: Kong forwards it normalized
            key = parse_push_path(forwarded_path(path), self.config.route_prefix)
            if key is None:
                return None
            owner = ring.owner(key)
            if len(path) <= MEMO_MAX_PATH:
                cost = len(path) + _MEMO_ENTRY_OVERHEAD
                if _memo_total + cost > OWNER_MEMO_BYTES:
                    _forget_all_owners()
                self._owners[path] = owner
                self._memo_bytes += cost
                _memo_total += cost
                _memos.add(self)
        return owner
