"""Grouping keys: every spelling of a group parses to one key, as Pushgateway itself reads it."""
from __future__ import annotations

import base64
import json
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from prometheus_client import (
    CollectorRegistry,
    Gauge,
    delete_from_gateway,
    push_to_gateway,
    pushadd_to_gateway,
)
from prometheus_client.exposition import default_handler

from kong_plugin_pgwshard.core.grouping import GroupingKey, parse_push_path
from kong_plugin_pgwshard.core.ring import Member, Ring
from kong_plugin_pgwshard.errors import GroupingKeyError
from kong_plugin_pgwshard.harness.processes import wait_until

VECTORS = json.loads((Path(__file__).parents[1] / "vectors/grouping.json").read_text())
# Paths Pushgateway 1.5.1 accepts but we refuse: it stores the non-UTF-8 value and then fails
# every later push to that instance (seen in its consistency check), so the gateway says 400.
ACCEPTED_ONLY_BY_PUSHGATEWAY = {"/metrics/job/a/b@base64/_-8", "/metrics/job/a/b@base64/gA"}


def _wedges_pushgateway(error: GroupingKeyError) -> bool:
    """Pushgateway 1.5.1 returns 400 for a bad base64 job name without releasing its handler's
    mutex: every later `job@base64` push of that method to that instance hangs (fixed upstream
    by "Remove unneeded mutex"). The plugin refuses such paths, so they never reach one."""
    return str(error).startswith("invalid base64 encoding for job name")


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["path"])
def test_golden_vectors(vector):
    if "error" in vector:
        with pytest.raises(GroupingKeyError) as err:
            parse_push_path(vector["path"])
        assert str(err.value) == vector["error"]
    else:
        key = parse_push_path(vector["path"])
        assert (str(key) if key else None) == vector["key"]
        assert (dict(key.labels) if key else None) == vector["labels"]


def _put(url: str, body: bytes = b"pgwshard_probe 1\n") -> int:
    request = urllib.request.Request(url, data=body, method="PUT")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_a_real_pushgateway_agrees_with_every_vector(pushgateways):
    (pgw,) = pushgateways(1)
    # Paths that wedge Pushgateway 1.5.1 go last, when nothing else needs that instance.
    wedging = [v for v in VECTORS if v.get("error", "").startswith("invalid base64 encoding for job name")]
    for vector in [v for v in VECTORS if v not in wedging] + wedging:
        if vector["path"] in ACCEPTED_ONLY_BY_PUSHGATEWAY:
            continue
        status = _put(pgw.url + vector["path"])
        if vector.get("key"):
            assert status == 200, vector
        else:
            assert status >= 300, vector  # refused, redirected or not found: never stored
    stored = {GroupingKey.from_labels(g["labels"]) for g in pgw.groups()}
    expected = {parse_push_path(v["path"]) for v in VECTORS if v.get("key")}
    assert stored == expected


GROUPS = [
    ("batch", {}),
    ("batch", {"instance": "host-1:9100"}),
    ("backup", {"path": "/var/lib/db", "host": "a"}),
    ("etl", {"empty": "", "shard": "7"}),
    ("etl nightly", {"team": "data eng", "region": "eu/west"}),
    ("café", {"owner": "zoë", "plus": "a+b", "pct": "100%"}),
]


@pytest.mark.parametrize("job, grouping", GROUPS)
def test_prometheus_client_urls_reach_the_same_group(pushgateways, job, grouping):
    """push, pushadd and delete of prometheus_client, through its default handler, to a real
    pushgateway: what it stores is the key we compute from the URL the client built."""
    (pgw,) = pushgateways(1)
    seen: list[str] = []

    def recording_handler(url, method, timeout, headers, data):
        seen.append(urllib.parse.urlsplit(url).path)
        return default_handler(url, method, timeout, headers, data)

    registry = CollectorRegistry()
    Gauge("pgwshard_test_value", "a value", registry=registry).set(1)
    plain = GroupingKey.from_labels({"job": job, **grouping})

    push_to_gateway(pgw.address, job, registry, grouping_key=grouping, handler=recording_handler)
    (group,) = pgw.groups()
    assert GroupingKey.from_labels(group["labels"]) == plain
    pushadd_to_gateway(pgw.address, job, registry, grouping_key=grouping, handler=recording_handler)
    delete_from_gateway(pgw.address, job, grouping_key=grouping, handler=recording_handler)
    assert len(seen) == 3
    assert {parse_push_path(p) for p in seen} == {plain}


