"""A group's metric families, as Pushgateway's /api/v1/metrics lists them, back to text format.

Shape of one family in Pushgateway 1.5.1's JSON (checked against a running instance):

    {"type": "COUNTER"|"GAUGE"|"UNTYPED"|"HISTOGRAM"|"SUMMARY", "help": "..." (absent if none),
     "time_stamp": "...", "metrics": [
        {"labels": {...}, "value": "1.5e+10"}                               counter/gauge/untyped
        {"labels": {...}, "buckets": {"0.1": "1", "+Inf": "4"}, "sum": "2.5", "count": "4"}
        {"labels": {...}, "quantiles": {"0.5": "0.2"}, "sum": "10", "count": "7"}]}

Values are Go-formatted strings ("NaN", "+Inf", "1.5e+10") that the text parser reads back as
the same float, so they are passed through untouched rather than round-tripped via Python floats.
Every metric's labels include the group's grouping labels (and instance="" when the group has
no instance); those are left out of the text, because the push path sets them.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..clients.pushgateway import PUSHGATEWAY_FAMILIES
from ..errors import UpstreamError

_TEXT_TYPES = {"COUNTER": "counter", "GAUGE": "gauge", "UNTYPED": "untyped",
               "HISTOGRAM": "histogram", "SUMMARY": "summary"}


def escape_label_value(value: str) -> str:
    """Escape a label value for the text format: backslash, double quote and newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """Escape HELP text for the text format: backslash and newline (quotes stay as they are)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def families_to_text(families: Mapping[str, Mapping[str, Any]],
                     grouping_labels: Iterable[str] = ()) -> str:
    """Render families (name -> family as /api/v1/metrics lists it) in the text format.

    Labels named in grouping_labels are omitted from every sample. Pushgateway's own
    bookkeeping families (push_time_seconds, push_failure_time_seconds) are skipped.
    Raises UpstreamError if a family does not have the documented shape.
    """
    omit = frozenset(grouping_labels)
    lines: list[str] = []
    for name in sorted(families):
        if name in PUSHGATEWAY_FAMILIES:
            continue
        try:
            lines += _family_lines(name, families[name], omit)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise UpstreamError(f"metric family {name!r} has an unexpected shape: {exc!r}") from None
    return "".join(line + "\n" for line in lines)


def _family_lines(name: str, family: Mapping[str, Any], omit: frozenset[str]) -> list[str]:
    kind = _TEXT_TYPES.get(family["type"])
    if kind is None:
        raise ValueError(f"unsupported type {family['type']!r}")
    lines = []
    if family.get("help"):
        lines.append(f"# HELP {name} {escape_help(family['help'])}")
    lines.append(f"# TYPE {name} {kind}")
    for metric in family["metrics"]:
        # An empty value means "no such label" (Pushgateway lists instance="" on every sample).
        labels = {k: v for k, v in metric["labels"].items() if k not in omit and v != ""}
        if kind == "histogram":
            # Sort buckets by bound so the text lists them as a histogram should (+Inf last).
            for bound, count in sorted(metric["buckets"].items(), key=lambda kv: _number(kv[0])):
                lines.append(_sample(name + "_bucket", {**labels, "le": bound}, count))
            lines.append(_sample(name + "_sum", labels, metric["sum"]))
            lines.append(_sample(name + "_count", labels, metric["count"]))
        elif kind == "summary":
            for quantile, value in sorted(metric["quantiles"].items(), key=lambda kv: _number(kv[0])):
                lines.append(_sample(name, {**labels, "quantile": quantile}, value))
            lines.append(_sample(name + "_sum", labels, metric["sum"]))
            lines.append(_sample(name + "_count", labels, metric["count"]))
        else:
            lines.append(_sample(name, labels, metric["value"]))
    return lines


def _sample(name: str, labels: Mapping[str, str], value: str) -> str:
    _number(value)  # refuse anything the text parser would not read as a float
    if not labels:
        return f"{name} {value}"
    pairs = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{pairs}}} {value}"


def _number(text: str) -> float:
    # A value is written into the text as it came, so it must be one plain token.
    if not isinstance(text, str) or not text or any(c.isspace() for c in text):
        raise ValueError(f"not a number: {text!r}")
    return float(text)
