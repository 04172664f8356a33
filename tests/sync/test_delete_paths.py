"""The delete API reads a DELETE's path exactly as the gateway reads a push's: the raw bytes of the
request target as UTF-8, then %-escapes, through `parse_push_path` (issue 21, finding 2: it read
the request line as Latin-1, so a raw UTF-8 `été` was recorded as `Ã©tÃ©`: 202, the group
stayed). Real sockets, a real pushgateway; the gateway's reading is the plugin's: Kong hands the
raw path over msgpack, which the plugin server decodes as UTF-8 with surrogateescape."""
from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import pytest

from kong_plugin_pgwshard.core.grouping import GroupingKey, bad_push_path_message, parse_push_path
from kong_plugin_pgwshard.errors import GroupingKeyError
from kong_plugin_pgwshard.harness.processes import http_request, wait_until
from kong_plugin_pgwshard.sync.deletes import DeleteAPI, Tombstones

VECTORS = json.loads((Path(__file__).parents[1] / "vectors/grouping.json").read_text())


class RecordingTombstones(Tombstones):
    """The real store (memory only), remembering which keys the API recorded."""

    def __init__(self):
        super().__init__(None, ttl=3600)
        self.recorded: list[GroupingKey] = []

    def record(self, key):
        self.recorded.append(key)
        return super().record(key)


@pytest.fixture
def delete_api(pushgateways):
    pgw = pushgateways(1)[0]
    tombstones = RecordingTombstones()
    api = DeleteAPI("127.0.0.1:0", tombstones, lambda: [pgw.address]).start()
    yield api, tombstones, pgw
    api.stop()


def raw_delete(port: int, target: bytes) -> tuple[int, bytes]:
    """DELETE with the request target sent byte for byte, as nginx and Kong pass it on."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"DELETE " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def gateway_key(target: bytes) -> GroupingKey | None:
    """What the gateway makes of this path (plugin/handler.py: parse_push_path of the raw path)."""
    return parse_push_path(target.decode("utf-8", "surrogateescape"))


def held(pgw) -> set[str]:
    return {str(GroupingKey.from_labels(g["labels"])) for g in pgw.groups()}


def gone(pgw, key: GroupingKey) -> None:
    # Pushgateway answers a DELETE 202 and applies it from its write queue: wait for it.
    wait_until(lambda: str(key) not in held(pgw), 10, what=f"{key} deleted on the pushgateway")


def push(pgw, key: GroupingKey) -> None:
    assert http_request(pgw.url + key.path(), "PUT", b"fuzz_metric 1\n", timeout=10)[0] == 200


@pytest.mark.parametrize("target, labels", [
    ("/metrics/job/été/instance/x", {"job": "été", "instance": "x"}),
    ("/metrics/job/x/instance/Å-à", {"job": "x", "instance": "Å-à"}),  # bytes 0x85, 0xa0: whitespace in Latin-1
    ("/metrics/job/%C3%A9t%C3%A9/instance/x", {"job": "été", "instance": "x"}),
])
def test_a_delete_with_raw_utf8_bytes_deletes_that_group(delete_api, target, labels):
    api, tombstones, pgw = delete_api
    key = GroupingKey.from_labels(labels)
    push(pgw, key)
    assert str(key) in held(pgw)
    status, _ = raw_delete(api.port, target.encode("utf-8"))
    assert status == 202
    assert tombstones.recorded == [key]
    gone(pgw, key)


def test_a_path_that_is_not_utf8_is_refused_as_the_gateway_refuses_it(delete_api):
    api, tombstones, _ = delete_api
    status, body = raw_delete(api.port, b"/metrics/job/\xff\xfe/instance/x")
    with pytest.raises(GroupingKeyError) as refused:
        gateway_key(b"/metrics/job/\xff\xfe/instance/x")
    assert status == 400
    assert json.loads(body) == {"message": bad_push_path_message(refused.value)}
    assert tombstones.recorded == [] and len(tombstones) == 0


def _spellings(path: str, rng: random.Random) -> list[bytes]:
    """The vector's path and variations of it a client may send: one character %-escaped, raw
    UTF-8 (with bytes Latin-1 calls whitespace) or its escapes inserted, a byte that is not
    UTF-8, a doubled leading slash (which http.server collapses), a query string."""
    raw = path.encode("utf-8")
    at = rng.randrange(1, len(raw) + 1)
    char = rng.randrange(len(raw))
    odd = rng.choice(["é", "Å", "à", "日本", "\u2028"]).encode("utf-8")
    escaped = "".join(f"%{b:02X}" for b in odd).encode("ascii")
    return [
        raw,
        raw[:char] + f"%{raw[char]:02x}".encode("ascii") + raw[char + 1:],
        raw[:at] + odd + raw[at:],
        raw[:at] + escaped + raw[at:],
        raw[:at] + b"\xc3" + raw[at:],
        b"/" + raw,
        raw + b"?x=" + odd,
    ]


def test_fuzz_every_vector_the_delete_api_reads_as_the_gateway(delete_api):
    """Every spelling of every vector: the delete API records exactly the gateway's key and
    the group is gone from the pushgateway, or both refuse (400 with the gateway's message;
    404 for what is no push path at all, which the gateway would not route as a push)."""
    api, tombstones, pgw = delete_api
    rng = random.Random(21)
    tried = 0
    for vector in VECTORS:
        for target in _spellings(vector["path"], rng):
            tried += 1
            tombstones.recorded.clear()
            try:
                expected = gateway_key(target)
            except GroupingKeyError as err:
                status, body = raw_delete(api.port, target)
                assert (status, json.loads(body)) == (400, {"message": bad_push_path_message(err)}), target
                assert tombstones.recorded == [], target
                continue
            if expected is None:
                assert raw_delete(api.port, target)[0] == 404, target
                assert tombstones.recorded == [], target
                continue
            push(pgw, expected)
            assert raw_delete(api.port, target)[0] == 202, target
            assert tombstones.recorded == [expected], target
            gone(pgw, expected)
    assert tried == 7 * len(VECTORS)


def raw_request(port: int, method: bytes, target: bytes, body: bytes = b"") -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def test_through_the_host_a_raw_utf8_delete_removes_what_the_same_path_pushed(pushgateways):
    """End to end, as a client sees it: PUT and DELETE of one raw UTF-8 path through the
    OpenResty host (the plugin routes the PUT, nginx passes the DELETE's request target
    unchanged to the delete API): the group is gone from every pushgateway."""
    from kong_plugin_pgwshard.harness.nginx import NginxHost
    from kong_plugin_pgwshard.harness.processes import PluginServer

    pgws = pushgateways(2)
    nodes = [p.address for p in pgws]
    api = DeleteAPI("127.0.0.1:0", RecordingTombstones(), lambda: nodes).start()
    server = PluginServer().start()
    host = NginxHost(server.socket_path, {"membership": "static", "nodes": nodes}, nodes,
                     deletes=f"127.0.0.1:{api.port}").start()
    try:
        for target in ["/metrics/job/été/instance/x", "/metrics/job/x/instance/Å-à", "/metrics/job/日本/a/%C3%A9"]:
            raw = target.encode("utf-8")
            key = gateway_key(raw)
            assert key is not None
            assert raw_request(host.port, b"PUT", raw, b"fuzz_metric 1\n") == 200
            assert any(str(key) in held(p) for p in pgws)
            assert raw_request(host.port, b"DELETE", raw) == 202
            for pgw in pgws:
                gone(pgw, key)
    finally:
        host.stop()
        server.stop()
        api.stop()
