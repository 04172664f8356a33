"""Groups read from a real pushgateway's /api/v1/metrics render back to the same families."""
from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kong_plugin_pgwshard.clients.pushgateway import PushgatewayClient
from kong_plugin_pgwshard.core.grouping import GroupingKey
from kong_plugin_pgwshard.errors import UpstreamError
from kong_plugin_pgwshard.harness.processes import http_get
from kong_plugin_pgwshard.rebalance.exposition import (
    escape_help,
    escape_label_value,
    families_to_text,
)

# Every type Pushgateway 1.5.1 stores, with help and label values that need escaping.
ALL_TYPES = r'''# HELP jobs_done_total Jobs done, "quoted" and \\ backslashed\nsecond line
# TYPE jobs_done_total counter
jobs_done_total{queue="a\"b\\c\nd"} 3
jobs_done_total{queue="plain"} 1.5e+10
# TYPE temperature gauge
temperature{room="x"} -3.25
temperature{room="y"} NaN
# TYPE anything untyped
anything{why="inf"} +Inf
anything{why="neg"} -Inf
# HELP latency_seconds A histogram
# TYPE latency_seconds histogram
latency_seconds_bucket{path="/a",le="0.005"} 1
latency_seconds_bucket{path="/a",le="0.1"} 3
latency_seconds_bucket{path="/a",le="1"} 5
latency_seconds_bucket{path="/a",le="+Inf"} 6
latency_seconds_sum{path="/a"} 7.125
latency_seconds_count{path="/a"} 6
# TYPE size_bytes summary
size_bytes{quantile="0.5"} 120
size_bytes{quantile="0.99"} 4096
size_bytes_sum 1e+06
size_bytes_count 2048
'''

KEY = GroupingKey.from_labels({"job": "batch", "instance": "host/1", "shard": ""})


def _user_families(pgw) -> dict:
    """Parsed families of the group's samples on pgw, Pushgateway's own bookkeeping left out."""
    status, body = http_get(pgw.url + "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        samples = [s for s in family.samples if s.labels.get("job") == "batch"]
        if samples and family.name not in ("push_time_seconds", "push_failure_time_seconds"):
            # NaN != NaN: compare values by their text
            out[family.name] = (family.type, family.documentation,
                                sorted((s.name, sorted(s.labels.items()), repr(s.value)) for s in samples))
    return out


def test_every_type_survives_a_copy_exactly(pushgateways):
    source, target = pushgateways(2)
    PushgatewayClient(source.address).put_group(KEY, ALL_TYPES)
    [group] = PushgatewayClient(source.address).groups()
    assert group.key == KEY
    assert set(group.families) == {"jobs_done_total", "temperature", "anything", "latency_seconds", "size_bytes"}

    text = families_to_text(group.families, dict(KEY.labels))
    PushgatewayClient(target.address).put_group(KEY, text)

    before, after = _user_families(source), _user_families(target)
    assert before == after
    assert after["latency_seconds"][0] == "histogram" and after["size_bytes"][0] == "summary"
    # (the client parser names a counter family without its _total suffix)
    assert after["jobs_done"][1] == 'Jobs done, "quoted" and \\ backslashed\nsecond line'
    assert len(after["jobs_done"][2]) == 2


def test_grouping_labels_come_from_the_path_not_the_samples():
    families = {"up_to_date": {"type": "GAUGE", "metrics": [
        {"labels": {"job": "batch", "instance": "", "disk": "sda"}, "value": "1"}]}}
    assert families_to_text(families, ["job", "instance"]) == '# TYPE up_to_date gauge\nup_to_date{disk="sda"} 1\n'


def test_pushgateway_bookkeeping_families_are_not_pushed_back():
    families = {
        "push_time_seconds": {"type": "GAUGE", "metrics": [{"labels": {}, "value": "1.7e+09"}]},
        "push_failure_time_seconds": {"type": "GAUGE", "metrics": [{"labels": {}, "value": "0"}]},
        "x": {"type": "UNTYPED", "metrics": [{"labels": {}, "value": "2"}]},
    }
    assert families_to_text(families) == "# TYPE x untyped\nx 2\n"


def test_histogram_buckets_are_written_in_bound_order():
    families = {"h": {"type": "HISTOGRAM", "metrics": [{"labels": {}, "buckets": {
        "+Inf": "4", "10": "3", "2.5": "2", "0.1": "1"}, "sum": "5", "count": "4"}]}}
    lines = families_to_text(families).splitlines()
    assert [line.split('"')[1] for line in lines if "_bucket" in line] == ["0.1", "2.5", "10", "+Inf"]


def test_escaping_rules_of_the_text_format():
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    assert escape_help('a\\b"c\nd') == 'a\\\\b"c\\nd'


@pytest.mark.parametrize("family", [
    {"type": "GAUGE_HISTOGRAM", "metrics": []},
    {"type": "GAUGE", "metrics": [{"labels": {}, "value": "1 2"}]},
    {"type": "GAUGE", "metrics": [{"labels": {}, "value": "one"}]},
    {"type": "COUNTER", "metrics": [{"labels": {}}]},
    {"metrics": []},
])
def test_an_unexpected_shape_is_a_clear_error(family):
    with pytest.raises(UpstreamError, match="metric family 'm'"):
        families_to_text({"m": family})
