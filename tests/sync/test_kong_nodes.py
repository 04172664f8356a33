"""KongNodeWatch: which Kong nodes started, restarted or reloaded since the last look (real
Kong shows it in tests/kong/test_kong_lifecycle.py; here the answers are scripted)."""
from __future__ import annotations

from kong_plugin_pgwshard.errors import UpstreamError
from kong_plugin_pgwshard.sync.kong_nodes import KongNodeWatch


class ScriptedNode:
    """A KongAdmin whose `GET /status` answers with the workers' pids given, or fails (None)."""

    def __init__(self, url: str):
        self.url = url
        self.workers: list[int] | None = [10, 11]
        self.closed = 0

    def request(self, method: str, path: str):
        assert (method, path) == ("GET", "/status")
        if self.workers is None:
            raise UpstreamError(f"{self.url}: connection refused", target=self.url)
        return 200, {"memory": {"workers_lua_vms": [{"pid": p, "http_allocated_gc": "1 MiB"} for p in self.workers]}}

    def close(self) -> None:
        self.closed += 1


def test_new_workers_a_restart_and_a_node_back_count_once_and_nothing_else_does():
    a, b = ScriptedNode("http://a"), ScriptedNode("http://b")
    watch = KongNodeWatch([a, b])
    assert watch.changed() == []  # the first look: nothing to compare with
    assert watch.changed() == []
    a.workers = [12, 13]  # kong reload
    assert watch.changed() == ["http://a"]
    assert watch.changed() == []
    b.workers = None  # kong stop: not a change yet
    assert watch.changed() == []
    b.workers = [20, 21]  # kong start
    assert watch.changed() == ["http://b"]
    a.workers = [13, 12]  # the same workers listed in another order
    assert watch.changed() == []
    assert a.closed >= 6  # no keep-alive connection stays open between looks


def test_a_node_down_at_the_first_look_counts_when_it_comes_up():
    a = ScriptedNode("http://a")
    a.workers = None
    watch = KongNodeWatch([a])
    assert watch.changed() == []
    a.workers = [1, 2]
    assert watch.changed() == ["http://a"]
