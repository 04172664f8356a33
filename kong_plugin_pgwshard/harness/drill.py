"""The fault drill: pushes and deletes racing an owner's death, outage and return.

Real processes on loopback: 3 pushgateways (persistence every PERSISTENCE_INTERVAL), the plugin
server behind the nginx host (membership from pgwshard-sync's file, read every second; DELETE
routed to pgwshard-sync's delete API), and pgwshard-sync as its own process on 1 s probes. One
round:

1. every group is pushed through the gateway; the owner of the most groups (the victim) writes
   its persistence file;
2. pushes keep coming (every group, every ~0.3 s); the victim is killed (SIGKILL) while some of
   its groups are being deleted; more of its groups are deleted during the outage;
3. the victim comes back with its persistence file; every group still alive gets one last push
   at a random moment within 2 s of its rejoining the ring (the plugin follows within 1 s, so
   some go to the stand-in owner);
4. after convergence: every acknowledged push (200) must be there with its newest acknowledged
   value on exactly its owner, every acknowledged delete (202) must have stuck.

Free of pytest: tests/stack/test_fault_drill.py and bench/fault_drill.py both call run_drill().
"""
from __future__ import annotations

import json
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..core.grouping import GroupingKey
from ..core.ring import Member, Ring
from .nginx import NginxHost
from .processes import ManagedProcess, PluginServer, Pushgateway, free_port, http_request, temp_dir, wait_until

VALUE = "drill_value"


@dataclass
class DrillResult:
    groups: int = 0
    deleted: int = 0           # acknowledged deletes
    lost: int = 0              # groups whose newest acknowledged value is nowhere
    stale: int = 0             # ... or only older on the owner
    misplaced: int = 0         # ... newest value present, but not on the owner
    duplicates: int = 0        # groups with copies on more than one instance
    resurrected: int = 0       # acknowledged deletes undone
    converged_seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.stale or self.misplaced or self.duplicates or self.resurrected)

    def __str__(self) -> str:
        return (f"groups={self.groups} deleted={self.deleted} lost={self.lost} stale={self.stale} "
                f"misplaced={self.misplaced} duplicates={self.duplicates} resurrected={self.resurrected} "
                f"converged={self.converged_seconds:.1f}s")


def _send(url: str, method: str, body: bytes | None = None) -> int:
    """The status, 0 when no answer came."""
    try:
        return http_request(url, method, body, timeout=5)[0]
    except OSError:
        return 0


def _held(pgw: Pushgateway) -> dict[GroupingKey, float]:
    out = {}
    for group in pgw.groups():
        family = group.get(VALUE)
        value = float(family["metrics"][0]["value"]) if family else -1.0
        out[GroupingKey.from_labels(group["labels"])] = value
    return out


