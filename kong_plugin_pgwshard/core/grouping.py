"""Push paths to canonical grouping keys, exactly as Pushgateway reads them.

Pushgateway (1.5.1, the version Debian ships; checked against a running instance) handles
`/metrics/job/<JOB>{/<LABEL>/<VALUE>}` like this:
- Go decodes %-escapes of the whole path into `URL.Path` before anything routes it, and the
  router matches that decoded path (httprouter v1.3.0's ServeHTTP reads `req.URL.Path`;
  Pushgateway 1.5.1 registers `/metrics/job/:job/*labels` with prometheus/common's route). So
  `/%6detrics/job/x` and `/metrics/%6Aob/x` are pushes of job x, and `%2F` splits a segment like
  `/` does, also between `job` and its value (`/metrics/job%2Fx`); `+` stays `+`; a bad escape
  such as `%zz` is a 400 for the whole request, before routing.
- A path with `//`, `.` or `..` segments is not routed but redirected to its cleaned form.
- `job@base64/<B64>` and `<LABEL>@base64/<B64>` carry URL-safe base64, padding optional;
  `@base64/=` (or an empty value) is the empty string.
- Label names must match `[a-zA-Z_][a-zA-Z0-9_]*` and must not start with `__`; an even count of
  `/`-separated components after the job is "odd number of components"; a trailing `/` after a
  name gives it an empty value.
- A repeated label name: the last one wins. A `job` label among the labels is overridden by the
  job segment. An empty job is "job name is required".
- It accepts label values that are not UTF-8 and then fails every later push to that instance
  (its consistency check trips over the stored group), so we refuse those up front.

Every spelling of one group yields one `GroupingKey`, whose `str()` is the ring's hash input.
"""
from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from ..errors import GroupingKeyError

_PUSH_ROOT = "/metrics/job"
_BASE64_SUFFIX = "@base64"
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_URL_BASE64 = re.compile(r"[A-Za-z0-9_-]*\Z")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Values spelled plainly in canonical paths; anything else is written as base64.
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_.~-]+\Z")


@dataclass(frozen=True, slots=True)
class GroupingKey:
    """A Pushgateway group: all its grouping labels, `job` included, sorted by name."""

    labels: tuple[tuple[str, str], ...]

    @property
    def job(self) -> str:
        return dict(self.labels)["job"]

    def __str__(self) -> str:
        # Prometheus label-set syntax. This text is hashed onto the ring: never change it.
        return "{" + ",".join(f'{name}="{_escape_value(value)}"' for name, value in self.labels) + "}"

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> GroupingKey:
        """The key of a group given its grouping labels (as Pushgateway's API lists them)."""
        if not labels.get("job"):
            raise GroupingKeyError("job name is required")
        for name, value in labels.items():
            _check_label_name(name)
            if not isinstance(value, str) or not _is_utf8(value):
                raise GroupingKeyError(f"label {name} has a value that is not UTF-8 text: {value!r}")
        return cls(tuple(sorted(labels.items())))

    def path(self) -> str:
        """The canonical push path of this group, for PUT or DELETE on one instance."""
        parts = [_PUSH_ROOT + _encode_segment(self.job, "")]
        parts += [_encode_segment(value, name) for name, value in self.labels if name != "job"]
        return "".join(parts)


def parse_push_path(path: str, prefix: str = "") -> GroupingKey | None:
    """Parse the raw request path of a push (%-escapes intact; a query string is ignored).

    Returns None when the path is not a push path at all (reads such as GET /metrics,
    /api/v1/..., /-/healthy) and raises GroupingKeyError, naming the problem, for a push path
    that Pushgateway would not accept.
    """
    path = path.partition("?")[0]
    bad = _BAD_ESCAPE.search(path)
    if bad:
        if (_strip_prefix(path, prefix) or "").startswith(_PUSH_ROOT):
            raise GroupingKeyError(f'invalid URL escape "{path[bad.start():bad.start() + 3]}"')
        return None  # Go refuses the request before routing: nothing can be stored
    decoded, utf8 = _unescape(path)
    rest = _strip_prefix(decoded, prefix)
    if rest is None or not rest.startswith(_PUSH_ROOT):
        return None
    rest = rest[len(_PUSH_ROOT):]
    job_is_base64 = rest.startswith(_BASE64_SUFFIX)
    if job_is_base64:
        rest = rest[len(_BASE64_SUFFIX):]
    if rest == "" or rest == "/":
        raise GroupingKeyError("job name is required")
    if not rest.startswith("/"):
        return None  # e.g. /metrics/jobs: some other path, not ours to judge
    if not utf8:
        raise GroupingKeyError("path is not valid UTF-8 once %-escapes are decoded")
    _check_clean(rest)
    job_segment, sep, label_string = rest[1:].partition("/")
    job = _decode_base64(job_segment, "job name") if job_is_base64 else job_segment
    if not job:
        raise GroupingKeyError("job name is required")
    labels = _split_labels(sep + label_string)
    labels["job"] = job
    return GroupingKey(tuple(sorted(labels.items())))


