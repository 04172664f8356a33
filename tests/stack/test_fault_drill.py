"""The fault drill in CI: pushes and deletes racing an owner's death, outage and return (issue 14).

Real processes (3 pushgateways with persistence, plugin server, nginx host, pgwshard-sync on 1 s
probes); kong_plugin_pgwshard/harness/drill.py describes the round. Before the fixes of issue 14
pushes around the rejoin were rolled back, deletes during the outage came back when the owner
returned, and duplicates waited for the periodic pass.
"""
from __future__ import annotations

from kong_plugin_pgwshard.harness.drill import run_drill


def test_no_acknowledged_push_or_delete_is_undone_by_an_owners_death_and_return():
    result = run_drill(groups=30, seed=14)
    assert result.deleted == 4, result.problems  # every delete of the drill acknowledged
    assert (result.lost, result.stale, result.misplaced, result.duplicates, result.resurrected) == (0, 0, 0, 0, 0), \
        str(result)