class _Stack:
    def __init__(self, delete_api: bool = True) -> None:
        self.work = Path(temp_dir("pgwshard-drill-"))
        self.pgws = [Pushgateway() for _ in range(3)]
        self.members_file = self.work / "members.json"
        self.delete_port = free_port() if delete_api else None
        config = self.work / "pgwshard.yml"
        deletes = {"deletes": {"listen": f"127.0.0.1:{self.delete_port}",
                               "tombstone_file": str(self.work / "tombstones.json")}} if delete_api else {}
        config.write_text(json.dumps({
            "pushgateways": [p.address for p in self.pgws],
            "health": {"source": "probes", "probes": {"interval": "1s", "timeout": "0.5s", "rise": 2, "fall": 2}},
            "membership": {"hold_down": "2s"},
            "file_sd": {"path": str(self.members_file)},
            "rebalance": {"enabled": True, "interval": "10s", "settle": "2s", "follow_up": "3s",
                          "max_ops_per_second": 200},
            **deletes,
            "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        }))
        self.sync = ManagedProcess("pgwshard-sync", [sys.executable, "-m", "kong_plugin_pgwshard.sync.daemon",
                                                     "--config", str(config)])
        self.server = PluginServer()
        self.host: NginxHost | None = None
        self.parts: list = []

    def start(self) -> _Stack:
        for pgw in self.pgws:
            self.parts.append(pgw.start())
        self.parts.append(self.sync.start())
        wait_until(lambda: self.members() == {p.address for p in self.pgws}, 20, what="pgwshard-sync's membership")
        self.parts.append(self.server.start())
        self.host = NginxHost(self.server.socket_path, {"membership": "file", "membership_file": str(self.members_file),
                                                        "refresh_interval": 1}, [p.address for p in self.pgws],
                              deletes=f"127.0.0.1:{self.delete_port}" if self.delete_port else None)
        self.parts.append(self.host.start())
        return self

    def stop(self) -> None:
        for part in reversed(self.parts):
            try:
                part.stop()
            except Exception:  # noqa: BLE001 - stop everything else regardless
                pass

    def members(self) -> set[str] | None:
        try:
            return set(json.loads(self.members_file.read_text())[0]["targets"])
        except (OSError, ValueError, IndexError, KeyError):
            return None


def run_drill(groups: int = 30, seed: int | None = None, converge_timeout: float = 60.0,
              delete_api: bool = True) -> DrillResult:
    """One round of the drill; returns its counts (never raises for a data-safety failure).

    delete_api=False: DELETE goes straight to the owner (or its stand-in), as without
    pgwshard-sync's delete API, to show what that API prevents."""
    rng = random.Random(seed)
    keys = [GroupingKey.from_labels({"job": "drill", "instance": f"i{n:03d}"}) for n in range(groups)]
    stack = _Stack(delete_api).start()
    result = DrillResult(groups=groups)
    newest: dict[GroupingKey, int] = {}   # newest acknowledged value
    deleted: set[GroupingKey] = set()     # acknowledged deletes
    counter = [0]
    try:
        assert stack.host is not None
        gateway = stack.host.url

        def push(key: GroupingKey) -> None:
            counter[0] += 1
            value = counter[0]
            if _send(gateway + key.path(), "PUT", f"{VALUE} {value}\n".encode()) == 200:
                newest[key] = value

        def delete(key: GroupingKey) -> None:
            status = _send(gateway + key.path(), "DELETE")
            if status == 202:
                deleted.add(key)
                newest.pop(key, None)
            else:
                result.problems.append(f"DELETE {key} answered {status}")

        def push_round(live: list[GroupingKey]) -> None:
            for key in live:
                push(key)

        for key in keys:
            push(key)
        ring = Ring(Member.parse(p.address) for p in stack.pgws)
        victim = max(stack.pgws, key=lambda p: sum(ring.owner(k).name == p.address for k in keys))
        theirs = [k for k in keys if ring.owner(k).name == victim.address]
        rng.shuffle(theirs)
        delete_at_death, delete_in_outage = theirs[:2], theirs[2:4]
        data = Path(victim.data_dir) / "pushgateway.data"
        written = time.time()
        wait_until(lambda: data.exists() and data.stat().st_mtime > written, 15, what="the victim persisted")

        # death: pushes continue, deletes race the kill
        live = [k for k in keys if k not in delete_at_death + delete_in_outage]
        push_round(keys)
        for key in delete_at_death:
            delete(key)
        victim.stop(sig=signal.SIGKILL)
        others = {p.address for p in stack.pgws if p is not victim}
        deadline = time.monotonic() + 20
        while stack.members() != others and time.monotonic() < deadline:
            push_round(live)
        if stack.members() != others:
            result.problems.append("the victim never left the ring")
        # outage
        for key in delete_in_outage:
            delete(key)
        push_round(live)
        # return: one last push per live group, spread around the rejoin
        returned = Pushgateway(port=victim.port, data_dir=victim.data_dir)
        stack.parts.append(returned.start())
        stack.pgws[stack.pgws.index(victim)] = returned
        deadline = time.monotonic() + 20
        while stack.members() != {p.address for p in stack.pgws} and time.monotonic() < deadline:
            push_round(live)
        rejoined = time.monotonic()
        schedule = sorted((rng.uniform(0.0, 2.0), key) for key in live)
        for offset, key in schedule:
            time.sleep(max(0.0, rejoined + offset - time.monotonic()))
            for _ in range(20):  # a periodic pusher retries: its last push must be acknowledged
                before = newest.get(key)
                push(key)
                if newest.get(key) != before:
                    break
                time.sleep(0.1)

        # convergence
        final = Ring(Member.parse(p.address) for p in stack.pgws)
        start = time.monotonic()

        def check() -> DrillResult:
            counts = DrillResult(groups=groups, deleted=len(deleted))
            holdings = {p.address: _held(p) for p in stack.pgws}
            for key in keys:
                copies = {name: held[key] for name, held in holdings.items() if key in held}
                if key in deleted:
                    counts.resurrected += bool(copies)
                    continue
                if len(copies) > 1:
                    counts.duplicates += 1
                owner_value = copies.get(final.owner(key).name)
                want = newest.get(key)
                if want is None:
                    continue  # never acknowledged
                if owner_value == want:
                    continue
                if owner_value is not None and owner_value < want:
                    counts.stale += 1
                elif want in copies.values():
                    counts.misplaced += 1
                else:
                    counts.lost += 1
            return counts

        counts = check()
        while not counts.ok and time.monotonic() - start < converge_timeout:
            time.sleep(0.5)
            counts = check()
        counts.converged_seconds = time.monotonic() - start
        counts.problems = result.problems
        return counts
    finally:
        stack.stop()


def main() -> None:
    result = run_drill()
    print(result)
    for problem in result.problems:
        print("  " + problem)
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
