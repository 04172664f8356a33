r"""`pgwshard-sync --config pgwshard.yml`: keep Kong's upstream targets equal to the healthy
pushgateways, and groups on their owners.

    health source --snapshots--> Damper --applied set--> sinks (Kong, file_sd)
                                                     \--> Rebalancer (after each change, and
                                                          every rebalance.interval)

Safety rules: a source error keeps the last known good set (Consul down is not "nobody is
healthy"); nothing is written before the first good snapshot; every sink runs on its own worker
thread (a hung Kong never delays the file_sd write), and one that fails is logged, counted and
retried with backoff, with the newest set; an unexpected exception in any loop is logged with
its traceback and the loop goes on (only a bad config at start stops the process); a member
that fails leaves at once, and one that returns rejoins only after staying healthy for
`membership.hold_down` (damping flaps); a truly empty set is written once it has lasted
`hold_down` (the plugin then answers 503). Weights are the configured ones (weight 0 drains a
pushgateway), whatever the source reports. `--once` syncs once and exits.
"""
from __future__ import annotations

import argparse
import json
import logging
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from prometheus_client import CollectorRegistry

from ..core.ring import Member, Ring
from ..errors import ConfigError, UpstreamError
from ..rebalance.history import MembershipHistory
from .health import HealthSnapshot, HealthSource
from .health.consul import ConsulHealth, consul_client
from .health.probes import ProbeHealth
from .metrics import DaemonMetrics, serve
from .settings import Settings, load_settings
from .sinks import Sink, sinks_from_settings

if TYPE_CHECKING:
    from ..rebalance.rebalancer import ReconcileReport

log = logging.getLogger("pgwshard.sync")
# Failures of one rebalance pass logged one by one; a pass failing every group logs this many.
REBALANCE_ERRORS_LOGGED = 20
# Waits between retries of a failing sink (the last one repeats): quick for a blip, then gentle.
SINK_BACKOFF_SECONDS = (0.5, 1.0, 2.0, 5.0, 10.0)
# Every sink is re-applied this often even without a change: a Kong node that restarted reloads
# its declarative file (all targets), and a target edited by hand drifts. Equal sets cost no
# writes (Admin API) or a 304 (DB-less /config).
SINK_RESYNC_SECONDS = 30.0
# How often the Kong nodes are asked whether they started or reloaded (kong_nodes.py).
KONG_NODES_POLL_SECONDS = 2.0
# How often an idle sink asks its target whether it still holds what it took (DeclarativeSink:
# one GET /status per node): a Kong node that reloaded its file is put back within this.
DRIFT_CHECK_SECONDS = 2.0


class Placement(NamedTuple):
    """What a rebalance pass reads: one membership, never mutated (a change replaces it whole)."""

    ring: Ring
    instances: tuple[Member, ...]    # every known pushgateway, in the ring or not
    history: MembershipHistory       # when each left and rejoined the ring (wall clock)


class Damper:
    """Removals apply at once; a returning member must stay healthy `hold_down` seconds.

    One removal waits too: the one that would empty the ring. Losing every member at once is
    more often the view than the fleet (services just registered are critical until their first
    check passes), so an empty set applies only after it has been observed for `hold_down`
    seconds, at start-up too.

    After a source outage, removals also wait `hold_down` (`settle()`): a Consul that returns
    rebuilds its view one registration at a time, and a partial view is not a failure.
    """

    def __init__(self, hold_down: float, clock: Callable[[], float] = time.monotonic):
        self.hold_down = hold_down
        self.clock = clock
        self.applied: frozenset[Member] | None = None  # None until the first good snapshot
        self._healthy: frozenset[Member] = frozenset()
        self._healthy_since: dict[Member, float] = {}
        self._empty_since: float | None = None
        self._settle_until = 0.0

    def settle(self) -> None:
        """The source just recovered: hold removals for `hold_down` seconds."""
        self._settle_until = self.clock() + self.hold_down

    def observe(self, healthy: frozenset[Member]) -> None:
        now = self.clock()
        self._healthy_since = {m: self._healthy_since.get(m, now) for m in healthy}
        self._healthy = healthy
        # `is None`, not `or`: a clock may read 0.0, which is a time and not "not empty yet"
        self._empty_since = (now if self._empty_since is None else self._empty_since) if not healthy else None

    def decide(self) -> frozenset[Member] | None:
        """The set to apply now; None while there is nothing to apply yet."""
        now = self.clock()
        emptying = not self._healthy and self._empty_since is not None and now - self._empty_since < self.hold_down
        if self.applied is None:  # the first set: nothing to damp against, unless it is empty
            return None if emptying else self._healthy
        joining = {m for m in self._healthy - self.applied if now - self._healthy_since[m] >= self.hold_down}
        if now < self._settle_until:
            return self.applied | joining
        wanted = frozenset((self.applied & self._healthy) | joining)
        return self.applied if emptying and self.applied else wanted

    def next_deadline(self) -> float | None:
        """When the decision may next change by time alone (a join, an empty set, the settling end)."""
        pending = [self._healthy_since[m] + self.hold_down for m in self._healthy - (self.applied or set())]
        if self._empty_since is not None:
            pending.append(self._empty_since + self.hold_down)
        if self._settle_until > self.clock():
            pending.append(self._settle_until)
        return min(pending) if pending else None


