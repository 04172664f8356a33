"""Death to reroute in every Kong topology: seconds from a pushgateway's death (SIGKILL) until a
push of a group it owned gets 200 through every proxying node, in real Kong 3.9.3.

    python bench/topology_reroute_bench.py [--trials 5] [--profile shipped|fast|both]
        [--topology dbless|db|hybrid|hybrid-rpc|all]

The topologies are the tests' (harness/kong_topologies.py: README's lines, two DB-less nodes
(pgwshard-sync `kong.mode: declarative`), two DB-mode nodes or a control plane with two data
planes (`kong.mode: admin`), pgwshard-sync on probes). What adds up:
- pgwshard-sync's probes notice the death (`health.probes`: interval x fall; a refused
  connection fails at once) and write the targets (DB mode: a node's Admin API; hybrid: the CP's);
- hybrid only: the CP sends the change to the data planes (classic sync, or incremental sync
  with `cluster_rpc`);
- each node's plugin reads the targets again (`refresh_interval`, its Admin API in DB mode, its
  Status API on a data plane).

Profiles: `shipped`, the shipped defaults (probes every 1 s, fall 2; refresh_interval 2 s;
Kong's db_update_frequency 5 s); `fast`, probes every 0.2 s (timeout 0.2 s, fall 2),
refresh_interval 0.2 s and, on a hybrid CP, db_update_frequency 1 s. Each death comes `--settle`
seconds after the previous rejoin (default 6: a classic CP that pushed less than
db_update_frequency ago holds the next push until then; 0 measures that worst case). Prints each
trial, then per topology and profile the median and the worst.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from kong_plugin_pgwshard.core.grouping import parse_push_path
from kong_plugin_pgwshard.harness.kong import kong_binary
from kong_plugin_pgwshard.harness.kong_topologies import BODY, DblessTopology, DbModeTopology, HybridTopology, Topology
from kong_plugin_pgwshard.harness.postgres import Postgres
from kong_plugin_pgwshard.harness.processes import Pushgateway, http_request, wait_until

REPO = Path(__file__).resolve().parents[1]  # its README.md and kong/ files are what runs

PROFILES: dict[str, dict] = {
    "shipped": {"probes": None, "refresh_interval": 2, "cp": {}},
    "fast": {"probes": {"interval": "200ms", "timeout": "200ms", "rise": 2, "fall": 2}, "refresh_interval": 0.2,
             # classic hybrid sync: after each push the CP waits db_update_frequency before the
             # next (kong/clustering/control_plane.lua push_config_loop)
             "cp": {"db_update_frequency": "1"}},
}


def owned_path(topo: Topology, address: str) -> str:
    ring = topo.ring()
    for n in range(5000):
        path = f"/metrics/job/reroute/instance/r{n}"
        if ring.owner(parse_push_path(path)).name == address:
            return path
    raise RuntimeError(f"no path owned by {address}")


def trial(topo: Topology, victim_index: int, settle: float) -> float:
    victim = topo.pgws[victim_index]
    time.sleep(settle)  # a quiet spell before the death, measured as such (see the docstring)
    path = owned_path(topo, victim.address)
    for node in topo.proxies:  # the path reaches its owner everywhere before the death
        wait_until(lambda node=node: http_request(node.proxy_url + path, "PUT", BODY, timeout=10)[0] == 200, 15)
    victim.kill()
    died = time.monotonic()
    pending = set(range(len(topo.proxies)))
    rerouted: dict[int, float] = {}
    deadline = died + 60
    while pending and time.monotonic() < deadline:
        for n in list(pending):
            if http_request(topo.proxies[n].proxy_url + path, "PUT", BODY, timeout=10)[0] == 200:
                rerouted[n] = time.monotonic() - died
                pending.discard(n)
        time.sleep(0.02)
    if pending:
        raise RuntimeError(f"nodes {sorted(pending)} still failing 60 s after the death")
    # back, for the next trial
    topo.pgws[victim_index] = Pushgateway(port=victim.port, data_dir=victim.data_dir).start()
    topo.wait_targets({p.address for p in topo.pgws}, timeout=60)
    return max(rerouted.values())


def build(name: str, kong: str, pg: Postgres, profile: str) -> Topology:
    database = f"bench_{name.replace('-', '_')}_{profile}"
    if name == "dbless":
        # one node: DB-less nodes on one host share the Status API port the plugin reads
        # (reuseport), so a plugin could read the hash of one node and the targets of another,
        # which no real node does (each reads its own 127.0.0.1:8007)
        topo: Topology = DblessTopology(REPO, kong, nodes=1)
    elif name == "db":
        topo = DbModeTopology(REPO, kong, pg, database)
    else:
        topo = HybridTopology(REPO, kong, pg, database, rpc=name == "hybrid-rpc", cp_settings_extra=PROFILES[profile]["cp"])
    settings = PROFILES[profile]
    topo.patch_plugin({"refresh_interval": settings["refresh_interval"]})
    topo.start_sync(probes=settings["probes"])
    topo.wait_targets({p.address for p in topo.pgws}, timeout=60)
    topo.wait_plugin()
    return topo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--settle", type=float, default=6.0, help="seconds between a rejoin and the next death")
    parser.add_argument("--profile", choices=["shipped", "fast", "both"], default="both")
    parser.add_argument("--topology", choices=["dbless", "db", "hybrid", "hybrid-rpc", "all"], default="all")
    args = parser.parse_args()
    kong = kong_binary()
    if kong is None:
        sys.exit("no Kong: bash .ci/build-kong.sh, or set PGWSHARD_KONG")
    profiles = ["shipped", "fast"] if args.profile == "both" else [args.profile]
    topologies = ["dbless", "db", "hybrid", "hybrid-rpc"] if args.topology == "all" else [args.topology]
    results: dict[tuple[str, str], list[float]] = {}
    with Postgres() as pg:
        for name in topologies:
            for profile in profiles:
                topo = build(name, kong, pg, profile)
                try:
                    for t in range(args.trials):
                        seconds = trial(topo, t % len(topo.pgws), args.settle)
                        results.setdefault((name, profile), []).append(seconds)
                        print(f"{name:10s} {profile:7s} trial {t + 1}: every node rerouted after {seconds:.2f} s",
                              flush=True)
                finally:
                    topo.stop()
    print()
    for (name, profile), values in results.items():
        print(f"{name:10s} {profile:7s} death to reroute on every node: median {statistics.median(values):.2f} s, "
              f"worst {max(values):.2f} s over {len(values)} trials")


if __name__ == "__main__":
    main()
