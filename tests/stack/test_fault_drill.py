"""The fault drill in CI: pushes and deletes racing an owner's death, outage and return (issue 14),
and an owner that hangs past the gateway's read timeout (issue 21).

Real processes (3 pushgateways with persistence, plugin server, nginx host, pgwshard-sync on 1 s
probes); kong_plugin_pgwshard/harness/drill.py describes the rounds. Before the fixes of issue 14
pushes around the rejoin were rolled back, deletes during the outage came back when the owner
returned, and duplicates waited for the periodic pass; before those of issue 21 the hung owner's
late writes (pushes answered 504) replaced the acknowledged retries (stale=15 of 15).
"""
from __future__ import annotations

from kong_plugin_pgwshard.harness.drill import run_drill


def test_no_acknowledged_push_or_delete_is_undone_by_an_owners_death_and_return():
    result = run_drill(groups=30, seed=14)
    # the preconditions: the victim left the ring and rejoined it, pushes were rerouted meanwhile,
    # every delete of the drill was acknowledged
    assert result.problems == []
    assert result.deleted == 4 and result.rerouted > 0
    assert (result.lost, result.stale, result.misplaced, result.duplicates, result.resurrected) == (0, 0, 0, 0, 0), \
        str(result)


def test_a_hung_owners_late_writes_never_replace_the_acknowledged_retries():
    result = run_drill(groups=30, seed=21, fault="hang")
    # the preconditions: pushes to the hung owner timed out, were retried and acknowledged
    # elsewhere, the resumed owner applied some of them late, it left the ring and rejoined it
    assert result.problems == []
    assert result.timed_out > 0 and result.late_writes > 0 and result.rerouted > 0
    assert (result.lost, result.stale, result.misplaced, result.duplicates) == (0, 0, 0, 0), str(result)
