"""monitoring/pgwshard.dashboard.json against a running stack: real pushgateways, the real
pgwshard-sync process on its own probes, and a real Prometheus that scrapes both and loads
monitoring/pgwshard.rules.yml. Every panel's query must parse and return series."""
from __future__ import annotations

import json
import math
import re
import sys
import urllib.error
import urllib.request

import pytest

from kong_plugin_pgwshard.clients.pushgateway import PushgatewayClient
from kong_plugin_pgwshard.core.grouping import GroupingKey
from kong_plugin_pgwshard.core.ring import Member, Ring
from kong_plugin_pgwshard.harness.processes import (
    ManagedProcess,
    Pushgateway,
    free_port,
    http_get,
    temp_dir,
    wait_until,
)
from kong_plugin_pgwshard.harness.prometheus import Prometheus
from tests.support import REPO

DASHBOARD = REPO / "monitoring" / "pgwshard.dashboard.json"
RULES = [REPO / "monitoring" / "pgwshard.rules.yml", REPO / "monitoring" / "push-thresholds.example.yml"]
# What Grafana puts in place of its variables: the "All" of the pushgateway variable, and a
# rate window of several scrapes (the stack scrapes every second).
VARIABLES = {"$__rate_interval": "30s", "$__interval": "15s", "$__range": "5m", "$pushgateway": ".*"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_queries() -> list[tuple[str, str]]:
    return [(f"{panel['title']} [{target['refId']}]", target["expr"])
            for panel in dashboard()["panels"] if panel["type"] != "row" for target in panel["targets"]]


def substitute(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a dashboard variable the test does not know: {expr}"
    return expr


@pytest.fixture(scope="module")
def stack():
    """Three pushgateways with groups (one planted on a non-owner, one push refused),
    pgwshard-sync rebalancing every 2 s, and Prometheus scraping everything every second."""
    parts: list[ManagedProcess] = []
    try:
        pgws = [Pushgateway() for _ in range(3)]
        for pgw in pgws:
            parts.append(pgw.start())
        work = temp_dir("pgwshard-monitoring-")
        metrics = f"127.0.0.1:{free_port()}"
        config = f"{work}/pgwshard.yml"
        with open(config, "w") as f:
            json.dump({"pushgateways": [p.address for p in pgws],
                       "health": {"source": "probes", "probes": {"interval": "500ms", "timeout": "1s"}},
                       "membership": {"hold_down": "1s"},
                       "file_sd": {"path": f"{work}/members.json"},
                       "rebalance": {"enabled": True, "interval": "2s", "max_ops_per_second": 200},
                       "metrics": {"listen": metrics}}, f)
        daemon = ManagedProcess("pgwshard-sync", [sys.executable, "-m", "kong_plugin_pgwshard.sync.daemon",
                                                  "--config", config])
        parts.append(daemon.start())
        prometheus = Prometheus([p.address for p in pgws], sync_targets=[metrics], rule_files=RULES)
        parts.append(prometheus.start())

        ring = Ring(Member.parse(p.address) for p in pgws)
        owned = {p.address: 0 for p in pgws}
        for n in range(200):  # until every pushgateway owns a few (the ports, so the ring, vary)
            key = GroupingKey.from_labels({"job": "dashboard", "instance": f"i{n}"})
            PushgatewayClient(ring.owner(key).name).put_group(key, f"items_done {n}\n")
            owned[ring.owner(key).name] += 1
            if min(owned.values()) >= 2:
                break
        planted = GroupingKey.from_labels({"job": "planted", "instance": "moved"})
        stray = next(p.address for p in pgws if p.address != ring.owner(planted).name)
        PushgatewayClient(stray).put_group(planted, "items_done 1\n")
        [pushed] = [g for g in PushgatewayClient(stray).groups() if g.key == planted]
        refused = urllib.request.Request(pgws[0].url + "/metrics/job/dashboard", data=b"not the text format\n",
                                         method="PUT")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(refused, timeout=5)

        def has(expr: str) -> bool:
            return bool(prometheus.query(expr))

        wait_until(lambda: has("pgwshard_rebalance_groups_moved_total >= 1"), 60, what="the planted group moved")
        # (it waits for `rebalance.quiet` after its push) and scraped since: on its owner only
        wait_until(lambda: has(f'count(push_time_seconds{{job="planted", pushgateway="{ring.owner(planted).name}"}}) '
                               f'== 1 and on() count(push_time_seconds{{job="planted"}}) == 1'), 30,
                   what="the moved group scraped on its owner only")
        wait_until(lambda: has('pushgateway_http_requests_total{handler="push", code="400"}'), 30,
                   what="the refused push scraped")
        wait_until(lambda: has(f'pgwshard:push_group_last_client_push_time_seconds{{job="planted"}} '
                               f'and on() (count(push_time_seconds{{job="dashboard"}}) == {sum(owned.values())})'), 30,
                   what="every group scraped and recorded")
        # rate() and increase() need two samples in their window: a few scrapes of every target
        wait_until(lambda: has("min(count_over_time(up[30s])) >= 3 and on() count(up == 1) == 4"), 30,
                   what="every target scraped a few times")
        yield prometheus, pushed, sum(owned.values()) + 1, daemon
    finally:
        for part in reversed(parts):
            part.stop()


@pytest.mark.parametrize("title,expr", panel_queries(), ids=[t for t, _ in panel_queries()])
def test_every_panel_query_returns_series_from_the_stack(stack, title, expr):
    prometheus, *_ = stack
    result = prometheus.query(substitute(expr))  # raises on a parse error
    assert result, f"{title}: no series for {expr}"
    assert any(math.isfinite(float(r["value"][1])) for r in result), f"{title}: only NaN/Inf: {result}"


def test_the_pushgateway_panels_are_split_by_pushgateway(stack):
    prometheus, _, pushed_groups, _ = stack
    groups = prometheus.query(substitute(next(e for t, e in panel_queries() if t.startswith("Groups per"))))
    assert len({r["metric"].get("pushgateway") for r in groups}) == 3
    assert sum(int(r["value"][1]) for r in groups) == pushed_groups  # the moved one counted once


def test_the_oldest_groups_table_shows_a_moved_group_by_its_client_push(stack):
    prometheus, pushed, *_ = stack
    [moved] = prometheus.query('pgwshard:push_group_last_client_push_time_seconds{job="planted"}')
    assert float(moved["value"][1]) == pytest.approx(pushed.push_time, abs=0.01)  # not the copy's time


def test_the_rules_load_and_evaluate_without_errors(stack):
    prometheus, *_ = stack
    status, body = http_get(prometheus.url + "/api/v1/rules")
    groups = json.loads(body)["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert status == 200 and len(rules) == 12
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []


def test_the_dashboard_is_a_current_grafana_dashboard():
    board = dashboard()
    assert board["schemaVersion"] >= 39 and board["uid"] and board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in board["panels"]:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"] and all(t["expr"].strip() and t["refId"] for t in panel["targets"])
    used = {m for _, e in panel_queries() for m in re.findall(r"\$\w+", e)}
    assert used <= {"$__rate_interval", "$pushgateway"}


def test_the_sync_panel_shows_pgwshard_sync_up_then_down(stack):
    """Issue 22: no panel showed whether pgwshard-sync is up. (Last in this file: it stops the
    stack's pgwshard-sync.)"""
    prometheus, *_, daemon = stack
    expr = substitute(next(e for t, e in panel_queries() if t.startswith("pgwshard-sync up")))
    [sync] = prometheus.query(expr)
    assert sync["value"][1] == "1"
    daemon.stop()
    wait_until(lambda: [r["value"][1] for r in prometheus.query(expr)] == ["0"], 30, what="the panel to say down")
