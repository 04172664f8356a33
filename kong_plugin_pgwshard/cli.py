"""`pgwshard`: operator commands.

Each takes the ring as --nodes H:P[=WEIGHT],H:P | --nodes-file SD.json | --config pgwshard.yml:
    pgwshard locate RING [--prefix P] PATH...
        the canonical grouping key and the owning pushgateway of each push path
    pgwshard rebalance RING [--instances H:P,...] [--dry-run]
        move every group to its owner on the ring (docs/rebalancing.md); --dry-run prints the plan
    pgwshard status RING [--json]
        members, their health and weight, groups per member, groups not on their owner,
        duplicated groups, newest and oldest push per member; exit 1 when something needs
        attention, a known pushgateway missing from the ring included
    pgwshard host render|run --prefix DIR --listen ADDR --plugin-config FILE --upstream IP:PORT,...
        the nginx + Lua host under your own nginx (host/command.py)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import yaml

from .clients.kong import KongAdmin
from .clients.pushgateway import PushgatewayClient
from .core.file_sd import read_file_sd_outside
from .core.grouping import GroupingKey, parse_push_path
from .core.kong_uri import forwarded_path
from .core.ring import Member, Ring
from .errors import GroupingKeyError, NoMembersError, UpstreamError
from .host.command import add_parser as add_host_parser
from .rebalance.rebalancer import Rebalancer, client_push_time

NODES_ENV = "PGWSHARD_NODES"


def add_membership_arguments(parser: argparse.ArgumentParser, timeout: float) -> None:
    """--nodes / --nodes-file / --config and --timeout, shared by every command that needs the ring."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--nodes", help="pushgateways as host:port,host:port; host:port=weight gives one "
                                        f"a weight other than 100 (0 drains it) (default: ${NODES_ENV})")
    group.add_argument("--nodes-file", help="a Prometheus file_sd JSON file listing the pushgateways "
                                             "(pgwshard-sync's file sink writes one)")
    group.add_argument("--config", help="pgwshard-sync's config: the ring from its kong or file_sd section, "
                                        "every pushgateway it lists")
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per pushgateway or Kong request")


@dataclass
class Membership:
    ring: Ring
    known: list[Member]  # pushgateways that belong in the ring: configured, or listed as out of it
    source: str          # where the ring came from, for people


def membership_from_arguments(args: argparse.Namespace, command: str) -> Membership:
    """The ring the arguments name, and the pushgateways known beside it; exits with a message
    naming the options when they name nothing, or when what they name cannot be read."""
    text = args.nodes or os.environ.get(NODES_ENV, "")
    if not (args.config or args.nodes_file or text.strip()):
        sys.exit(f"pgwshard: {command} needs the ring's members: pass --nodes HOST:PORT,..., --nodes-file "
                 f"SD.json or --config pgwshard.yml (or set ${NODES_ENV})")
    if args.config:
        return ring_from_sync_config(args.config, args.timeout)
    try:
        if args.nodes_file:
            members, outside = read_file_sd_outside(args.nodes_file)
            return Membership(Ring(members), outside, "--nodes-file " + args.nodes_file)
        return Membership(Ring(Member.parse_weighted(n) for n in text.split(",") if n.strip()), [],
                          "--nodes" if args.nodes else f"${NODES_ENV}")
    except (OSError, ValueError) as err:
        sys.exit(f"pgwshard: bad membership: {err}")


def locate(args: argparse.Namespace) -> int:
    ring = membership_from_arguments(args, "locate").ring
    status = 0
    for path in args.paths:
        try:
            # as the plugin keys it: by the path Kong forwards
            key = parse_push_path(forwarded_path(path), args.prefix)
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
    membership = membership_from_arguments(args, "rebalance")
    ring = membership.ring
    if not len(ring):
        sys.exit(f"pgwshard: rebalance: the ring from {membership.source} is empty: nothing can own a group")
    try:
        extra = [Member.parse(n) for n in (args.instances or "").split(",") if n.strip()]
        rebalancer = Rebalancer(max_ops_per_second=args.max_ops_per_second, timeout=args.timeout,
                                quiet=args.quiet)
    except ValueError as err:
        sys.exit(f"pgwshard: rebalance: {err}")
    instances = membership.known + extra  # known pushgateways out of the ring may still hold groups
    if args.dry_run:
        moves = rebalancer.plan(ring, instances)
        for move in moves:
            print(f"{move.key}\t{move.source}\t{move.target}\t{move.action}\t{move.reason}")
        for name in rebalancer.unreachable:
            print(f"pgwshard: {name} is unreachable: its groups are not in the plan", file=sys.stderr)
        if not moves:  # (on stderr, as the unreachable ones: stdout is the plan, one move a line)
            where = "on the pushgateways that answered " if rebalancer.unreachable else ""
            print(f"pgwshard: nothing to move: every group {where}is on its owner, once", file=sys.stderr)
        return 1 if rebalancer.unreachable else 0
    report = rebalancer.reconcile(ring, instances)
    print(report)
    for error in report.errors:
        print(f"pgwshard: {error}", file=sys.stderr)
    return 1 if report.failed or report.unreachable else 0