def bad_push_path_message(err: GroupingKeyError) -> str:
    """The message of the gateway's 400 for a push path it refuses (also the delete API's)."""
    return f"pgwshard: bad push path: {err}"


def _split_labels(label_string: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    if len(label_string) <= 1:
        return labels
    components = label_string.split("/")
    if len(components) % 2 == 0:
        raise GroupingKeyError(f'odd number of components in label string "{label_string}"')
    for i in range(1, len(components) - 1, 2):
        name, value = components[i], components[i + 1]
        is_base64 = name.endswith(_BASE64_SUFFIX)
        if is_base64:
            name = name[: -len(_BASE64_SUFFIX)]
        _check_label_name(name)
        labels[name] = _decode_base64(value, f"label {name}") if is_base64 else value
    return labels


def _check_label_name(name: str) -> None:
    if not _LABEL_NAME.match(name) or name.startswith("__"):
        raise GroupingKeyError(f'improper label name "{name}"')


def _strip_prefix(path: str, prefix: str) -> str | None:
    if not prefix:
        return path
    prefix = "/" + prefix.strip("/")
    return path[len(prefix):] if path.startswith(prefix + "/") else None


def _unescape(text: str) -> tuple[str, bool]:
    """The path as Go's URL.Path holds it, and whether it is UTF-8 (if not, latin-1 decoded,
    good only for telling whether it is a push path). No bad escapes left at this point."""
    if "%" not in text and text.isascii():
        return text, True  # the common case, and nothing to decode
    try:  # a host may hand over raw bytes decoded with surrogateescape
        raw = unquote_to_bytes(text.encode("utf-8", "surrogateescape"))
    except UnicodeError:  # any other lone surrogate: bytes that are not UTF-8 either
        raw = unquote_to_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        return raw.decode("utf-8"), True
    except UnicodeError:
        return raw.decode("latin-1"), False


def _check_clean(decoded: str) -> None:
    # Pushgateway's router redirects such paths to their cleaned form instead of storing them.
    segments = decoded.split("/")[1:-1]  # the last segment may be empty: a trailing slash
    if any(segment in ("", ".", "..") for segment in segments) or decoded.split("/")[-1] in (".", ".."):
        raise GroupingKeyError(f'path has empty, "." or ".." segments: "{_PUSH_ROOT}{decoded}"')


def _decode_base64(text: str, what: str) -> str:
    stripped = text.rstrip("=")
    if not _URL_BASE64.match(stripped):
        raise GroupingKeyError(f'invalid base64 encoding for {what}="{text}": not URL-safe base64')
    try:
        raw = base64.b64decode(stripped + "=" * (-len(stripped) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as err:
        raise GroupingKeyError(f'invalid base64 encoding for {what}="{text}": {err}') from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise GroupingKeyError(f'{what} is not valid UTF-8 once base64-decoded: "{text}"') from None


def _encode_segment(value: str, name: str) -> str:
    """One `/name/value` (or, for the job, `/value`) piece of a canonical push path."""
    head = f"/{name}" if name else ""
    if _PLAIN_VALUE.match(value) and value not in (".", ".."):
        return f"{head}/{value}"
    encoded = base64.urlsafe_b64encode(value.encode("utf-8")).decode("ascii").rstrip("=") or "="
    return f"{head}{_BASE64_SUFFIX}/{encoded}"


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: they could not be hashed onto the ring
        return False
    return True


def _escape_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
