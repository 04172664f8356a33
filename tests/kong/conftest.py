"""Real Kong 3.9.3 (.ci/build-kong.sh builds it from ../shared/kong-3.9.3; PGWSHARD_KONG names
another Kong 3.9 install's `kong`): a DB-less node with the shipped kong.conf lines and kong.yml,
pgwshard-sync writing its /config, real pushgateways."""
from __future__ import annotations

import os
import socket
import sys

import pytest
import yaml

from kong_plugin_pgwshard.core.grouping import GroupingKey, parse_push_path
from kong_plugin_pgwshard.core.ring import Member, Ring
from kong_plugin_pgwshard.harness.kong import Kong, kong_binary, shipped_declarative
from kong_plugin_pgwshard.harness.processes import (
    ManagedProcess,
    Pushgateway,
    http_get,
    http_request,
    temp_dir,
    wait_until,
)
from tests.support import REPO

KONG_CONF = REPO / "kong" / "kong.conf"
KONG_YML = REPO / "kong" / "kong.yml"


@pytest.fixture(scope="session")
def kong_bin() -> str:
    """The `kong` to run. Where CI runs (CI=true) a missing Kong fails the run; elsewhere the
    Kong tests skip with how to get it."""
    binary = kong_binary()
    if binary is None:
        how = ("no Kong 3.9: `bash .ci/build-kong.sh` builds Kong 3.9.3 from ../shared/kong-3.9.3, "
               "or set PGWSHARD_KONG to the `kong` of a Kong 3.9 install")
        if os.environ.get("CI"):
            pytest.fail(how)
        pytest.skip(how)
    return binary


class DblessGateway:
    """Pushgateways behind one DB-less Kong node set up as README "Kong topologies" says, with
    pgwshard-sync (probes, `kong.mode: declarative`) keeping the node's targets."""

    def __init__(self, kong_bin: str, pushgateways: int = 3, sync: bool = True, deletes: bool = False,
                 rebalance: bool = False, sync_settings: dict | None = None, plugin_socket: str | None = None,
                 kong_settings: dict | None = None, kong_env: dict[str, str] | None = None):
        """plugin_socket: Kong connects to a plugin server the test runs there (no start_cmd:
        Kong then leaves the server to others, kong/runloop/plugin_servers/process.lua);
        kong_settings: more kong.conf keys; kong_env: more variables in `kong start`'s environment."""
        self.dir = temp_dir("pgwshard-kong-world-")
        self.pgws = [Pushgateway().start() for _ in range(pushgateways)]
        self.kong_yml = f"{self.dir}/kong.yml"
        self.kong = Kong({"database": "off", "declarative_config": self.kong_yml, **(kong_settings or {})},
                         KONG_CONF, kong_bin, env=kong_env)
        if plugin_socket is not None:
            del self.kong.settings["pluginserver_pgwshard_start_cmd"]
            self.kong.settings["pluginserver_pgwshard_socket"] = plugin_socket
            self.kong.write_conf()
        self.deletes_port = None
        deletes_url = None
        if deletes:
            from kong_plugin_pgwshard.harness.processes import free_port
            self.deletes_port = free_port()
            deletes_url = f"http://127.0.0.1:{self.deletes_port}"
        self.declarative = shipped_declarative(KONG_YML, [p.address for p in self.pgws], self.kong.status_url,
                                               deletes_url)
        with open(self.kong_yml, "w") as f:
            yaml.safe_dump(self.declarative, f)
        self.sync: ManagedProcess | None = None
        self.sync_settings = sync_settings or {}
        self.rebalance = rebalance
        try:
            self.kong.start()
            # Kong answers before worker 0's plugin server made its socket (500 until then,
            # issue 19's start under load); these tests are about what comes after
            if plugin_socket is None:
                wait_until(lambda: os.path.exists(self.kong.socket_path), 15, what="the plugin server's socket")
            if sync:
                self.sync = self.start_sync()
        except BaseException:
            self.stop()
            raise

    def start_sync(self) -> ManagedProcess:
        config = f"{self.dir}/pgwshard.yml"
        settings = {
            "pushgateways": [p.address for p in self.pgws],
            "health": {"source": "probes"},
            "kong": {"mode": "declarative", "declarative_file": self.kong_yml, "upstream": "pushgateways",
                     "nodes": [self.kong.admin_url]},
            "rebalance": {"enabled": self.rebalance, "max_ops_per_second": 200},
            "metrics": {"listen": "127.0.0.1:0"},
        }
        if self.deletes_port:
            settings["deletes"] = {"listen": f"127.0.0.1:{self.deletes_port}",
                                  "tombstone_file": f"{self.dir}/tombstones"}
        settings.update(self.sync_settings)
        with open(config, "w") as f:
            yaml.safe_dump(settings, f)
        return ManagedProcess("pgwshard-sync", [sys.executable, "-m", "kong_plugin_pgwshard.sync.daemon",
                                                "--config", config]).start()

    def targets(self, url: str | None = None) -> dict[str, int]:
        """The upstream's targets as the node's Status API lists them: {target: weight}."""
        import json
        status, body = http_get(f"{url or self.kong.status_url}/upstreams/pushgateways/targets")
        assert status == 200, body
        return {t["target"]: t["weight"] for t in json.loads(body)["data"]}

    def ring(self) -> Ring:
        return Ring([Member.parse(t, w) for t, w in self.targets().items()])

    def owner(self, path: str) -> str:
        return self.ring().owner(parse_push_path(path)).name

    def holders(self, key: GroupingKey) -> list[str]:
        return [p.address for p in self.pgws if p.running
                and any(GroupingKey.from_labels(g["labels"]) == key for g in p.groups())]

    def wait_targets(self, expected: set[str], timeout: float = 30) -> None:
        wait_until(lambda: {t for t, w in self.targets().items() if w > 0} == expected, timeout,
                   what=f"Kong's targets to be {sorted(expected)}")

    def post_config(self, doc: dict | None = None) -> tuple[int, bytes]:
        """POST /config (this world's declarative config unless doc): a new __seq__, so every
        worker starts a new plugin instance on its next request."""
        import json
        return http_request(f"{self.kong.admin_url}/config", "POST", json.dumps(doc or self.declarative).encode(),
                            headers={"Content-Type": "application/json"}, timeout=10)

    def wait_on_owners(self, paths, timeout: float = 60) -> None:
        """Until every path's group sits on its owner only (the rebalancer's work)."""
        ring = self.ring()
        keys = [parse_push_path(p) for p in paths]
        wait_until(lambda: all(self.holders(k) == [ring.owner(k).name] for k in keys), timeout, interval=0.5,
                   what="every acknowledged push on its owner only")

    def misplaced(self, paths) -> list[str]:
        ring = self.ring()
        return [p for p in paths if self.holders(parse_push_path(p)) != [ring.owner(parse_push_path(p)).name]]

    def stop(self) -> None:
        for part in (self.sync, self.kong, *self.pgws):
            if part is not None:
                part.stop()


