"""Member names are Kong's target spelling (kong/db/dao/targets.lua via kong/tools/ip.lua)."""
from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from kong_plugin_pgwshard.core.members import Member
from tests.support.kong_admin_double import kong_target

V6 = "0000:0000:0000:0000:0000:0000:0000:0001"


@given(st.ip_addresses(v=6), st.integers(1, 65535), st.sampled_from(["compressed", "exploded"]),
       st.booleans())
def test_any_ipv6_spelling_is_named_as_kong_lists_it(address, port, form, upper):
    text = getattr(address, form)
    if "." in text:  # an IPv4-mapped tail: Kong refuses it ("Invalid target")
        return
    text = text.upper() if upper else text
    assert Member.parse(f"[{text}]:{port}").name == kong_target(f"[{text}]:{port}")


@given(st.ip_addresses(v=4), st.integers(1, 65535))
def test_ipv4_is_named_as_kong_lists_it(address, port):
    padded = ".".join(f"{int(o):03d}" for o in str(address).split("."))
    assert Member.parse(f"{padded}:{port}").name == kong_target(f"{padded}:{port}") == f"{address}:{port}"


def test_members_built_from_parts_are_named_the_same_way():
    # Consul hands pgwshard-sync an address and a port, not a "host:port" to parse
    assert Member("::1", 9091).name == f"[{V6}]:9091" == Member.parse("[::1]:9091").name
    assert Member("[::1]", 9091) == Member.parse("[0:0::1]:9091")
    assert Member("Pgw-1.Example", 9091).name == "Pgw-1.Example:9091"  # Kong keeps a name's case
    assert Member(str(ipaddress.ip_address("10.0.0.1")), 9091).name == "10.0.0.1:9091"
