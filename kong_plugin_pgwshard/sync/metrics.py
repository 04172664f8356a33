"""pgwshard-sync's own metrics, on its own CollectorRegistry (served on `metrics.listen`)."""
from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)


class DaemonMetrics:
    """The daemon's health, as an operator alerts on it: is the source up, do sinks keep up."""

    def __init__(self, registry: CollectorRegistry):
        self.members = Gauge("pgwshard_members", "Pushgateways in the applied membership.", registry=registry)
        self.changes = Counter("pgwshard_membership_changes", "Applied membership changes.", registry=registry)
        self.sync_errors = Counter("pgwshard_sync_errors", "Failed sink writes.", ["sink"], registry=registry)
        self.source_errors = Counter("pgwshard_health_source_errors", "Health source failures.", registry=registry)
        self.source_up = Gauge("pgwshard_health_source_up", "1 when the last health query succeeded.",
                               registry=registry)
        # What "down or stale" alerts read: a hung or failing source stops it, whatever the sinks do.
        self.source_last_success = Gauge("pgwshard_health_source_last_success_timestamp_seconds",
                                         "Unix time of the last successful health query (0: never).",
                                         registry=registry)
        self.member_healthy = Gauge("pgwshard_member_healthy", "1 when the health source's latest view "
                                    "has this known pushgateway healthy.", ["pushgateway"], registry=registry)
        self.member_in_ring = Gauge("pgwshard_member_in_ring", "1 when this known pushgateway is in the "
                                    "applied membership (the ring).", ["pushgateway"], registry=registry)
        self.last_good_sync = 0.0
        since = Gauge("pgwshard_seconds_since_last_good_sync",
                      "Seconds since all sinks last held the applied set (-1: never).", registry=registry)
        since.set_function(lambda: time.time() - self.last_good_sync if self.last_good_sync else -1)
        self.watch_latency = Histogram("pgwshard_health_query_seconds", "Duration of each health query "
                                       "(a Consul blocking query returns on change or after its wait).",
                                       buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60), registry=registry)


    def show_members(self, known, healthy, applied) -> None:
        """One pgwshard_member_* series per known pushgateway (Members), 0 or 1."""
        for member in known:
            self.member_healthy.labels(member.name).set(member in healthy)
            self.member_in_ring.labels(member.name).set(member in applied)


def serve(listen: str, registry: CollectorRegistry) -> None:
    """Serve `registry` on host:port (an empty host listens on every address)."""
    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry)
