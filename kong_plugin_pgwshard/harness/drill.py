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

The hung round (fault="hang") stops the victim with SIGSTOP instead, while every group's client
(a batch job at its end: one push, retried until acknowledged, then silence) pushes once more:
the victim's pushes get 504 after the gateway's read timeout (HANG_READ_TIMEOUT) and are
retried on a stand-in owner once the victim left the ring. The victim resumes (SIGCONT) once all
are acknowledged, applies the timed-out pushes still in its socket (`late_writes`) and rejoins;
then the same check: the acknowledged retries must be what stays on the owners.

Each round also checks its preconditions (the victim left the ring and rejoined it, pushes were
rerouted meanwhile), reported in `problems`: a round that proves nothing is not a pass.

Free of pytest: tests/stack/test_fault_drill.py and bench/fault_drill.py both call run_drill().
"""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..core.grouping import GroupingKey
from ..core.ring import Member, Ring
from ..host.render import PushLimits
from .nginx import NginxHost
from .processes import ManagedProcess, PluginServer, Pushgateway, free_port, http_request, temp_dir, wait_until

VALUE = "drill_value"
HANG_READ_TIMEOUT = 2.0  # the gateway's read timeout in the hung round (10 s shipped): a short drill


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
    fault: str = "kill"
    rerouted: int = 0          # pushes of the victim's groups acknowledged while it was out
    timed_out: int = 0         # hang: pushes answered 504 (sent to the hung victim)
    late_writes: int = 0       # hang: of those, applied by the victim after it resumed
    reroute_seconds: float | None = None  # hang: SIGSTOP to the first victim group acknowledged elsewhere
    problems: list[str] = field(default_factory=list)  # preconditions not met, unexpected answers
    faulty: list[str] = field(default_factory=list)    # each group counted above: what is where

    @property
    def ok(self) -> bool:
        return not (self.lost or self.stale or self.misplaced or self.duplicates or self.resurrected
                    or self.problems)

    def __str__(self) -> str:
        text = (f"{self.fault}: groups={self.groups} deleted={self.deleted} lost={self.lost} stale={self.stale} "
                f"misplaced={self.misplaced} duplicates={self.duplicates} resurrected={self.resurrected} "
                f"rerouted={self.rerouted} converged={self.converged_seconds:.1f}s")
        if self.fault == "hang":
            reroute = "never" if self.reroute_seconds is None else f"{self.reroute_seconds:.1f}s"
            text += f" timed_out={self.timed_out} late_writes={self.late_writes} reroute={reroute}"
        return text


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
    def __init__(self, delete_api: bool = True, read_timeout: float = 10.0) -> None:
        self.read_timeout = read_timeout
        self.work = Path(temp_dir("pgwshard-drill-"))
        self.pgws = [Pushgateway() for _ in range(3)]
        self.members_file = self.work / "members.json"
        self.delete_port = free_port() if delete_api else None
        config = self.work / "pgwshard.yml"
        deletes = {"deletes": {"listen": f"127.0.0.1:{self.delete_port}",
                               "tombstone_file": str(self.work / "tombstones")}} if delete_api else {}
        config.write_text(json.dumps({
            "pushgateways": [p.address for p in self.pgws],
            "health": {"source": "probes", "probes": {"interval": "1s", "timeout": "0.5s", "rise": 2, "fall": 2}},
            "membership": {"hold_down": "2s"},
            "file_sd": {"path": str(self.members_file)},
            "rebalance": {"enabled": True, "interval": "10s", "settle": "2s", "follow_up": "3s",
                          "max_ops_per_second": 200},
            **deletes,
            "metrics": {"listen": f"127.0.0.1:{free_port()}"},
            # PGWSHARD_DRILL_LOGS: keep the log of a failed round, with every move in it
            **({"log": {"level": "debug"}} if os.environ.get("PGWSHARD_DRILL_LOGS") else {}),
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
                              deletes=f"127.0.0.1:{self.delete_port}" if self.delete_port else None,
                              limits=PushLimits(read_timeout=f"{round(self.read_timeout * 1000)}ms"))
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
              delete_api: bool = True, fault: str = "kill") -> DrillResult:
    """One round of the drill; returns its counts (never raises for a data-safety failure).

    fault: "kill" (SIGKILL, outage, restart from the persistence file, deletes racing it) or
    "hang" (SIGSTOP past the gateway's read timeout, retries, SIGCONT). delete_api=False: DELETE
    goes straight to the owner (or its stand-in), as without pgwshard-sync's delete API, to show
    what that API prevents."""
    if fault not in ("kill", "hang"):
        raise ValueError(f"fault must be kill or hang, not {fault!r}")
    rng = random.Random(seed)
    keys = [GroupingKey.from_labels({"job": "drill", "instance": f"i{n:03d}"}) for n in range(groups)]
    stack = _Stack(delete_api, read_timeout=HANG_READ_TIMEOUT if fault == "hang" else 10.0).start()
    result = DrillResult(groups=groups, fault=fault)
    newest: dict[GroupingKey, int] = {}   # newest acknowledged value
    deleted: set[GroupingKey] = set()     # acknowledged deletes
    counter = [0]
    lock = threading.Lock()  # the hung round's clients push from threads
    try:
        assert stack.host is not None
        gateway = stack.host.url

        def push(key: GroupingKey) -> tuple[int, int]:
            """(status, the value pushed)"""
            with lock:
                counter[0] += 1
                value = counter[0]
            status = _send(gateway + key.path(), "PUT", f"{VALUE} {value}\n".encode())
            if status == 200:
                with lock:
                    newest[key] = value
            return status, value

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
        everyone = {p.address for p in stack.pgws}
        others = everyone - {victim.address}
        data = Path(victim.data_dir) / "pushgateway.data"
        written = time.time()
        wait_until(lambda: data.exists() and data.stat().st_mtime > written, 15, what="the victim persisted")

        def rerouted() -> int:
            # victim's groups acknowledged by a stand-in: the newest acknowledged value sits elsewhere
            held = [_held(p) for p in stack.pgws if p is not victim]
            return sum(k in newest and any(h.get(k) == newest[k] for h in held) for k in theirs)

        if fault == "kill":
            delete_at_death, delete_in_outage = theirs[:2], theirs[2:4]
            # death: pushes continue, deletes race the kill
            live = [k for k in keys if k not in delete_at_death + delete_in_outage]
            push_round(keys)
            for key in delete_at_death:
                delete(key)
            victim.stop(sig=signal.SIGKILL)
            deadline = time.monotonic() + 20
            while stack.members() != others and time.monotonic() < deadline:
                push_round(live)
            if stack.members() != others:
                result.problems.append("the victim never left the ring")
            # outage: pushes go on, to the stand-ins once the gateway follows (within 1 s)
            for key in delete_in_outage:
                delete(key)
            deadline = time.monotonic() + 5
            push_round(live)
            while rerouted() < len(set(theirs) & set(live)) and time.monotonic() < deadline:
                push_round(live)
            result.rerouted = rerouted()
            # return: one last push per live group, spread around the rejoin
            returned = Pushgateway(port=victim.port, data_dir=victim.data_dir)
            stack.parts.append(returned.start())
            stack.pgws[stack.pgws.index(victim)] = returned
            deadline = time.monotonic() + 20
            while stack.members() != everyone and time.monotonic() < deadline:
                push_round(live)
            if stack.members() != everyone:
                result.problems.append("the victim never rejoined the ring")
            rejoined = time.monotonic()
            schedule = sorted((rng.uniform(0.0, 2.0), key) for key in live)
            for offset, key in schedule:
                time.sleep(max(0.0, rejoined + offset - time.monotonic()))
                for _ in range(20):  # a periodic pusher retries: its last push must be acknowledged
                    if push(key)[0] == 200:
                        break
                    time.sleep(0.1)
        else:
            _hang(stack, victim, keys, theirs, push, rerouted, result)
        if not result.rerouted:
            result.problems.append("no push of the victim's groups was acknowledged while it was out")

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
                counts.faulty.append(f"{key}: acknowledged {want}, owner {final.owner(key).name} (the victim: "
                                     f"{victim.address}), copies {copies}")
                if owner_value is not None and owner_value < want:
                    counts.stale += 1
                elif want in copies.values():
                    counts.misplaced += 1
                else:
                    counts.lost += 1  # also: a later, never acknowledged value replaced it
            return counts

        counts = check()
        while not counts.ok and time.monotonic() - start < converge_timeout:
            time.sleep(0.5)
            counts = check()
        counts.converged_seconds = time.monotonic() - start
        for name in ("fault", "rerouted", "timed_out", "late_writes", "reroute_seconds", "problems"):
            setattr(counts, name, getattr(result, name))
        keep = os.environ.get("PGWSHARD_DRILL_LOGS")
        if keep and not counts.ok:  # pgwshard-sync's log of a failed round, to see what it did
            target = Path(keep) / f"{fault}-{seed}-{int(time.time())}.log"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(stack.sync.log())
            counts.problems.append(f"pgwshard-sync's log: {target}")
        return counts
    finally:
        stack.stop()


def _hang(stack: _Stack, victim: Pushgateway, keys: list[GroupingKey], theirs: list[GroupingKey],
          push, rerouted, result: DrillResult) -> None:
    """The hung round: SIGSTOP, every client's last push retried until acknowledged, SIGCONT."""
    everyone = {p.address for p in stack.pgws}
    timed_out: dict[GroupingKey, int] = {}  # pushes answered 504, per group
    first_elsewhere: list[float] = []
    puts_before = _puts_applied(victim)
    stopped = time.monotonic()
    os.kill(victim.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
    try:
        def last_push(key: GroupingKey) -> None:
            # a batch job at its end: one push, retried until acknowledged (bounded), then silence
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status, _ = push(key)
                if status == 200:
                    if key in theirs:
                        first_elsewhere.append(time.monotonic() - stopped)
                    return
                if status == 504:
                    timed_out[key] = timed_out.get(key, 0) + 1
                time.sleep(0.2)
            result.problems.append(f"the last push of {key} was never acknowledged")

        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(last_push, keys))
        if victim.address in (stack.members() or set()):
            result.problems.append("the victim never left the ring")
        result.timed_out = sum(timed_out.values())
        result.reroute_seconds = min((t for t in first_elsewhere), default=None)
        result.rerouted = rerouted()
        if not result.timed_out:
            result.problems.append("no push timed out on the hung victim")
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
    # the resumed victim applies what timed out (nothing else reaches it until it rejoins): its
    # own count of the PUTs it answered 200, once it stops growing
    counts = [puts_before]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and victim.address not in (stack.members() or set()):
        counts.append(_puts_applied(victim))
        if len(counts) > 5 and counts[-1] == counts[-5] > puts_before:
            break
        time.sleep(0.1)
    result.late_writes = max(counts) - puts_before
    deadline = time.monotonic() + 30
    while stack.members() != everyone and time.monotonic() < deadline:
        time.sleep(0.1)
    if stack.members() != everyone:
        result.problems.append("the victim never rejoined the ring")


def _puts_applied(pgw: Pushgateway) -> int:
    """How many PUTs the pushgateway answered 200 (pushgateway_http_requests_total): it counts
    a push it applied after the gateway gave up on it too."""
    try:
        text = http_request(pgw.url + "/metrics", timeout=2)[1].decode()
    except OSError:
        return 0
    line = 'pushgateway_http_requests_total{code="200",handler="push",method="put"} '
    return sum(int(float(row[len(line):])) for row in text.splitlines() if row.startswith(line))


def main() -> None:
    result = run_drill(fault=sys.argv[1] if len(sys.argv) > 1 else "kill")
    print(result)
    for problem in result.problems:
        print("  " + problem)
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
