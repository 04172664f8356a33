"""Instances and events: kong-pdk's PluginServer whose events run in pooled greenlets.

A phase runs in a greenlet taken from a pool of idle ones up to its first PDK call, whose
answer goes back to Kong; the Step that carries Kong's result resumes it. A terminal call
(`kong.response.exit`) ends the event at once; an event Kong stops stepping is dropped after
EVENT_TTL_SECONDS.
"""
from __future__ import annotations

import secrets
import time
import traceback
from typing import Any

from greenlet import greenlet
from kong_pdk.exception import PluginServerException
from kong_pdk.logger import Logger
from kong_pdk.server import PluginServer, terminal_methods

from . import handler
from .pdk import KONG

RET = "ret"  # the answer that ends an event
# A phase waits for Kong's answer to a PDK call for milliseconds; Kong itself gives up on a
# plugin server after its socket timeout (60 s by default).
EVENT_TTL_SECONDS = 600.0
IDLE_RUNNERS = 64  # phase greenlets kept for reuse: more than the events one server has in flight
# Instance ids start at a random base per process, so a restarted server never hands out an id
# an earlier process gave (a Kong worker may still hold one): a stale id gets "no plugin
# instance", on which Kong starts an instance again (kong/runloop/plugin_servers/rpc/mp_rpc.lua),
# instead of reaching another config's instance. 31 bits leave 2^31 starts of headroom below
# 2^32, and Kong's Lua reads msgpack integers as doubles, exact far beyond that.
INSTANCE_ID_BITS = 31


class _Raised:
    """How a phase runner reports that the plugin raised: it stays alive for the next event."""

    __slots__ = ("error", "trace")

    def __init__(self, error: Exception, trace: str):
        self.error, self.trace = error, trace


def _phase_runner(phase) -> None:
    """Body of a pooled greenlet: run a phase, hand its end (RET or _Raised) to the loop, wait
    for the next one. Creating a greenlet per event cost more than the rest of the event."""
    while True:
        end: object
        try:
            phase(KONG)
            end = RET
        except Exception as err:  # noqa: BLE001 - reported to Kong by the loop
            end = _Raised(err, traceback.format_exc())
        phase = None  # a parked runner must not keep a closed instance alive
        phase = greenlet.getcurrent().parent.switch(end)


class PgwshardPluginServer(PluginServer):
    """kong-pdk's PluginServer whose events run in pooled greenlets driven by the RPC loop."""

    event_id: int  # kong-pdk's counter of event ids

    def __init__(self, loglevel: int = Logger.WARNING):
        super().__init__(loglevel=loglevel, name=f"{handler.NAME} version {handler.version}")
        self.instance_id = secrets.randbits(INSTANCE_ID_BITS)  # kong-pdk counts up from here
        self._idle: list[greenlet] = []

    def get_plugin_info(self, name: str) -> dict:
        """kong-pdk's info, with pgwshard's whole schema: kong-pdk would wrap only the `config`
        fields, without `protocols` or the config's entity checks."""
        info = super().get_plugin_info(name)
        if name == handler.NAME:
            info["Schema"] = handler.KONG_SCHEMA
        return info

    def handle_event(self, event: dict) -> dict:
        iid = event["InstanceId"]
        instance = self.instances.get(iid)
        if instance is None:
            raise PluginServerException(f"no plugin instance #{iid}")  # Kong restarts it on these words
        phase = getattr(instance.cls, event["EventName"])
        eid = self.event_id
        self.event_id = eid + 1
        runner = self._idle.pop() if self._idle else greenlet(_phase_runner)
        return self._advance(eid, runner, phase)

    def expire_events(self, now: float) -> None:
        """Forget events Kong stopped stepping (a worker killed mid-request), so they cannot pile
        up. Events are kept in the order of their last answer: the stale ones come first."""
        for eid, (_, answered) in list(self.events.items()):
            if now - answered < EVENT_TTL_SECONDS:
                return
            del self.events[eid]
            self.logger.warn(f"event #{eid}: no Step from Kong for {EVENT_TTL_SECONDS:.0f} s, dropped")

    def close_instance(self, iid: int) -> dict:
        instance = self.instances.get(iid)
        answer = super().close_instance(iid)  # "no plugin instance" when there is none
        close = getattr(instance.cls, "close", None)
        if callable(close):  # the plugin lets go of what it holds (pgwshard: its membership poller)
            try:
                close()
            except Exception:  # noqa: BLE001 - the instance is gone either way
                self.logger.error(f"closing instance #{iid}: {traceback.format_exc()}")
        return answer

    def _step(self, data: dict, is_error: bool) -> dict:  # kong-pdk's step and step_error call this
        eid = data["EventId"]
        runner, _ = self.events.pop(eid, (None, 0.0))
        if runner is None:
            raise PluginServerException(f"event id {eid} not found")
        result = data.get("Data")  # absent when the PDK call returned nil
        return self._advance(eid, runner, (None, result) if is_error else (result, None))

    def _advance(self, eid: int, runner: greenlet, arg: Any) -> dict:
        """Run the phase up to its next PDK call (the answer to Kong) or its end."""
        runner.parent = greenlet.getcurrent()  # its next PDK call comes back here, to this RPC
        data = runner.switch(arg)
        if type(data) is dict:
            if data["Method"] in terminal_methods:
                self._finish_after_exit(eid, runner)
            else:
                self.events[eid] = (runner, time.monotonic())  # waiting for Kong's Step
            return {"Data": data, "EventId": eid}
        self._ended(eid, runner, data)
        if type(data) is _Raised:  # an answer instead of leaving Kong waiting on its socket
            raise PluginServerException(f"the plugin raised {data.error!r}")
        return {"Data": RET, "EventId": eid}

    def _ended(self, eid: int, runner: greenlet, end: Any) -> None:
        """The phase ended (RET or _Raised): log a raise, keep the runner for another event."""
        if type(end) is _Raised:
            self.logger.error(f"event #{eid}: the plugin raised: {end.trace}")
        if len(self._idle) < IDLE_RUNNERS:
            self._idle.append(runner)

    def _finish_after_exit(self, eid: int, runner: greenlet) -> None:
        # Kong sends nothing more for this event. Let the phase run on to its end, as kong-pdk
        # does; a PDK call after the exit is never answered, so that runner is dropped and freed.
        end = runner.switch(None)
        if type(end) is not dict:
            self._ended(eid, runner, end)