# --- status ------------------------------------------------------------------------------------

@dataclass
class MemberStatus:
    """One pushgateway as `pgwshard status` saw it."""

    pushgateway: str
    in_ring: bool
    weight: int | None          # its weight (0: drained); None when the membership does not list it
    healthy: bool               # GET /-/healthy answered 200
    groups: int | None = None   # None when its groups could not be listed
    not_owned: int | None = None  # groups it holds that the ring gives to another member
    newest_push: float | None = None  # newest and oldest client push of its groups (Unix time;
    oldest_push: float | None = None  # a rebalanced copy counts by its original push)
    error: str | None = None


@dataclass
class Status:
    ring_source: str
    members: list[MemberStatus]
    misplaced: list[dict] = field(default_factory=list)   # groups their owner does not hold
    duplicated: list[dict] = field(default_factory=list)  # groups held by more than one member
    attention: list[str] = field(default_factory=list)    # what needs someone; empty: all well


def survey(ring: Ring, instances: Sequence[Member], ring_source: str, timeout: float = 5.0,
           known: Sequence[Member] = ()) -> Status:
    """Ask every ring member, every known pushgateway (configured, or listed as out of the ring:
    one missing from the ring needs attention) and every other instance for its health and groups."""
    in_ring = {m.name: m for m in ring.members}
    missing = {m.name for m in known} - set(in_ring)
    names = sorted(set(in_ring) | {m.name for m in instances} | missing)
    status = Status(ring_source, [])
    holders: dict[GroupingKey, list[str]] = {}
    if not any(m.weight > 0 for m in ring.members):
        status.attention.append("no pushgateway in the ring takes groups: every push is answered 503")
    for name in names:
        client = PushgatewayClient(name, timeout=timeout)
        # a member of weight 0 is listed (Kong's targets, the file) but drained: not in the ring
        member = MemberStatus(name, name in in_ring and in_ring[name].weight > 0,
                              in_ring[name].weight if name in in_ring else None,
                              client.healthy())
        status.members.append(member)
        try:
            groups = client.groups()
        except UpstreamError as err:
            member.error = str(err)
            status.attention.append(f"{name} ({'in' if member.in_ring else 'not in'} the ring) cannot be listed: {err}")
            continue
        if not member.healthy:
            status.attention.append(f"{name} answers but /-/healthy does not")
        elif name in missing:
            status.attention.append(f"{name} is known but not in the ring (held down after failing checks, "
                                    "or the membership was not written since it came back)")
        pushes = [client_push_time(g) for g in groups]
        member.groups = len(groups)
        member.newest_push, member.oldest_push = (max(pushes), min(pushes)) if pushes else (None, None)
        member.not_owned = 0
        for group in groups:
            holders.setdefault(group.key, []).append(name)
            owner = _owner(ring, group.key)
            member.not_owned += owner is not None and owner != name
    for key in sorted(holders, key=str):
        owner = _owner(ring, key)
        if owner is not None and owner not in holders[key]:
            status.misplaced.append({"group": str(key), "on": holders[key], "owner": owner})
        if len(holders[key]) > 1:
            status.duplicated.append({"group": str(key), "on": holders[key], "owner": owner})
    if status.misplaced:
        whose = "its" if len(status.misplaced) == 1 else "their"
        status.attention.append(f"{_count(status.misplaced, 'group')} not on {whose} owner")
    if status.duplicated:
        status.attention.append(f"{_count(status.duplicated, 'duplicated group')}")
    return status


def _owner(ring: Ring, key: GroupingKey) -> str | None:
    try:
        return ring.owner(key).name
    except NoMembersError:
        return None