def test_key_text_is_prometheus_label_syntax():
    key = GroupingKey.from_labels({"job": "x", "b": 'say "hi"\\\n', "a": "1"})
    assert str(key) == '{a="1",b="say \\"hi\\"\\\\\\n",job="x"}'


def test_route_prefix():
    assert parse_push_path("/pgw/metrics/job/x", prefix="/pgw") == parse_push_path("/metrics/job/x")
    assert parse_push_path("/pgw/metrics/job/x", prefix="pgw/") == parse_push_path("/metrics/job/x")
    assert parse_push_path("/metrics/job/x", prefix="/pgw") is None
    assert parse_push_path("/pgwx/metrics/job/x", prefix="/pgw") is None


# --- properties -----------------------------------------------------------------------------

label_names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,12}", fullmatch=True).filter(
    lambda n: not n.startswith("__") and n != "job")
values = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
keys = st.builds(
    lambda job, labels: GroupingKey.from_labels({"job": job, **labels}),
    values.filter(bool), st.dictionaries(label_names, values, max_size=4))


def _spell(value: str, how: str) -> tuple[str, str]:
    """(suffix for the name, value segment) in one of the legal spellings."""
    raw = value.encode()
    if value == "":
        return "@base64", "="  # "@base64/" then "/" would make "//", which Pushgateway redirects
    if how in ("base64", "unpadded") or "/" in value or value in (".", ".."):
        text = base64.urlsafe_b64encode(raw).decode()
        return "@base64", text if how != "unpadded" else text.rstrip("=")
    if how == "escaped":
        return "", "".join(f"%{b:02X}" for b in raw)
    return "", urllib.parse.quote(value, safe="")


spellings = st.sampled_from(["plain", "escaped", "base64", "unpadded"])


@settings(max_examples=300, deadline=None)
@given(key=keys, data=st.data())
def test_any_legal_spelling_parses_back_to_its_key(key, data):
    labels = [(n, v) for n, v in key.labels if n != "job"]
    labels = data.draw(st.permutations(labels))
    suffix, job = _spell(key.job, data.draw(spellings))
    segments = [f"/metrics/job{suffix}/{job}"]
    if data.draw(st.booleans()):  # a job label among the labels is overridden by the job segment
        segments.append("/job/decoy")
    for name, value in labels:
        if data.draw(st.booleans()):  # a repeated name: the last one wins
            segments.append(f"/{name}/decoy")
        suffix, text = _spell(value, data.draw(spellings))
        segments.append(f"/{name}{suffix}/{text}")
    assert parse_push_path("".join(segments)) == key
    assert parse_push_path(key.path()) == key


any_text = st.text(st.characters(), max_size=60)  # lone surrogates included: hosts may pass them


@settings(max_examples=500, deadline=None)
@given(any_text | st.builds(lambda s: "/metrics/job" + s, any_text))
@example("/metrics/job/a\udc80")
def test_no_input_raises_anything_but_our_error(path):
    """Arbitrary text: a GroupingKeyError or None, or a key that the ring can hash and that
    survives the round trip through its canonical path."""
    try:
        key = parse_push_path(path)
    except GroupingKeyError:
        return
    if key is not None:
        assert Ring([Member("a", 1), Member("b", 2)]).owner(key)
        assert parse_push_path(key.path()) == key == GroupingKey.from_labels(dict(key.labels))


def _clear(pgw) -> None:
    """Delete every group of pgw and wait until it holds none (Pushgateway deletes asynchronously)."""
    for group in pgw.groups():
        request = urllib.request.Request(pgw.url + GroupingKey.from_labels(group["labels"]).path(), method="DELETE")
        urllib.request.urlopen(request, timeout=5).close()
    wait_until(lambda: pgw.groups() == [], timeout=5, what="a clean pushgateway")


