"""The misplaced-groups gauge that PgwshardGroupsMisplaced alerts on, against real pushgateways."""
from __future__ import annotations

from prometheus_client import CollectorRegistry

from kong_plugin_pgwshard.clients.pushgateway import PushgatewayClient
from kong_plugin_pgwshard.core.grouping import GroupingKey
from kong_plugin_pgwshard.core.ring import Member, Ring
from kong_plugin_pgwshard.rebalance.rebalancer import Rebalancer


def test_misplaced_counts_the_copies_on_non_owners_each_pass_found(pushgateways):
    pgws = pushgateways(2)
    ring = Ring(Member.parse(p.address) for p in pgws)
    keys = [GroupingKey.from_labels({"job": "gauge", "instance": f"i{n}"}) for n in range(6)]
    for key in keys:  # on both: one stray copy per group
        for pgw in pgws:
            PushgatewayClient(pgw.address).put_group(key, "x 1\n")
    registry = CollectorRegistry()
    rebalancer = Rebalancer(max_ops_per_second=500, registry=registry)

    rebalancer.reconcile(ring)
    assert registry.get_sample_value("pgwshard_rebalance_groups_misplaced") == len(keys)
    rebalancer.reconcile(ring)
    assert registry.get_sample_value("pgwshard_rebalance_groups_misplaced") == 0
