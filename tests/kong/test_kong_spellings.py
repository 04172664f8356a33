"""Every spelling of one group lands on its owner as Kong 3.9.3 hands the path over.

What Kong does with a push path (kong/pdk/request.lua, kong/router/, kong/tools/uri.lua; and
seen below): `kong.request.get_raw_path()` is nginx's $request_uri up to `?`, byte for byte.
The router matches, and Kong forwards upstream, the path normalized: %-escapes of unreserved
and other characters decoded (`%6d` → `m`, `%2e` → `.`), reserved ones (`%2F`, `%25`, `%40`)
kept in upper case, `.` and `..` segments removed and `//` merged, then re-escaped. So a
pushgateway stores `//metrics/job/x` as job x. nginx itself refuses `..` above the root, a bad
escape and `%00` (400), and Kong's router refuses a path that is not UTF-8 (404, "no Route
matched", an [error] line from atc.lua). A query string never reaches the plugin.
tests/core/test_grouping.py and tests/vectors/grouping.json say what Pushgateway does with the
path it receives.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest

from kong_plugin_pgwshard.core.grouping import GroupingKey
from kong_plugin_pgwshard.harness.processes import http_request, wait_until

from .conftest import DblessGateway, raw_request

pytestmark = pytest.mark.kong

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "grouping.json").read_text())
JOBS = 9  # spellings of 9 groups each: Kong's own hash_on path picks the owner for all 9 by chance 1 in 3**9


# (raw path with J for the job, the labels Pushgateway stores besides job)
SPELLINGS = [
    (b"/metrics/job/J/instance/a", {"instance": "a"}),
    (b"/%6detrics/job/J/instance/a", {"instance": "a"}),
    (b"/metrics/%6Aob/J/instance/a", {"instance": "a"}),
    (b"/metrics/job%2FJ/instance/a", {"instance": "a"}),
    (b"/metrics/job/J/instance@base64/YQ", {"instance": "a"}),
    (b"/metrics/job/J/instance/a?x=1&instance=b", {"instance": "a"}),
    (b"/metrics/job/J/", {}),
    (b"/metrics/job/J/instance/a+b", {"instance": "a+b"}),
    (b"/metrics/job/J/instance/\xc3\xa9", {"instance": "é"}),
    (b"/metrics/job/J/instance/%C3%A9", {"instance": "é"}),
    (b"/metrics/job/J/instance/%2541", {"instance": "%41"}),
    (b"/metrics/job/J/instance/a%2e", {"instance": "a."}),
    # Kong cleans these before forwarding them: the pushgateway stores the cleaned path
    (b"//metrics/job/J/instance/a", {"instance": "a"}),
    (b"/metrics//job/J/instance/a", {"instance": "a"}),
    (b"/./metrics/job/J/instance/a", {"instance": "a"}),
    (b"/%2e/metrics/job/J/instance/a", {"instance": "a"}),
    (b"/other/../metrics/job/J/instance/a", {"instance": "a"}),
    (b"/metrics/job/J/./instance/a", {"instance": "a"}),
    (b"/metrics/job/J//instance/a", {"instance": "a"}),
    (b"/metrics/job/J/x/../instance/a", {"instance": "a"}),
    (b"/metrics/job/J/instance/a/b/x/%2E%2E", {"instance": "a", "b": ""}),
]


@pytest.mark.parametrize("spelling, labels", SPELLINGS, ids=[s.decode("latin-1") for s, _ in SPELLINGS])
def test_kong_hands_every_spelling_over_so_that_it_lands_on_its_owner_only(gateway, spelling, labels):
    ring = gateway.ring()
    tag = zlib.crc32(spelling)
    for n in range(JOBS):
        job = f"spell-{tag}-{n}"
        status, _, body = raw_request(gateway.kong.proxy_port, spelling.replace(b"J", job.encode()))
        assert status == 200, (spelling, status, body)
        key = GroupingKey.from_labels({"job": job, **labels})
        assert gateway.holders(key) == [ring.owner(key).name], (spelling, job)


# (raw path, status, who answers, what it says): the plugin answers with Pushgateway's wording
REFUSED = [
    (b"/metrics/job/J/instance/a%2Fb", 400, "plugin", "odd number of components"),
    (b"/metrics/job/J/a%2F%2Fb/c", 400, "plugin", 'empty, "." or ".." segments'),
    (b"/metrics/job/J/__x/1", 400, "plugin", "improper label name"),
    (b"/metrics/job/J/instance/a/", 400, "plugin", "odd number of components"),
    (b"/metrics/job/J/instance@base64/!!", 400, "plugin", "not URL-safe base64"),
    (b"/metrics/job/J/instance/%zz", 400, "nginx", "Bad request"),  # a bad escape
    (b"/metrics/job/J/instance/%00", 400, "nginx", "Bad request"),  # NUL
    (b"/../metrics/job/J", 400, "nginx", "Bad request"),  # above the root
    (b"/metrics/job/J/instance/\xff", 404, "router", "no Route matched"),  # atc wants UTF-8
]


@pytest.mark.parametrize("spelling, status, who, says", REFUSED, ids=[s.decode("latin-1") for s, *_ in REFUSED])
def test_kong_refuses_a_push_path_pushgateway_would_not_take_and_nothing_is_stored(gateway, spelling, status, who,
                                                                                  says):
    tag = zlib.crc32(spelling)
    job = f"refused-{tag}"
    answer, _, body = raw_request(gateway.kong.proxy_port, spelling.replace(b"J", job.encode()))
    assert answer == status, body
    if who == "nginx":
        assert body.startswith(b"Bad request"), body
    else:
        message = json.loads(body)["message"]
        prefix = "pgwshard: bad push path: " if who == "plugin" else ""
        assert message.startswith(prefix) and says in message, message
    assert not any(g["labels"].get("job") == job for p in gateway.pgws for g in p.groups())


def _clear(gateway: DblessGateway) -> None:
    for pgw in gateway.pgws:
        for group in pgw.groups():
            path = GroupingKey.from_labels(group["labels"]).path()
            assert http_request(pgw.url + path, "DELETE", timeout=5)[0] == 202
    wait_until(lambda: not any(p.groups() for p in gateway.pgws), 10, what="the pushgateways empty")


def test_every_grouping_vector_pushed_through_kong_is_stored_on_its_owner_only_or_nowhere(gateway):
    """tests/vectors/grouping.json (what Pushgateway makes of a path it receives) pushed through
    Kong: whatever a pushgateway stored, it is one group on its owner only; a refused push
    stored nothing. No oracle of ours: the key is the one the pushgateway stored."""
    ring = gateway.ring()
    outcomes = {}
    for vector in VECTORS:
        _clear(gateway)
        status, _, body = raw_request(gateway.kong.proxy_port, vector["path"].encode())
        stored = [(p.address, GroupingKey.from_labels(g["labels"])) for p in gateway.pgws for g in p.groups()]
        outcomes[vector["path"]] = status
        if 200 <= status < 300:
            assert len(stored) == 1, (vector, stored)
            ((holder, key),) = stored
            assert holder == ring.owner(key).name, (vector, key)
        else:
            assert stored == [], (vector, status, body)
    # the vectors Pushgateway stores are stored through Kong too
    assert all(200 <= outcomes[v["path"]] < 300 for v in VECTORS if v.get("key"))
