"""`pgwshard`: operator commands.

    pgwshard locate [--nodes H:P,H:P | --nodes-file SD.json] [--prefix P] PATH...
        the canonical grouping key and the owning pushgateway of each push path
    pgwshard rebalance [--nodes H:P,H:P | --nodes-file SD.json] [--instances H:P,...] [--dry-run]
        move every group to its owner on the ring (docs/rebalancing.md); --dry-run prints the plan
"""
from __future__ import annotations

import argparse
import os
import sys

from .core.file_sd import read_file_sd
from .core.grouping import parse_push_path
from .core.ring import Member, Ring
from .errors import GroupingKeyError, NoMembersError
from .rebalance.rebalancer import Rebalancer

NODES_ENV = "PGWSHARD_NODES"


def add_membership_arguments(parser: argparse.ArgumentParser) -> None:
    """--nodes / --nodes-file, shared by every command that needs the ring."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--nodes", help=f"pushgateways as host:port,host:port (default: ${NODES_ENV})")
    group.add_argument("--nodes-file", help="a Prometheus file_sd JSON file listing the pushgateways "
                                             "(pgwshard-sync's file sink writes one)")


def ring_from_arguments(args: argparse.Namespace) -> Ring:
    """The ring the arguments name; exits with a message when they name none."""
    try:
        if args.nodes_file:
            return Ring(read_file_sd(args.nodes_file))
        text = args.nodes or os.environ.get(NODES_ENV, "")
        return Ring(Member.parse(n) for n in text.split(",") if n.strip())
    except (OSError, ValueError) as err:
        sys.exit(f"pgwshard: bad membership: {err}")


def locate(args: argparse.Namespace) -> int:
    ring = ring_from_arguments(args)
    status = 0
    for path in args.paths:
        try:
            key = parse_push_path(path, args.prefix)
            if key is None:
                print(f"{path}\tnot a push path (left to the route's upstream)")
                continue
            print(f"{path}\t{key}\t{ring.owner(key).name}")
        except (GroupingKeyError, NoMembersError) as err:
            print(f"{path}\terror: {err}")
            status = 1
    return status


def rebalance(args: argparse.Namespace) -> int:
    """Print the plan (--dry-run) or run one reconciliation and print its report."""
    ring = ring_from_arguments(args)
    if not len(ring):
        sys.exit("pgwshard: rebalance needs the ring's members (--nodes, --nodes-file or $PGWSHARD_NODES)")
    try:
        instances = [Member.parse(n) for n in (args.instances or "").split(",") if n.strip()]
        rebalancer = Rebalancer(max_ops_per_second=args.max_ops_per_second, timeout=args.timeout)
    except ValueError as err:
        sys.exit(f"pgwshard: rebalance: {err}")
    if args.dry_run:
        for move in rebalancer.plan(ring, instances):
            print(f"{move.key}\t{move.source}\t{move.target}\t{move.action}\t{move.reason}")
        for name in rebalancer.unreachable:
            print(f"pgwshard: {name} is unreachable: its groups are not in the plan", file=sys.stderr)
        return 1 if rebalancer.unreachable else 0
    report = rebalancer.reconcile(ring, instances)
    print(report)
    for error in report.errors:
        print(f"pgwshard: {error}", file=sys.stderr)
    return 1 if report.failed or report.unreachable else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgwshard", description="pgwshard operator commands")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("locate", help="which pushgateway owns each push path")
    add_membership_arguments(p)
    p.add_argument("--prefix", default="", help="route prefix before /metrics/job")
    p.add_argument("paths", nargs="+", metavar="PATH", help="push paths as a client sends them")
    p.set_defaults(run=locate)

    p = commands.add_parser("rebalance", help="move every group to the pushgateway that owns it")
    add_membership_arguments(p)
    p.add_argument("--instances", help="more pushgateways to drain (host:port,...), e.g. ones that "
                                       "left the ring but still run; ring members are always included")
    p.add_argument("--dry-run", action="store_true", help="print the plan (group, from, to, action) "
                                                          "and change nothing")
    p.add_argument("--max-ops-per-second", type=float, default=50.0, help="pace of PUTs and DELETEs")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per pushgateway request")
    p.set_defaults(run=rebalance)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.run(args))


if __name__ == "__main__":
    main()