class SinkWorker:
    """One sink on its own thread: applies the newest set it was offered, and on failure logs,
    counts (`pgwshard_sync_errors_total{sink}`) and retries along `backoff` until it holds."""

    def __init__(self, sink: Sink, metrics: DaemonMetrics, stop: threading.Event,
                 backoff: Sequence[float] = SINK_BACKOFF_SECONDS):
        self.sink, self.name, self.metrics, self.stop = sink, sink.name, metrics, stop
        self.backoff = tuple(backoff) or (1.0,)
        self._cond = threading.Condition()
        self._wanted: frozenset[Member] | None = None  # the newest set not yet taken by the thread
        self._working = False
        self.synced: frozenset[Member] | None = None  # the set the sink last took
        self._thread = threading.Thread(target=self._run, name=f"pgwshard-sink {sink.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def offer(self, members: frozenset[Member]) -> None:
        with self._cond:
            self._wanted = members
            self._cond.notify()

    @property
    def pending(self) -> bool:
        """A set is waiting or being applied (or retried)."""
        with self._cond:
            return self._wanted is not None or self._working

    def _run(self) -> None:
        failures = 0
        next_drift_check = 0.0
        while not self.stop.is_set():
            with self._cond:
                idle = self._wanted is None
                if idle:
                    self._cond.wait(0.5)  # bounded, so that `stop` is seen
            if idle:
                # a sink whose target can drift from what it took (a Kong node that reloaded its
                # own file) is checked between changes, not only at the resync
                if time.monotonic() >= next_drift_check:
                    next_drift_check = time.monotonic() + DRIFT_CHECK_SECONDS
                    self._check_drift()
                continue
            with self._cond:
                if self._wanted is None:
                    continue
                members, self._wanted, self._working = self._wanted, None, True
            ok = self._apply(members)
            with self._cond:
                if ok:
                    self.synced = members
                elif self._wanted is None:
                    self._wanted = members  # retry it, unless a newer set arrived meanwhile
                self._working = not ok  # still owed while it waits to retry
            if ok:
                failures = 0
                continue
            self.stop.wait(self.backoff[min(failures, len(self.backoff) - 1)])
            failures += 1

    def _check_drift(self) -> None:
        drifted = getattr(self.sink, "drifted", None)
        if drifted is None or self.synced is None:
            return
        try:
            if drifted():
                with self._cond:
                    if self._wanted is None:
                        self._wanted = self.synced
        except Exception:  # noqa: BLE001 - a check's bug must not stop the sink
            log.exception("sink %s: drift check failed", self.name)

    def _apply(self, members: frozenset[Member]) -> bool:
        try:
            self.sink.apply(sorted(members))
            return True
        except UpstreamError as err:
            log.error("sink %s failed, will retry: %s", self.name, err)
        except Exception:  # noqa: BLE001 - a sink's bug must not stop the others or the daemon
            log.exception("sink %s crashed, will retry", self.name)
        self.metrics.sync_errors.labels(self.name).inc()
        return False


class Daemon:
    """The sync loop: one watch thread feeds snapshots, the main thread damps and writes, an
    optional thread rebalances. `source`, `sinks`, `rebalancer` default to what settings ask for."""

    def __init__(self, settings: Settings, source: HealthSource | None = None, sinks: Sequence[Sink] | None = None,
                 registry: CollectorRegistry | None = None, rebalancer=None):
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = DaemonMetrics(self.registry)
        self.source = source or self._source()
        self.sinks = list(sinks if sinks is not None else sinks_from_settings(settings))
        self.damper = Damper(settings.hold_down)
        self.tombstones = None
        if settings.deletes is not None:
            from .deletes import Tombstones
            self.tombstones = Tombstones(settings.deletes.tombstone_file, settings.deletes.tombstone_ttl)
        self.rebalancer = rebalancer if rebalancer is not None else self._rebalancer()
        # configured pushgateways by name: a source's member takes its configured weight
        self._configured = {m.name: m for m in settings.pushgateways}
        self.known: frozenset[Member] = frozenset(settings.pushgateways)
        self._healthy: frozenset[Member] = frozenset()  # the source's latest view
        for sink in self.sinks:  # a series from the start, so that increase() sees the first error
            self.metrics.sync_errors.labels(sink.name)
        self.stop = threading.Event()
        self.workers = [SinkWorker(sink, self.metrics, self.stop) for sink in self.sinks]
        self._snapshots: queue.Queue[HealthSnapshot] = queue.Queue()
        self._rebalance_wanted = threading.Event()
        self._changed_at = 0.0  # monotonic time of the last membership change
        # What the rebalance thread reads: one immutable Placement, replaced whole by the main
        # thread, never mutated, so a pass sees one consistent membership.
        self.placement = Placement(Ring(), tuple(sorted(self.known)), MembershipHistory())
        # The last passes, (why, report): why is change, follow-up, retry (copies waited for
        # their clients' silence) or periodic.
        self.passes: deque[tuple[str, ReconcileReport]] = deque(maxlen=64)
        self._had_good = False  # no write happens before the first good snapshot
        self._source_failing = False
        self._last_snapshot = time.monotonic()
        self.resync_interval = SINK_RESYNC_SECONDS
        self._next_resync = 0.0

    def _source(self) -> HealthSource:
        if self.settings.source == "consul":
            assert self.settings.consul is not None  # settings refuse source consul without it
            return ConsulHealth(self.settings.consul)
        return ProbeHealth(self.settings.pushgateways, self.settings.probes)

    def _rebalancer(self):
        if not self.settings.rebalance.enabled:
            return None
        from ..rebalance.rebalancer import Rebalancer
        return Rebalancer(self.settings.rebalance, registry=self.registry, tombstones=self.tombstones)

    # --- threads -------------------------------------------------------------------------------

    def run(self) -> None:
        """Run until stop is set (signals set it)."""
        self._register()
        delete_api = None
        deletes = self.settings.deletes
        if self.tombstones is not None and deletes is not None:
            from .deletes import DeleteAPI
            delete_api = DeleteAPI(deletes.listen, self.tombstones,
                                   lambda: [m.name for m in self.known], deletes.route_prefix).start()
        threads = [threading.Thread(target=self._watch, name="pgwshard-watch", daemon=True)]
        if self.rebalancer is not None:
            threads.append(threading.Thread(target=self._rebalance_loop, name="pgwshard-rebalance", daemon=True))
            if self.settings.kong is not None:
                threads.append(threading.Thread(target=self._watch_kong_nodes, name="pgwshard-kong-nodes",
                                                daemon=True))
        for t in threads:
            t.start()
        for worker in self.workers:
            worker.start()
        while not self.stop.is_set():
            try:
                self.step(timeout=self._wait_time())
            except Exception:  # noqa: BLE001 - log it and go on: the last applied set stays
                log.exception("sync step failed; going on")
                self.stop.wait(1.0)
        # A reconciliation may finish its current operation; the watch may sit in a blocking
        # Consul query for `consul.wait`, and holds nothing worth waiting for (daemon thread);
        # a sink may sit in a hung call for its timeout.
        for t in threads:
            t.join(timeout=1 if t.name in ("pgwshard-watch", "pgwshard-kong-nodes") else 5)
        for worker in self.workers:
            worker.join(timeout=1)
        if delete_api is not None:
            delete_api.stop()

    def run_once(self, timeout: float) -> bool:
        """One sync (`--once`): wait up to `timeout` for a set to apply, write it to every sink,
        then reconcile once. True when every sink took the set."""
        self._register()
        watcher = threading.Thread(target=self._watch, name="pgwshard-watch", daemon=True)
        watcher.start()
        for worker in self.workers:
            worker.start()
        deadline = time.monotonic() + timeout
        while not self.stop.is_set() and time.monotonic() < deadline:
            self.step(timeout=max(0.01, min(self._wait_time(), deadline - time.monotonic())))
            if self.synced:
                break
        synced = self.synced
        self.stop.set()
        watcher.join(timeout=1)  # a blocking Consul query may outlive this; the thread is a daemon
        placement = self.placement
        if synced and self.rebalancer is not None and placement.ring.members:
            time.sleep(self.settings.rebalance.settle)  # until the gateways follow the new set
            # copies waiting for their clients' silence get passes until they moved (bounded:
            # a copy that keeps being pushed moves after MAX_WAIT_QUIETS x quiet anyway)
            from ..rebalance.rebalancer import MAX_WAIT_QUIETS
            again_in: float | None = None
            for _ in range(MAX_WAIT_QUIETS + 2):
                again_in = self._reconcile(placement, "change" if again_in is None else "retry")
                if again_in is None:
                    break
                time.sleep(again_in)
        return synced

    def _reconcile(self, placement: Placement, why: str) -> float | None:
        """One pass; seconds until another is due because copies wait for their clients'
        silence (rebalance.quiet), or None."""
        report = self.rebalancer.reconcile(placement.ring, placement.instances, placement.history,
                                           latest=lambda: self.placement.history)
        self.passes.append((why, report))
        log.info("reconciliation (%s): %s", why, report)
        # each failure names the group and the answer (PgwshardRebalanceFailures sends people here)
        for error in report.errors[:REBALANCE_ERRORS_LOGGED]:
            log.warning("rebalance: %s", error)
        if len(report.errors) > REBALANCE_ERRORS_LOGGED:
            log.warning("rebalance: ... and %d more failures", len(report.errors) - REBALANCE_ERRORS_LOGGED)
        return None if report.retry_after is None else max(0.0, report.retry_after) + 0.5

    @property
    def synced(self) -> bool:
        """Every sink holds the applied set."""
        applied = self.damper.applied
        return applied is not None and all(w.synced == applied and not w.pending for w in self.workers)

    def _register(self) -> None:
        """Register the configured pushgateways in Consul, if asked to. Idempotent, so it runs at
        start and again whenever Consul comes back (an agent may return without them)."""
        consul = self.settings.consul
        if not (consul and consul.register.enabled):
            return
        from .registration import sync_registrations
        try:
            sync_registrations(consul_client(consul), consul, self.settings.pushgateways,
                               known_healthy=self.damper.applied or frozenset())
        except UpstreamError as err:
            log.error("%s", err)  # health still flows from what is registered already

    def _watch(self) -> None:
        while not self.stop.is_set():
            try:
                for snapshot in self.source.watch(self.stop):
                    self._snapshots.put(snapshot)
            except Exception as err:  # noqa: BLE001 - a broken source must not end the daemon
                log.exception("health source failed; restarting it")
                self._snapshots.put(HealthSnapshot(None, error=repr(err)))
                self.stop.wait(1.0)

    def _watch_kong_nodes(self) -> None:
        """A rebalance pass, once settled, whenever a Kong node started, restarted or reloaded:
        it may have sent pushes on without the plugin meanwhile (kong_nodes.py)."""
        from ..clients.kong import KongAdmin
        from .kong_nodes import KongNodeWatch
        kong = self.settings.kong
        assert kong is not None  # run() starts this watch only with Kong settings
        urls = kong.nodes if kong.mode == "declarative" and kong.nodes else (kong.admin_url,)
        watch = KongNodeWatch([KongAdmin(url, kong.admin_token, timeout=2.0, proxy=kong.proxy) for url in urls])
        try:
            while not self.stop.wait(KONG_NODES_POLL_SECONDS):
                try:
                    changed = watch.changed()
                except Exception:  # noqa: BLE001 - a broken look must not end the watch
                    log.exception("watching the Kong nodes failed; going on")
                    continue
                if changed:
                    log.info("Kong node(s) started or reloaded, a rebalance pass follows: %s", ", ".join(changed))
                    self._changed_at = time.monotonic()
                    self._rebalance_wanted.set()
        finally:
            watch.close()

    def _wait_time(self) -> float:
        deadline = self.damper.next_deadline()
        wait = 1.0
        if deadline is not None:
            wait = min(wait, max(0.01, deadline - time.monotonic()))
        return wait

    def step(self, timeout: float = 0.0) -> None:
        """Take the snapshots that arrived (waiting up to `timeout` for one), apply the result."""
        try:
            self._take(self._snapshots.get(timeout=timeout) if timeout > 0 else self._snapshots.get_nowait())
            while True:
                self._take(self._snapshots.get_nowait())
        except queue.Empty:
            pass
        self._check_stale()
        self._apply(self.damper.decide() if self._had_good else None)
        self.metrics.show_members(self.known, self._healthy, self.damper.applied or frozenset())

    def _check_stale(self) -> None:
        """A source whose query hangs past its `stale_after` is down, as if it had failed."""
        stale_after = getattr(self.source, "stale_after", None)
        if stale_after is None or self._source_failing:
            return
        if time.monotonic() - self._last_snapshot > stale_after:
            self._source_failing = True
            self.metrics.source_up.set(0)
            self.metrics.source_errors.inc()
            log.warning("health source has not answered for %.0f s; keeping %d members", stale_after,
                        len(self.damper.applied or ()))

    def _take(self, snapshot: HealthSnapshot) -> None:
        self._last_snapshot = time.monotonic()
        self.metrics.watch_latency.observe(snapshot.query_seconds)
        if snapshot.members is None:
            self._source_failing = True
            self.metrics.source_up.set(0)
            self.metrics.source_errors.inc()
            log.warning("health source error, keeping %d members: %s",
                        len(self.damper.applied or ()), snapshot.error)
            return
        if self._source_failing:
            log.info("health source is back; removals wait %gs while its view settles", self.damper.hold_down)
            self.damper.settle()
        if self._source_failing or snapshot.reset:
            self._register()  # an agent that restarted lost what was registered there
        self._source_failing = False
        self.metrics.source_up.set(1)
        self.metrics.source_last_success.set_to_current_time()
        healthy = frozenset(self._configured.get(m.name, m) for m in snapshot.members)
        self._healthy = healthy
        self._had_good = True
        if not healthy <= self.known:
            self.known = self.known | healthy
            self.placement = self.placement._replace(instances=tuple(sorted(self.known)))
        self.damper.observe(healthy)

    def _apply(self, wanted: frozenset[Member] | None) -> None:
        if wanted is None:
            return  # no good snapshot yet: write nothing
        old = self.damper.applied or frozenset()
        if wanted != self.damper.applied and wanted:
            # a set emptied only by refusals is no set to write: keep the last one
            wanted = self._admit(wanted, old) or self.damper.applied or None
        if wanted is not None and wanted != self.damper.applied:
            log.info("membership change: %s", json.dumps({
                "members": sorted(m.name for m in wanted), "added": sorted(m.name for m in wanted - old),
                "removed": sorted(m.name for m in old - wanted)}))
            self.damper.applied = wanted
            self.metrics.members.set(len(wanted))
            self.metrics.changes.inc()
            history = self.placement.history.changed((m.name for m in wanted), (m.name for m in self.known),
                                                     time.time())
            self.placement = Placement(Ring(wanted), tuple(sorted(self.known)), history)
            self._changed_at = time.monotonic()
            for worker in self.workers:
                worker.offer(wanted)
            self._rebalance_wanted.set()
        if self.damper.applied is None:
            return  # every member refused the tombstones so far: nothing written yet
        if time.monotonic() >= self._next_resync:
            for worker in self.workers:
                worker.offer(self.damper.applied)
            self._next_resync = time.monotonic() + self.resync_interval
        if self.workers and self.synced:
            self.metrics.last_good_sync = time.time()

    def _admit(self, wanted: frozenset[Member], old: frozenset[Member]) -> frozenset[Member]:
        """Joining members are cleared first: the tombstones applied (a pushgateway that was
        away when a client deleted a group must not serve, or be the source of a move of, its
        old copy), then every copy it holds that loses to a copy elsewhere deleted (one it kept
        from before a restart, or stored while it was out of the ring). One that cannot be
        cleared stays out and is tried again at the next step."""
        refused = self._apply_tombstones(wanted - old)
        joiners = {m.name: m for m in wanted - old - refused}
        if joiners and self.rebalancer is not None and self.damper.applied is not None:  # not at start
            # rivals from the healthy instances only: a hung one would hold this thread, and with
            # it every membership change, for the listing's timeout
            removed, failed = self.rebalancer.clear_before_rejoin(joiners, self._healthy, self.placement.history)
            for name, err in failed.items():
                log.warning("%s stays out until its stale copies can be cleared: %s", name, err)
                refused.add(joiners[name])
            for name, count in removed.items():
                if count:
                    log.info("%s rejoins: deleted %d copy(ies) that lost to a copy elsewhere", name, count)
        return wanted - refused

    def _apply_tombstones(self, joiners: frozenset[Member]) -> set[Member]:
        """The joiners that could not take the tombstones."""
        if self.tombstones is None or not len(self.tombstones):
            return set()
        from ..clients.pushgateway import PushgatewayClient
        from .deletes import apply_tombstones
        refused = set()
        for member in joiners:
            client = PushgatewayClient(member.name)
            try:
                removed = apply_tombstones(client, self.tombstones)
                if removed:
                    log.info("%s rejoins: deleted %d group(s) deleted while it was away", member.name, removed)
            except UpstreamError as err:
                log.warning("%s stays out until it takes the tombstones: %s", member.name, err)
                refused.add(member)
            finally:
                client.close()
        return refused

    def _rebalance_loop(self) -> None:
        """A pass every rebalance.interval; after a membership change one pass once it settled
        (every gateway can have read the new membership, so none pushes to an old owner any
        more), and a follow-up pass rebalance.follow_up later for copies recreated meanwhile."""
        rb = self.settings.rebalance
        follow_up_at: float | None = None  # the change's second pass
        retry_at: float | None = None      # copies waiting for their clients' silence
        while not self.stop.is_set():
            due = [t - time.monotonic() for t in (follow_up_at, retry_at) if t is not None]
            changed = self._rebalance_wanted.wait(max(0.0, min([rb.interval, *due])))
            if self.stop.is_set():
                return
            now = time.monotonic()
            if changed:
                self._wait_settled()
                follow_up_at = time.monotonic() + rb.follow_up if rb.follow_up > 0 else None
                why = "change"
            elif follow_up_at is not None and now >= follow_up_at:
                follow_up_at, why = None, "follow-up"
            elif retry_at is not None and now >= retry_at:
                retry_at, why = None, "retry"
            else:
                why = "periodic"
            if self.stop.is_set():
                return
            placement = self.placement  # one immutable snapshot for the whole pass
            if self.damper.applied is None or not placement.ring.members:
                continue
            try:
                again_in = self._reconcile(placement, why)
                if again_in is not None:
                    due_at = time.monotonic() + again_in
                    retry_at = due_at if retry_at is None else min(retry_at, due_at)
            except Exception:  # noqa: BLE001 - a failed pass is retried at the next one
                log.exception("reconciliation failed; the next pass retries")


    def _wait_settled(self) -> None:
        # A change arriving while we wait starts the wait again: it moved the target once more.
        while not self.stop.is_set():
            self._rebalance_wanted.clear()
            remaining = self._changed_at + self.settings.rebalance.settle - time.monotonic()
            if remaining <= 0:
                return
            self.stop.wait(remaining)


class _JsonFormatter(logging.Formatter):
    """One JSON object per line; configured secrets are masked even if a library echoes them."""

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                 "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        line = json.dumps(entry)
        for secret in self.secrets:
            line = line.replace(secret, "<redacted>")
        return line


def configure_logging(level: str, secrets: Iterable[str | None] = ()) -> None:
    """JSON lines on stderr at `level`, with `secrets` (tokens) masked."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter([s for s in secrets if s]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pgwshard-sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the YAML config file (see kong/pgwshard.yml)")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.add_argument("--once", action="store_true",
                        help="sync once (and reconcile once if rebalancing is on), then exit; "
                             "failing status when no set could be written")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        settings = load_settings(args.config)
    except ConfigError as err:
        sys.exit(f"pgwshard-sync: {err}")
    if args.check:
        print(f"{args.config}: ok")
        return
    configure_logging(settings.log_level, [settings.consul.token if settings.consul else None,
                                           settings.kong.admin_token if settings.kong else None])
    try:
        daemon = Daemon(settings)
    except OSError as err:  # the tombstone store cannot be opened: acknowledged deletes need it
        sys.exit(f"pgwshard-sync: {err}")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop.set())
    if args.once:
        # long enough for a full backoff schedule or an empty set's hold-down, never unbounded
        budget = settings.hold_down + sum(settings.consul.backoff if settings.consul else ()) + 30.0
        if not daemon.run_once(budget):
            sys.exit("pgwshard-sync: no membership could be written (see the log)")
        return
    serve(settings.metrics_listen, daemon.registry)
    log.info("started: health from %s, sinks %s, metrics on %s", settings.source,
             [s.name for s in daemon.sinks], settings.metrics_listen)
    daemon.run()
    log.info("stopped")


if __name__ == "__main__":
    main()
