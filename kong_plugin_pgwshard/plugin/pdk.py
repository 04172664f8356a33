"""The PDK a phase sees: `kong.request.get_raw_path()` and friends, each call a round trip.

A call switches from the phase's greenlet to the RPC loop, which sends it to Kong as the answer
of the current RPC; the Step carrying Kong's result switches back into the phase.
"""
from __future__ import annotations

from typing import Any

from greenlet import greenlet
from kong_pdk.exception import PDKException
from kong_pdk.server import terminal_methods


class _PDKCall:
    """`kong`, `kong.request`, `kong.request.get_raw_path`...: as in kong-pdk, the attribute chain
    names the PDK call and calling it sends the call to Kong. Unlike kong-pdk, each link is built
    once and kept, and one chain serves every event: a call switches to the loop from whichever
    phase greenlet makes it."""

    def __init__(self, name: str):
        self._name = name
        self._terminal = name in terminal_methods
        self._log = name == "kong.log" or name.startswith("kong.log.")

    def __getattr__(self, attr: str) -> _PDKCall:
        if attr.startswith("__"):  # copy, pickle and friends probe these: not PDK names
            raise AttributeError(attr)
        link = _PDKCall(f"{self._name}.{attr}")
        self.__dict__[attr] = link
        return link

    def __call__(self, *args: Any) -> Any:
        if self._log:  # kong-pdk's rule: a value msgpack may not carry is logged as its str()
            args = tuple(a if type(a) in (str, int, list, dict) else str(a) for a in args)
        result = greenlet.getcurrent().parent.switch({"Method": self._name, "Args": args})
        if self._terminal:
            return None  # Kong ends the request: no result comes back
        data, err = result
        if err:
            raise PDKException(f"exception from {self._name}: {err}")
        return data


KONG = _PDKCall("kong")