def test_a_real_pushgateway_stores_every_spelling_as_one_group(pushgateways):
    """Random keys, each pushed in three random legal spellings to a real pushgateway: it holds
    exactly one group, whose labels are the key's, and DELETE on key.path() removes it."""
    (pgw,) = pushgateways(1)

    def delete(key: GroupingKey) -> None:
        request = urllib.request.Request(pgw.url + key.path(), method="DELETE")
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 202  # accepted: Pushgateway deletes asynchronously

    @settings(max_examples=40, deadline=None)
    @given(key=keys, data=st.data())
    def check(key, data):
        labels = [(n, v) for n, v in key.labels if n != "job"]
        try:
            for _ in range(3):
                suffix, job = _spell(key.job, data.draw(spellings))
                path = f"/metrics/job{suffix}/{job}"
                for name, value in data.draw(st.permutations(labels)):
                    suffix, text = _spell(value, data.draw(spellings))
                    path += f"/{name}{suffix}/{text}"
                assert parse_push_path(path) == key
                assert _put(pgw.url + path) == 200, path
            assert [GroupingKey.from_labels(g["labels"]) for g in pgw.groups()] == [key]
            delete(key)
            wait_until(lambda: pgw.groups() == [], timeout=5, what="the group deleted by its canonical path")
        finally:  # a failed example must not leave groups behind for the next one
            _clear(pgw)

    check()


# Pieces of path segments: mostly harmless, some where parsers tend to disagree.
PIECES = ["a", "b", "job", "instance", "x_1", "YQ", "Yg", "=", "@base64", "%20", "+", ":", "%C3%A9", "%2F",
          "%2E", ".", "%zz", "%2", "__", "1", "_", "?x=1", "%3F", "/"]
random_tails = st.tuples(
    st.sampled_from(["/", "/", "@base64/", ""]),
    st.lists(st.lists(st.sampled_from(PIECES), min_size=1, max_size=2).map("".join), max_size=7).map("/".join),
).map("".join)


def test_a_real_pushgateway_accepts_exactly_what_we_accept(pushgateways):
    """Differential check on random paths: what we parse, a real pushgateway stores under the
    same labels (200); what we refuse, it refuses too (400, or a redirect for unclean paths)."""
    (pgw,) = pushgateways(1)

    @settings(max_examples=300, deadline=None)
    @given(random_tails)
    def check(tail):
        path = "/metrics/job" + tail
        try:
            key = parse_push_path(path)
        except GroupingKeyError as err:
            if "not valid UTF-8" in str(err) or _wedges_pushgateway(err):
                return  # Pushgateway 1.5.1 mishandles these (see above); the plugin shields it
            event("refused")
            assert _put(pgw.url + path) >= 300, f"{path}: we refuse ({err}), Pushgateway stores it"
            return
        if key is None:
            return  # not a push path (e.g. /metrics/jobs): not ours to judge
        event("accepted")
        # One group at a time: groups kept from earlier examples could make this push
        # inconsistent with them in Pushgateway's eyes ({a="a"} and {a="a",instance=""} give the
        # same series), a 400 that says nothing about the path.
        assert pgw.groups() == []
        try:
            assert _put(pgw.url + path) == 200, f"{path}: we accept as {key}, Pushgateway refuses"
            assert [GroupingKey.from_labels(g["labels"]) for g in pgw.groups()] == [key], path
        finally:
            _clear(pgw)

    check()


def _escape_some(path: str, data) -> str:
    """Percent-encode a random choice of the path's characters outside existing escapes, `/` and
    the `/metrics/job` root included: Go decodes them all before Pushgateway's router matches.
    The leading `/` stays: a request target starts with it."""
    out, i = ["/"], 1
    while i < len(path):
        if path[i] == "%":
            out.append(path[i:i + 3])
            i += 3
            continue
        char = path[i]
        if data.draw(st.booleans()):
            hex_digits = char.encode("utf-8").hex()
            hex_digits = hex_digits.upper() if data.draw(st.booleans()) else hex_digits
            char = "".join(f"%{hex_digits[j:j + 2]}" for j in range(0, len(hex_digits), 2))
        out.append(char)
        i += 1
    return "".join(out)


def test_a_real_pushgateway_stores_escaped_spellings_under_the_key_we_route_by(pushgateways):
    """Issue 14: /%6detrics/job/x, /metrics/%6Aob/x, /metrics/job%2Fx/... are pushes Pushgateway
    stores (its router matches the decoded path), but were not push paths to the plugin, so they
    went to the route's round-robin balancing. Random keys, spelled with random characters
    %-escaped: Pushgateway stores each under the key we compute, so it reaches the same owner as
    the plain spelling."""
    (pgw,) = pushgateways(1)

    @settings(max_examples=60, deadline=None)
    @given(key=keys, data=st.data())
    def check(key, data):
        escaped = _escape_some(key.path(), data)
        try:
            assert parse_push_path(escaped) == key, escaped
            assert _put(pgw.url + escaped) == 200, escaped
            assert [GroupingKey.from_labels(g["labels"]) for g in pgw.groups()] == [key], escaped
        finally:
            _clear(pgw)

    check()