def raw_request(port: int, target: bytes, method: bytes = b"PUT", body: bytes = b"kong_items 1\n",
                headers: dict[bytes, bytes] | None = None, timeout: float = 15) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request whose request line carries `target` byte for byte (urllib would
    re-escape it or refuse raw bytes): (status, headers, body) of the answer."""
    head = [method + b" " + target + b" HTTP/1.1", b"Host: pgwshard.test", b"Connection: close",
            b"Content-Length: %d" % len(body), *(k + b": " + v for k, v in (headers or {}).items())]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        data = b""
        for _ in range(10_000):  # bounded: Connection: close ends it
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    header_text, _, answer = rest.partition(b"\r\n\r\n")
    fields = dict(line.decode("latin-1").split(": ", 1) for line in header_text.split(b"\r\n") if b": " in line)
    return int(status_line.split()[1]), {k.lower(): v for k, v in fields.items()}, answer


@pytest.fixture(scope="session")
def postgres(kong_bin):
    """One throwaway PostgreSQL cluster for the session's DB-mode and hybrid Kongs (each
    topology makes its own database in it). Fails under CI=true without PostgreSQL."""
    from kong_plugin_pgwshard.harness.postgres import Postgres, postgres_bin

    if postgres_bin() is None:
        how = "no PostgreSQL: apt-get install postgresql-15, or set PGWSHARD_PG_BIN"
        if os.environ.get("CI"):
            pytest.fail(how)
        pytest.skip(how)
    cluster = Postgres().start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def gateway(kong_bin):
    """A DB-less gateway per test module, all targets listed (tests that keep membership as is)."""
    world = DblessGateway(kong_bin)
    world.wait_targets({p.address for p in world.pgws})
    yield world
    world.stop()
