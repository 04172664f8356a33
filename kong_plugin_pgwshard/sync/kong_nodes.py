"""Which Kong nodes started, restarted or reloaded since the last look.

Around those moments Kong sends some pushes on without the plugin, by its own `hash_on: path`,
to a pushgateway that is not their owner: on `kong reload` the old workers' calls to the old
plugin server can break ("broken pipe"), and a node that starts or restarts may meet a plugin
server that is not there yet (README, "When the plugin server fails"). The rebalancer would find
such strays only at its periodic pass (rebalance.interval, a minute by default); the daemon runs
a pass as soon as a node's processes changed instead.

A node's `GET /status` (Admin API, and Status API) lists its workers' pids
(`memory.workers_lua_vms`, kong/api/routes/health.lua): new ones on every reload, start and
restart. (`GET /` lists them too, but Kong 3.9.3 answers it 500 from worker 0 once that worker
spawned a plugin server: "Cannot serialise cdata", and logs an error each time.) A plugin server
that dies and is respawned by Kong changes no worker: its strays wait for the periodic pass.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from ..clients.kong import KongAdmin
from ..errors import UpstreamError

log = logging.getLogger("pgwshard.sync")

Processes = frozenset[int] | None  # the workers' pids; None: the node did not answer


class KongNodeWatch:
    """Polled by the daemon: `changed()` names the nodes whose workers differ from the last look
    (a node that comes back after not answering counts: it restarted)."""

    def __init__(self, nodes: Sequence[KongAdmin]):
        self.nodes = list(nodes)
        self._seen: dict[str, Processes] = {}

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def changed(self) -> list[str]:
        changed = []
        for node in self.nodes:
            now = self._processes(node)
            if node.url in self._seen and now is not None and self._seen[node.url] != now:
                changed.append(node.url)
            self._seen[node.url] = now
        return changed

    @staticmethod
    def _processes(node: KongAdmin) -> Processes:
        try:
            status, body = node.request("GET", "/status")
        except UpstreamError as err:
            log.debug("Kong node %s: %s", node.url, err)
            return None
        finally:
            # no idle keep-alive connection left between looks: an nginx worker that exits
            # gracefully (every reload) logs an [alert] for each connection still open
            node.close()
        memory = body.get("memory") if status == 200 and isinstance(body, dict) else None
        vms = memory.get("workers_lua_vms") if isinstance(memory, dict) else None
        if not isinstance(vms, list):
            return None
        pids = frozenset(vm["pid"] for vm in vms if isinstance(vm, dict) and isinstance(vm.get("pid"), int))
        return pids or None
