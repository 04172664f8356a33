"""core/kong_uri.py gives the path Kong forwards: real Kong 3.9.3's kong.request.get_path()
(the same normalize its router uses for the upstream path) for every raw path recorded in
tests/vectors/kong-3.9.3.json by tests/kong/test_kong_recordings.py."""
from __future__ import annotations

import pytest

from kong_plugin_pgwshard.core.kong_uri import forwarded_path
from tests.support import kong_recordings as rec

RECORDED = rec.load()["get_path"]


@pytest.mark.parametrize("raw", list(RECORDED))
def test_forwarded_path_is_what_kong_3_9_3_normalizes_the_raw_path_to(raw):
    assert forwarded_path(raw) == RECORDED[raw]


def test_every_raw_path_is_recorded():
    assert set(RECORDED) == set(rec.RAW_PATHS)
