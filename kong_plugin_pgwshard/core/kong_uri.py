"""The path Kong forwards upstream, from the raw path the plugin reads.

The plugin reads `kong.request.get_raw_path()` (nginx's $request_uri up to `?`), but Kong 3.9.3
forwards the path normalized (kong/router/atc.lua builds the upstream URI from
kong/tools/uri.lua's `normalize(path, true)`, kong/runloop/handler.lua re-escapes it): %-escapes
of unreserved and other characters decoded, reserved ones kept (upper case), `.` and `..`
segments removed, `//` merged. The pushgateway stores what it receives, so `//metrics/job/x` is
a push of job x and must go to x's owner. Parsing the path as forwarded gives the key the
pushgateway will store; for a path that is already clean it changes nothing.
"""
from __future__ import annotations

import re

# RFC 3986's reserved characters and `%`: Kong leaves their escapes encoded
_RESERVED = frozenset(b"!*'();:@&=+$,/?%#[]")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")


def forwarded_path(raw: str) -> str:
    """kong/tools/uri.lua's normalize(raw, merge_slashes=true). Raw bytes the plugin server
    received as surrogates (not UTF-8) stay bytes, decoded escapes become such bytes too."""
    # a dot matters only at a segment's start (a path starts with "/")
    if "%" not in raw and "/." not in raw and "//" not in raw:
        return raw  # the common case: nothing to normalize
    data = raw.encode("utf-8", "surrogateescape")
    if b"%" in data:
        data = _ESCAPE.sub(_decode_unreserved, data)
    if b"/." in data or b"//" in data:
        data = _remove_dot_segments(data)
    return data.decode("utf-8", "surrogateescape")


def _decode_unreserved(match: re.Match[bytes]) -> bytes:
    byte = int(match.group(1), 16)
    return match.group(0).upper() if byte in _RESERVED else bytes([byte])


def _remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 5.2.4 with `//` merged, as Kong's loop does it (the same cases, same order)."""
    out: list[bytes] = []
    rest = path
    for _ in range(len(path) + 1):  # each turn consumes at least one byte
        if not rest:
            break
        if rest == b"/.":
            rest = b"/"
        elif rest == b"/..":
            rest = b"/"
            if out:
                out.pop()
        elif rest in (b".", b".."):
            rest = b""
        elif rest.startswith(b"../"):
            rest = rest[3:]
        elif rest.startswith(b"./"):
            rest = rest[2:]
        elif rest.startswith(b"/./"):
            rest = rest[2:]
        elif rest.startswith(b"/../"):
            rest = rest[3:]
            if out:
                out.pop()
        elif rest.startswith(b"//"):
            rest = rest[1:]
        else:
            end = rest.find(b"/", 1)
            if end < 0:
                out.append(rest)
                rest = b""
            else:
                out.append(rest[:end])
                rest = rest[end:]
    return b"".join(out)