def _count(items: Sequence, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def ring_from_sync_config(path: str, timeout: float) -> Membership:
    """The ring pgwshard-sync applies, read from what its config names: the Kong upstream's
    targets (with their weights), else the file_sd file it writes, else the configured
    pushgateways that answer /-/healthy now. Reads only those keys (pgwshard-sync --check
    validates the whole file); also returns the configured pushgateways."""
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
        if not isinstance(config, dict):
            raise ValueError("expected a mapping")
        known = [_configured(p) for p in config.get("pushgateways") or []]
        kong, file_sd = config.get("kong"), config.get("file_sd")
        if kong:
            url = (kong.get("nodes") or [kong.get("admin_url") or "http://127.0.0.1:8001"])[0]
            upstream = kong.get("upstream") or "pushgateways"
            token = kong.get("admin_token") or os.environ.get("KONG_ADMIN_TOKEN") or None
            targets = KongAdmin(url, token, timeout).targets(upstream)
            members = [Member.parse(t["target"], int(t.get("weight", 100))) for t in targets]
            return Membership(Ring(members), known, f"Kong upstream {upstream} at {url}")
        if file_sd and file_sd.get("path"):
            in_ring, outside = read_file_sd_outside(file_sd["path"])
            return Membership(Ring(in_ring), _union(known, outside), f"file_sd {file_sd['path']}")
    except (OSError, ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError, UpstreamError) as err:
        sys.exit(f"pgwshard: {path}: {err}")  # a wrong shape too: `pgwshard-sync --check` says which key
    healthy = [m for m in known if PushgatewayClient(m.name, timeout=timeout).healthy()]
    return Membership(Ring(healthy), known,
                      "the configured pushgateways that answer /-/healthy (no kong or file_sd section)")


def _union(first: Sequence[Member], second: Sequence[Member]) -> list[Member]:
    names = {m.name for m in first}
    return [*first, *(m for m in second if m.name not in names)]


def _configured(entry) -> Member:
    """A `pushgateways` entry of pgwshard-sync's config: "host:port" or {address, weight}."""
    if isinstance(entry, dict):
        return Member.parse(str(entry.get("address")), int(entry.get("weight", 100)))
    return Member.parse(str(entry))


def status(args: argparse.Namespace) -> int:
    """Print where everything is; 1 when something needs attention."""
    try:
        extra = [Member.parse(n) for n in (args.instances or "").split(",") if n.strip()]
    except ValueError as err:
        sys.exit(f"pgwshard: status: {err}")
    membership = membership_from_arguments(args, "status")
    report = survey(membership.ring, extra, membership.source, args.timeout, membership.known)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print(render_status(report, time.time()))
    return 1 if report.attention else 0


def render_status(report: Status, now: float, limit: int = 20) -> str:
    """The status as a table for people (the JSON has everything)."""
    rows = [("pushgateway", "ring", "weight", "health", "groups", "not owned", "newest push", "oldest push")]
    for m in report.members:
        rows.append((m.pushgateway, "yes" if m.in_ring else "no", "-" if m.weight is None else str(m.weight),
                     "unreachable" if m.error else "healthy" if m.healthy else "unhealthy",
                     _or_dash(m.groups), _or_dash(m.not_owned), _when(m.newest_push, now), _when(m.oldest_push, now)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"ring from {report.ring_source}"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    for title, entries in (("groups not on their owner", report.misplaced), ("duplicated groups", report.duplicated)):
        if entries:
            lines += ["", f"{title} ({len(entries)}):"]
            lines += [f"  {e['group']}  on {', '.join(e['on'])}  owner {e['owner'] or '-'}" for e in entries[:limit]]
            if len(entries) > limit:
                lines.append(f"  ... and {len(entries) - limit} more (--json lists all)")
    lines.append("")
    lines += [f"needs attention: {item}" for item in report.attention] or ["all well: every group on its owner, once"]
    return "\n".join(lines)


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def _when(stamp: float | None, now: float) -> str:
    if stamp is None:
        return "-"
    if stamp <= 0:
        return "never"  # a push Pushgateway refused leaves a group stamped 0
    age = max(0, int(now - stamp))
    ago = f"{age}s" if age < 120 else f"{age // 60}m" if age < 7200 else f"{age // 3600}h" if age < 172800 else f"{age // 86400}d"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp)) + f" ({ago} ago)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgwshard", description="pgwshard operator commands")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("locate", help="which pushgateway owns each push path")
    add_membership_arguments(p, timeout=5.0)
    p.add_argument("--prefix", default="", help="route prefix before /metrics/job")
    p.add_argument("paths", nargs="+", metavar="PATH", help="push paths as a client sends them")
    p.set_defaults(run=locate)

    p = commands.add_parser("rebalance", help="move every group to the pushgateway that owns it")
    add_membership_arguments(p, timeout=10.0)
    p.add_argument("--instances", help="more pushgateways to drain (host:port,...), e.g. ones that "
                                       "left the ring but still run; ring members are always included")
    p.add_argument("--dry-run", action="store_true", help="print the plan (group, from, to, action) "
                                                          "and change nothing")
    p.add_argument("--max-ops-per-second", type=float, default=50.0, help="pace of PUTs and DELETEs")
    p.add_argument("--quiet", type=float, default=0.0, metavar="SECONDS",
                   help="leave a copy pushed less than SECONDS ago where it is (its client's next push goes "
                        "to the owner; a copy racing that push would overwrite it); pgwshard-sync waits 10 s")
    p.set_defaults(run=rebalance)

    p = commands.add_parser("status", help="members, health, groups per member, misplaced and duplicated groups")
    add_membership_arguments(p, timeout=5.0)
    p.add_argument("--instances", help="more pushgateways to look at (host:port,...), e.g. ones that left the ring")
    p.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")
    p.set_defaults(run=status)

    add_host_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.run(args))


if __name__ == "__main__":
    main()
