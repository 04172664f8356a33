"""The OpenResty host's msgpack decoder (kong/openresty/pgwshard_msgpack.lua), run by a real
nginx: what the plugin server packs must reach the host as the same value, and a short read must
say "incomplete" (the host then reads on) rather than fail or guess."""
from __future__ import annotations

import http.client
import math
import struct
import textwrap
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kong_plugin_pgwshard.harness.processes import (
    ManagedProcess,
    free_port,
    http_get,
    temp_dir,
    wait_until,
)
from kong_plugin_pgwshard.host.render import HOST_DIR

# POST a msgpack value: 200 with the decoded value packed again by lua-MessagePack (Kong's own
# encoder), 203 with the text of a plain number or nil (exact, where lua-MessagePack would round
# subnormals or fail on infinities), 422 "incomplete", or 400 with the decoder's error.
DECODE = """
    ngx.req.read_body()
    local body = ngx.req.get_body_data() or ""
    local decoder, mp = require "pgwshard_msgpack", require "MessagePack"
    local ok, value = pcall(decoder.decode, body)
    if ok and (value == nil or type(value) == "number") then
      ngx.status = 203
      return ngx.print(value == nil and "nil" or string.format("%.17g", value))
    end
    if ok then return ngx.print(mp.pack({ value })) end
    ngx.status = value == decoder.INCOMPLETE and 422 or 400
    ngx.print(tostring(value))
"""


@pytest.fixture(scope="module")
def decoder_url():
    prefix = temp_dir("pgwshard-msgpack-")
    port = free_port()
    conf = Path(prefix) / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""\
        load_module /usr/lib/nginx/modules/ndk_http_module.so;
        load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
        worker_processes 1;
        pid {prefix}/nginx.pid;
        error_log {prefix}/error.log notice;
        events {{ worker_connections 64; }}
        http {{
            lua_package_path "{HOST_DIR}/?.lua;/usr/share/lua/5.1/?.lua;;";
            access_log off;
            client_body_temp_path {prefix}/body;
            client_body_buffer_size 1m;
            server {{
                listen 127.0.0.1:{port};
                location / {{ content_by_lua_block {{ {DECODE} }} }}
            }}
        }}
        """))
    nginx = ManagedProcess("nginx-msgpack", ["nginx", "-p", prefix, "-c", str(conf), "-g", "daemon off;"]).start()
    url = f"127.0.0.1:{port}"
    wait_until(lambda: http_get(f"http://{url}/")[0] in (200, 400, 422), 15, what="nginx with the decoder")
    yield url
    nginx.stop()


def decode(url: str, data: bytes) -> tuple[int, object]:
    conn = http.client.HTTPConnection(url, timeout=10)
    try:
        conn.request("POST", "/", body=data)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status == 203:
        return 200, None if body == b"nil" else float(body)
    if resp.status != 200:
        return resp.status, body.decode()
    return 200, msgpack.unpackb(body, raw=False, strict_map_key=False, unicode_errors="surrogateescape")[0]


def as_lua_sees_it(value):
    """Lua has one string type and one table type: bytes come back as str, and an empty list or
    dict as an empty table (which lua-MessagePack packs as an empty array)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, (list, tuple)):
        return [as_lua_sees_it(v) for v in value]
    if isinstance(value, dict):
        return {k: as_lua_sees_it(v) for k, v in value.items()} or []
    return value


# What the plugin server packs: PDK calls with their arguments (strings, bytes, numbers, bools,
# nested arrays and maps with string keys). No nil inside containers: a Lua table cannot hold one.
scalars = (st.text() | st.binary() | st.booleans()
           | st.integers(min_value=-(2**53), max_value=2**53)
           | st.floats(min_value=-1e15, max_value=1e15, allow_nan=False, allow_subnormal=False))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
                      max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=values | st.none())
def test_what_the_plugin_server_packs_decodes_to_the_same_value(decoder_url, value):
    status, decoded = decode(decoder_url, msgpack.packb(value))
    assert status == 200, decoded
    assert decoded == as_lua_sees_it(value)


def test_integers_at_every_width_boundary(decoder_url):
    for value in (0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**53,
                  -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**53):
        assert decode(decoder_url, msgpack.packb(value)) == (200, value)


@pytest.mark.parametrize("value", [0.0, -0.0, -2.5, 1e-310, 5e-324, 3.4e38, 1.5e300, -1.2345678901234567e-5,
                                   math.inf, -math.inf, math.nan])
def test_floats_in_both_widths(decoder_url, value):
    widths = [(b"\xcb" + struct.pack(">d", value), value)]
    if not abs(value) < math.inf or abs(value) < 3.4e38:  # float32 holds it (rounded)
        widths.append((b"\xca" + struct.pack(">f", value), struct.unpack(">f", struct.pack(">f", value))[0]))
    for packed, expect in widths:
        status, decoded = decode(decoder_url, packed)
        assert status == 200, decoded
        assert (math.isnan(decoded) and math.isnan(expect)) or (decoded == expect and math.copysign(1, decoded)
                                                                == math.copysign(1, expect)), (packed, decoded)


def test_every_truncated_answer_is_incomplete(decoder_url):
    answer = msgpack.packb([1, 70000, None, {"EventId": 2**40, "Data": {
        "Method": "kong.response.exit", "Args": [400, {"message": "pgwshard: bad push path: é" * 20}, -3.25]}}])
    for cut in range(len(answer)):
        status, body = decode(decoder_url, answer[:cut])
        assert (status, body) == (422, "incomplete msgpack value"), cut


@pytest.mark.parametrize("data, problem", [
    (msgpack.packb(1) + b"\x01", "extra bytes"),
    (msgpack.packb(msgpack.ExtType(5, b"x")), "0xd4 is not supported"),
    (b"\xc1", "0xc1 is not supported"),
])
def test_what_is_not_one_msgpack_value_is_an_error(decoder_url, data, problem):
    status, body = decode(decoder_url, data)
    assert status == 400 and problem in body
