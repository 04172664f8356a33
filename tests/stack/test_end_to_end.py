"""End to end, real processes only: four pushgateways registered in a real Consul by a real
pgwshard-sync process, the plugin server behind the OpenResty host following the daemon's
membership file, and a real Prometheus scraping every pushgateway with honor_labels: true.

Debian's Prometheus is built without Consul discovery, so Prometheus here scrapes all four
instances from a file (which also catches a group left behind on a non-owner); the Docker stack
uses consul_sd_configs with the official image.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

import pytest
import yaml
from prometheus_client import (
    CollectorRegistry,
    Counter,
    delete_from_gateway,
    push_to_gateway,
)

from kong_plugin_pgwshard.core.file_sd import read_file_sd
from kong_plugin_pgwshard.core.grouping import GroupingKey, parse_push_path
from kong_plugin_pgwshard.core.ring import Member, Ring
from kong_plugin_pgwshard.harness.nginx import NginxHost
from kong_plugin_pgwshard.harness.processes import (
    ManagedProcess,
    PluginServer,
    Pushgateway,
    consul_binary,
    http_request,
    temp_dir,
    wait_until,
)
from kong_plugin_pgwshard.harness.prometheus import Prometheus

pytestmark = pytest.mark.skipif(consul_binary() is None, reason="no consul binary (run .ci/build-consul.sh)")


def call(url: str, method: str = "PUT", body: bytes = b"# TYPE e2e_items counter\ne2e_items 7\n") -> int:
    return http_request(url, method, body if method in ("PUT", "POST") else None, timeout=10)[0]


class World:
    def __init__(self, consul, rebalance: bool = False, with_prometheus: bool = True):
        self.consul = consul
        self.rebalance = rebalance
        self.pgws = [Pushgateway().start() for _ in range(4)]
        self.dir = temp_dir("pgwshard-e2e-")
        self.members_file = f"{self.dir}/members.json"
        self.daemon = self.start_daemon()
        wait_until(lambda: len(self.members()) == 4, 30, what="all four healthy in Consul and in the file")
        self.server = PluginServer().start()
        self.host = NginxHost(self.server.socket_path, {"membership": "file", "membership_file": self.members_file,
                                                        "refresh_interval": 0.5},
                              [p.address for p in self.pgws]).start()
        self.prometheus = Prometheus([p.address for p in self.pgws]).start() if with_prometheus else None

    def start_daemon(self, weights: dict[str, int] | None = None) -> ManagedProcess:
        """pgwshard-sync on a config listing the pushgateways, with `weights` by address."""
        config = f"{self.dir}/pgwshard.yml"
        with open(config, "w") as f:
            yaml.safe_dump({
                "pushgateways": [{"address": p.address, "weight": (weights or {}).get(p.address, 100)}
                                 for p in self.pgws],
                "consul": {"address": self.consul.url, "wait": "5s",
                           "register": {"enabled": True, "check_interval": "1s", "check_timeout": "1s"}},
                "membership": {"hold_down": "2s"},
                "file_sd": {"path": self.members_file},
                "rebalance": {"enabled": self.rebalance, "max_ops_per_second": 200},
                "metrics": {"listen": "127.0.0.1:0"},
            }, f)
        return ManagedProcess("pgwshard-sync", [sys.executable, "-m", "kong_plugin_pgwshard.sync.daemon",
                                                "--config", config]).start()

    def membership(self) -> list[Member]:
        """What the file pgwshard-sync writes lists (Prometheus' targets, weights included)."""
        try:
            return read_file_sd(self.members_file)
        except (OSError, ValueError):
            return []

    def members(self) -> set[str]:
        """The members that take groups."""
        return {m.name for m in self.membership() if m.weight > 0}

    def ring(self) -> Ring:
        return Ring(self.membership())

    def holders(self, key: GroupingKey) -> list[str]:
        return [p.address for p in self.pgws if p.running
                and any(GroupingKey.from_labels(g["labels"]) == key for g in p.groups())]

    def stop(self):
        for part in (self.prometheus, self.host, self.server, self.daemon, *self.pgws):
            if part is not None:
                part.stop()


@contextmanager
def a_world(**options):
    from kong_plugin_pgwshard.harness.processes import Consul
    consul = Consul().start()
    w = None
    try:
        w = World(consul, **options)
        yield w
    finally:
        if w:
            w.stop()
        consul.stop()


@pytest.fixture(scope="module")
def world():
    """Shared by the tests that only push and read: none of them changes membership."""
    with a_world() as w:
        yield w


@pytest.fixture
def own_world():
    """A stack of its own, for a test that kills or drains a pushgateway."""
    with a_world(with_prometheus=False) as w:
        yield w


def test_pushes_spread_over_every_instance_each_on_its_owner(world):
    paths = [f"/metrics/job/batch/instance/host-{i}" for i in range(80)]
    for path in paths:
        assert call(world.host.url + path) == 200
    ring = world.ring()
    for path in paths:
        key = parse_push_path(path)
        assert world.holders(key) == [ring.owner(key).name], path
    assert all(p.groups() for p in world.pgws)


def test_every_spelling_of_a_group_lands_on_one_instance(world):
    spellings = ["/metrics/job/spell/a/1/b/x", "/metrics/job/spell/b/x/a/1", "/metrics/job@base64/c3BlbGw/a/1/b@base64/eA",
                 "/metrics/job/spell/job/decoy/a/1/b/x", "/metrics/job/%73pell/a/%31/b/x"]
    for path in spellings:
        assert call(world.host.url + path) == 200
    key = GroupingKey.from_labels({"job": "spell", "a": "1", "b": "x"})
    assert world.holders(key) == [world.ring().owner(key).name]


def test_prometheus_client_default_handler_works_through_the_gateway(world):
    registry = CollectorRegistry()
    Counter("e2e_client_runs", "runs", registry=registry).inc(5)
    grouping = {"instance": "worker/7", "region": "eu west"}
    push_to_gateway(world.host.url, "client-job", registry, grouping_key=grouping)
    key = GroupingKey.from_labels({"job": "client-job", **grouping})
    assert world.holders(key) == [world.ring().owner(key).name]
    delete_from_gateway(world.host.url, "client-job", grouping_key=grouping)
    wait_until(lambda: world.holders(key) == [], 5, what="DELETE reached the owner")


def test_bad_paths_are_answered_400_by_the_gateway(world):
    before = sum(len(p.groups()) for p in world.pgws)
    for path in ["/metrics/job/x/odd", "/metrics/job/", "/metrics/job/x/__name__/y", "/metrics/job/x/a@base64/%%%"]:
        assert call(world.host.url + path) == 400, path
    assert sum(len(p.groups()) for p in world.pgws) == before


def test_prometheus_sees_each_group_from_exactly_one_instance(world):
    for i in range(30):
        assert call(world.host.url + f"/metrics/job/scraped/instance/s{i}") == 200

    def scraped_once() -> bool:
        series = world.prometheus.query('count by (job, instance) (e2e_items{job="scraped"})')
        return len(series) == 30 and all(s["value"][1] == "1" for s in series)

    wait_until(scraped_once, 30, interval=0.5, what="30 groups, each from one pushgateway")
    assert {s["metric"]["pushgateway"] for s in world.prometheus.query('e2e_items{job="scraped"}')} <= \
        {p.address for p in world.pgws}


def test_killing_one_instance_moves_only_its_groups(own_world):
    world = own_world
    paths = [f"/metrics/job/kill/instance/k{i}" for i in range(60)]
    for path in paths:
        assert call(world.host.url + path) == 200
    before = world.ring()
    owners = {p: before.owner(parse_push_path(p)).name for p in paths}
    victim = world.pgws[0]
    victim.kill()
    wait_until(lambda: victim.address not in world.members(), 15, what="the dead instance leaves the membership")
    after = world.ring()
    # The plugin reads the file every 0.5 s; until then a push owned by the dead instance gets 502.
    wait_until(lambda: all(call(world.host.url + p) == 200 for p in paths), 10, what="plugin follows")
    for path in paths:
        key = parse_push_path(path)
        if owners[path] != victim.address:
            assert world.holders(key) == [owners[path]], path  # untouched groups stay where they were
        else:
            assert world.holders(key) == [after.owner(key).name], path


def test_draining_a_pushgateway_moves_its_groups_and_pushes_keep_landing_on_owners():
    """Weight 0 in pgwshard.yml drains a pushgateway: it takes no new groups, the rebalancer moves
    its groups to their owners, and every group ends on exactly one instance."""
    with a_world(rebalance=True, with_prometheus=False) as world:
        paths = [f"/metrics/job/drain/instance/d{i}" for i in range(60)]
        for path in paths:
            assert call(world.host.url + path) == 200
        drained = world.pgws[0]
        assert drained.groups()  # 60 keys over four equal members: it holds some
        world.daemon.stop()
        world.daemon = world.start_daemon(weights={drained.address: 0})
        wait_until(lambda: drained.address not in world.members() and len(world.members()) == 3, 30,
                   what="the drained instance leaves the ring of the file the plugin reads")
        # ... but stays listed with weight 0, so Prometheus scrapes its groups until they moved
        assert Member.parse(drained.address, 0) in world.membership()
        wait_until(lambda: drained.groups() == [], 60, what="its groups moved away")
        ring = world.ring()
        for path in paths:  # pushes keep landing on owners, none on the drained one
            assert call(world.host.url + path) == 200
        for path in paths:
            key = parse_push_path(path)
            assert world.holders(key) == [ring.owner(key).name], path  # one copy, on its owner
        assert drained.groups() == [] and drained.running
