"""Kong DB-less, in DB mode and in hybrid mode, set up from the lines a checkout's README "Kong
topologies" gives, with its kong/kong.conf and kong/kong.yml:
pushgateways, PostgreSQL (one session-scoped cluster, one database per topology), Kong nodes or a
control plane with data planes, and pgwshard-sync (`kong.mode: admin`, probes) writing the
upstream's targets.

README's addresses are per host (every node's plugin reads `127.0.0.1:8001` or `:8007`). Here
every node runs on one host, so the nodes share one free loopback port for it with `reuseport`
(the kernel hands each connection to one of them): in DB mode every node's Admin API reads the
same database, and in hybrid mode every data plane holds the control plane's config, so a plugin
reading a sibling's API sees what its own would show once the config has reached both.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

from ..core.grouping import GroupingKey, parse_push_path
from ..core.ring import Member, Ring
from .kong import (
    Kong,
    bootstrap_database,
    cluster_certificate,
    control_plane_settings,
    data_plane_settings,
    shipped_declarative,
)
from .postgres import Postgres
from .processes import (
    ManagedProcess,
    PluginServer,
    Pushgateway,
    free_port,
    http_get,
    http_request,
    temp_dir,
    wait_until,
)

UPSTREAM = "pushgateways"
BODY = b"# TYPE kong_items counter\nkong_items 3\n"


def readme_blocks(readme: Path, heading: str) -> tuple[list[dict[str, str]], list[dict]]:
    """The kong.conf blocks (4-space indented `key = value` lines) and YAML blocks of README's
    paragraph starting with `**<heading>**`, in order: what a user copies for that topology."""
    text = readme.read_text()
    start = text.index(f"**{heading}**")
    end = text.find("\n**", start + 1)
    part = text[start:end]
    confs: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    for line in part.splitlines():
        if line.startswith("    ") and "=" in line and not line.lstrip().startswith("-"):
            key, _, value = line.split("#", 1)[0].strip().partition("=")
            if current is None:
                current = {}
                confs.append(current)
            current[key.strip()] = value.strip()
        elif line.strip():
            current = None
    yamls = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", part, re.S)]
    return confs, yamls


def shipped_plugin(kong_yml: Path, admin_url: str | None = None) -> dict:
    """The `pgwshard` plugin entity of the shipped kong.yml, with `admin_url` where README says."""
    doc = yaml.safe_load(kong_yml.read_text())
    (plugin,) = [p for s in doc["services"] for p in s.get("plugins", []) if p["name"] == "pgwshard"]
    if admin_url is not None:
        plugin["config"]["admin_url"] = admin_url
    return plugin


def entities_without_plugin(kong_yml: Path, targets: list[str]) -> dict:
    """The shipped kong.yml as its header says to load it in DB mode: without the plugin."""
    doc = yaml.safe_load(kong_yml.read_text())
    for service in doc["services"]:
        service.pop("plugins", None)
    (upstream,) = doc["upstreams"]
    upstream["targets"] = [{"target": t} for t in targets]
    return doc


def admin(url: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict | None]:
    """One Admin (or Status) API call with a JSON body: (status, decoded answer or None)."""
    status, raw = http_request(url + path, method, json.dumps(body).encode() if body is not None else None,
                               headers={"Content-Type": "application/json"}, timeout=10)
    return status, (json.loads(raw) if raw.strip() else None)


def import_shipped_entities(node: Kong, pg: dict[str, str], kong_yml: Path, targets: list[str]) -> None:
    """What kong/kong.yml's header tells a DB-mode user to do first: `kong config db_import` of the
    file without the plugin, with a kong.conf holding the database lines only (Kong's CLI cannot
    load an external plugin's schema: plugin_servers/init.lua indexes the `kong` global it lacks),
    before the nodes start (a node already running did not see what it wrote: its routes stayed 404)."""
    work = temp_dir("pgwshard-db-import-")
    conf, without = f"{work}/kong.conf", f"{work}/kong.yml"
    Path(conf).write_text("".join(f"{k} = {v}\n" for k, v in pg.items()))
    Path(without).write_text(yaml.safe_dump(entities_without_plugin(kong_yml, targets)))
    node.cli("config", "db_import", without, "-c", conf)


def add_shipped_plugin(node: Kong, plugin: dict) -> None:
    """Then the plugin, through the Admin API of a running node (it has the plugin's schema)."""
    status, body = admin(node.admin_url, "POST", "/services/pushgateway/plugins", plugin)
    if status != 201:
        raise RuntimeError(f"{node.name}: POST /services/pushgateway/plugins: {status} {body}")


class Topology:
    """Pushgateways, the proxying Kong nodes, the Admin API pgwshard-sync writes, and the sync."""

    def __init__(self, repo: Path, pgws: int = 3):
        """repo: the checkout whose README.md, kong/kong.conf and kong/kong.yml are followed."""
        self.readme = repo / "README.md"
        self.kong_conf = repo / "kong" / "kong.conf"
        self.kong_yml = repo / "kong" / "kong.yml"
        self.dir = temp_dir("pgwshard-topology-")
        self.pgws = [Pushgateway().start() for _ in range(pgws)]
        self.proxies: list[Kong] = []        # the nodes pushes go through
        self.writer: Kong | None = None     # the node whose Admin API pgwshard-sync writes
        self.others: list = []              # what else to stop (plugin servers, ...)
        self.sync: ManagedProcess | None = None
        self.pgwshard_yml: dict = {}

    # -- pgwshard-sync, from README's pgwshard.yml lines --------------------------------------
    def start_sync(self, weights: dict[str, int] | None = None, probes: dict | None = None) -> ManagedProcess:
        """pgwshard-sync with README's `kong:` section (mode admin, the writer's Admin API),
        probes at the shipped defaults (or `probes`), the pushgateways with `weights`
        ({address: weight})."""
        assert self.writer is not None
        settings = json.loads(json.dumps(self.pgwshard_yml))
        settings["kong"]["admin_url"] = self.writer.admin_url
        settings.update({
            "pushgateways": [{"address": p.address, "weight": (weights or {}).get(p.address, 100)} for p in self.pgws],
            "health": {"source": "probes", **({"probes": probes} if probes else {})},
            "rebalance": {"enabled": False},
            "metrics": {"listen": "127.0.0.1:0"},
        })
        path = f"{self.dir}/pgwshard.yml"
        Path(path).write_text(yaml.safe_dump(settings))
        self.sync = ManagedProcess("pgwshard-sync", [sys.executable, "-m", "kong_plugin_pgwshard.sync.daemon",
                                                     "--config", path]).start()
        return self.sync

    def patch_plugin(self, config: dict) -> None:
        """Change the pgwshard plugin's config through the writer's Admin API (a node, or the CP)."""
        assert self.writer is not None
        _, found = admin(self.writer.admin_url, "GET", "/plugins?name=pgwshard")
        assert found is not None
        (plugin,) = found["data"]
        status, body = admin(self.writer.admin_url, "PATCH", f"/plugins/{plugin['id']}", {"config": config})
        assert status == 200, body

    def stop_sync(self) -> None:
        if self.sync is not None:
            self.sync.stop()
            self.sync = None

    # -- what Kong holds ------------------------------------------------------------------------
    def targets(self, url: str) -> dict[str, int]:
        """{target: weight} as the API at `url` lists them (Admin or Status API)."""
        status, body = http_get(f"{url}/upstreams/{UPSTREAM}/targets?size=1000")
        assert status == 200, body
        return {t["target"]: t["weight"] for t in json.loads(body)["data"]}

    def read_urls(self) -> list[str]:
        raise NotImplementedError

    def wait_targets(self, expected: set[str], timeout: float = 30) -> None:
        """Until every proxying node's API lists exactly `expected` with a weight."""
        def reached() -> bool:
            return all({t for t, w in self.targets(u).items() if w > 0} == expected for u in self.read_urls())
        wait_until(reached, timeout, what=f"every node's targets to be {sorted(expected)}")

    def ring(self) -> Ring:
        return Ring([Member.parse(t, w) for t, w in self.targets(self.read_urls()[0]).items()])

    def holders(self, key: GroupingKey) -> list[str]:
        return [p.address for p in self.pgws if p.running
                and any(GroupingKey.from_labels(g["labels"]) == key for g in p.groups())]

    def push_everywhere(self, paths: list[str]) -> dict[str, int]:
        """PUT each path through every proxying node; {path@node: status} of those not 200."""
        failed = {}
        for n, node in enumerate(self.proxies):
            for path in paths:
                status, _ = http_request(node.proxy_url + path, "PUT", BODY, timeout=15)
                if status != 200:
                    failed[f"{path}@{n}"] = status
        return failed

    def misplaced(self, paths: list[str]) -> dict[str, list[str]]:
        """{path: holders} for every path whose group is not on its owner only."""
        ring, wrong = self.ring(), {}
        for path in paths:
            key = parse_push_path(path)
            if key is None:
                raise ValueError(f"{path}: not a push path")
            holders = self.holders(key)
            if holders != [ring.owner(key).name]:
                wrong[path] = holders
        return wrong

    def wait_plugin(self, timeout: float = 30) -> None:
        """Until every proxying node runs the plugin on the route: a bad push path gets the
        plugin's own 400 (without it, a pushgateway's). Kong builds a plugin added on another
        node (or on the CP) at its next config event: up to `db_update_frequency`, 5 s."""
        def active(node: Kong) -> bool:
            # every worker builds its plugins on its own: 20 answers in a row, on new connections
            for _ in range(20):
                status, body = http_request(node.proxy_url + "/metrics/job/", "PUT", BODY, timeout=10)
                if status != 400 or b"pgwshard: bad push path" not in body:
                    return False
            return True
        for node in self.proxies:
            wait_until(lambda node=node: active(node), timeout, interval=0.2, what=f"the plugin on {node.name}")

    def wait_ready(self, paths: list[str]) -> None:
        """pgwshard-sync started, every node listing every pushgateway and routing `paths` by
        that full ring: a node's plugin may still hold the ring it read before pgwshard-sync's
        first write (in DB mode until its next refresh_interval, 2 s)."""
        self.start_sync()
        self.wait_targets({p.address for p in self.pgws})
        self.wait_plugin()
        wait_until(lambda: self.routed_to_owners(paths), 30, interval=0.2, what="every node on the full ring")

    def routed_to_owners(self, paths: list[str]) -> bool:
        """Pushes of `paths` through every node all land on their owner only, from empty
        pushgateways (copies pushed before a change would stay: pgwshard-sync's rebalancer,
        off here, moves them)."""
        self.clear()
        return not self.push_everywhere(paths) and not self.misplaced(paths)

    def clear(self) -> None:
        for p in self.pgws:
            if p.running:
                for group in p.groups():
                    key = GroupingKey.from_labels(group["labels"])
                    http_request(p.url + key.path(), "DELETE")
        wait_until(lambda: all(not p.groups() for p in self.pgws if p.running), 10, what="pushgateways empty")

    def stop(self) -> None:
        self.stop_sync()
        for part in (*self.proxies, self.writer, *self.others, *self.pgws):
            if part is not None:
                part.stop()


class DbModeTopology(Topology):
    """Two Kong nodes on one database, README's "Traditional (DB mode)" lines; the plugin reads
    its node's Admin API at the address every node shares (README: 127.0.0.1:8001)."""

    def __init__(self, repo: Path, kong_bin: str, pg: Postgres, database: str, nodes: int = 2):
        super().__init__(repo)
        try:
            confs, yamls = readme_blocks(self.readme, "Traditional (DB mode).")
            (self.readme_conf,), (self.pgwshard_yml,) = confs, yamls
            pg.sql(f"CREATE DATABASE {database} OWNER {pg.user};")
            self.pg = {**pg.kong_settings(), "pg_database": database}
            bootstrap_database(kong_bin, self.pg)
            self.shared_admin_port = free_port()
            for n in range(nodes):
                node = Kong(dict(self.pg), self.kong_conf, kong_bin, name=f"db{n}")
                conf = {**self.readme_conf, **self.pg,
                        "admin_listen": f"127.0.0.1:{self.shared_admin_port} reuseport, {node.settings['admin_listen']}"}
                node.settings.update(conf)
                node.write_conf()
                self.proxies.append(node)
            self.writer = self.proxies[0]
            import_shipped_entities(self.writer, self.pg, self.kong_yml, [p.address for p in self.pgws])
            for node in self.proxies:
                node.start()
            # README: admin_url stays at its default, this node's Admin API (here the shared port)
            self.plugin_admin_url = f"http://127.0.0.1:{self.shared_admin_port}"
            add_shipped_plugin(self.writer, shipped_plugin(self.kong_yml, self.plugin_admin_url))
        except BaseException:
            self.stop()
            raise

    def read_urls(self) -> list[str]:
        return [n.admin_url for n in self.proxies]


class HybridTopology(Topology):
    """A control plane on PostgreSQL and data planes, README's "Hybrid" lines; `rpc`: the
    control plane and data planes with `cluster_rpc = on` and `cluster_incremental_sync = on`,
    each data plane's plugin server supervised beside Kong as README says for that case."""

    def __init__(self, repo: Path, kong_bin: str, pg: Postgres, database: str, data_planes: int = 2, rpc: bool = False,
                 kong_starts_plugin_server: bool | None = None, cp_settings_extra: dict[str, str] | None = None):
        """kong_starts_plugin_server: keep `pluginserver_pgwshard_start_cmd` on the data planes
        (default: unless rpc, as README says); cp_settings_extra: more kong.conf keys for the CP."""
        super().__init__(repo)
        try:
            confs, _ = readme_blocks(self.readme, "Hybrid (control plane and data planes).")
            self.readme_cp, self.readme_dp = confs[0], confs[1]
            self.rpc_cp, self.rpc_dp = readme_blocks(self.readme, "Hybrid with incremental sync.")[0]
            self.pgwshard_yml = readme_blocks(self.readme, "Traditional (DB mode).")[1][0]  # "as for DB mode"
            pg.sql(f"CREATE DATABASE {database} OWNER {pg.user};")
            self.pg = {**pg.kong_settings(), "pg_database": database}
            bootstrap_database(kong_bin, self.pg)
            cert, key = cluster_certificate(kong_bin, self.dir)
            cp_settings = {**self.readme_cp, **control_plane_settings(self.pg, cert, key)}
            self.rpc = rpc
            self.kong_starts = (not rpc) if kong_starts_plugin_server is None else kong_starts_plugin_server
            if rpc:
                cp_settings.update(self.rpc_cp)
            cp = Kong({}, self.kong_conf, kong_bin, name="cp", proxy=False, status=False)
            cp.settings.update({**cp_settings, "admin_listen": cp.settings["admin_listen"], **(cp_settings_extra or {})})
            cp.write_conf()
            self.writer = self.cp = cp
            self.shared_status_port = free_port()
            self.plugin_admin_url = f"http://127.0.0.1:{self.shared_status_port}"
            for n in range(data_planes):
                self.proxies.append(self._data_plane(kong_bin, n))
            import_shipped_entities(cp, self.pg, self.kong_yml, [p.address for p in self.pgws])
            cp.start()
            add_shipped_plugin(cp, shipped_plugin(self.kong_yml, self.plugin_admin_url))
            for dp in self.proxies:
                self.start_data_plane(dp)
        except BaseException:
            self.stop()
            raise

    def _data_plane(self, kong_bin: str, n: int) -> Kong:
        dp = Kong({}, self.kong_conf, kong_bin, name=f"dp{n}", admin=False)
        assert self.cp is not None
        settings = {**self.readme_dp, **data_plane_settings(self.cp),
                    # every DP's plugin reads 127.0.0.1:<shared> (README: 8007); the test's own port beside it
                    "status_listen": f"127.0.0.1:{self.shared_status_port} reuseport, 127.0.0.1:{dp.status_port}"}
        if self.rpc:
            # README: the two RPC lines, no start_cmd (pgwshard-plugin runs as its own service)
            rpc_lines = dict(self.rpc_dp)
            if self.kong_starts:  # the socket and query lines go with the supervised server
                rpc_lines.pop("pluginserver_pgwshard_socket")
                rpc_lines.pop("pluginserver_pgwshard_query_cmd")
            settings.update({k: dp.localize(v) for k, v in rpc_lines.items()})
        if not self.kong_starts:
            dp.settings.pop("pluginserver_pgwshard_start_cmd")
            server = PluginServer(["--no-parent-watchdog"], prefix=dp.prefix)
            settings["pluginserver_pgwshard_socket"] = server.socket_path
            self.others.append(server)
        dp.settings.update(settings)
        dp.write_conf()
        return dp

    def add_data_plane(self, kong_bin: str, wait: bool = True) -> Kong:
        dp = self._data_plane(kong_bin, len(self.proxies))
        self.proxies.append(dp)
        self.start_data_plane(dp, wait)
        return dp

    def start_data_plane(self, dp: Kong, wait: bool = True) -> None:
        if not self.kong_starts:
            server = self.plugin_server(dp)
            if not server.running:
                server.start()
        dp.start(wait)

    def plugin_server(self, dp: Kong) -> PluginServer:
        (server,) = [s for s in self.others if isinstance(s, PluginServer) and s.prefix == dp.prefix]
        return server

    def read_urls(self) -> list[str]:
        return [dp.status_url for dp in self.proxies]


class DblessTopology(Topology):
    """DB-less Kong nodes, README's "DB-less" lines: each starts from the shipped kong.yml (the
    plugin reading its node's Status API), pgwshard-sync posts the file with the current targets
    to every node's /config (README's pgwshard.yml block, `kong.mode: declarative`)."""

    def __init__(self, repo: Path, kong_bin: str, nodes: int = 2):
        super().__init__(repo)
        try:
            confs, yamls = readme_blocks(self.readme, "DB-less.")
            (self.readme_conf,), (self.pgwshard_yml,) = confs, yamls
            self.kong_yml_path = f"{self.dir}/kong.yml"
            self.shared_status_port = free_port()
            self.plugin_admin_url = f"http://127.0.0.1:{self.shared_status_port}"
            Path(self.kong_yml_path).write_text(yaml.safe_dump(shipped_declarative(
                self.kong_yml, [p.address for p in self.pgws], self.plugin_admin_url)))
            for n in range(nodes):
                node = Kong({}, self.kong_conf, kong_bin, name=f"dbless{n}")
                node.settings.update({
                    **self.readme_conf, "declarative_config": self.kong_yml_path,
                    "admin_listen": node.settings["admin_listen"],
                    # every node's plugin reads 127.0.0.1:<shared> (README: 8007); its own port beside it
                    "status_listen": f"127.0.0.1:{self.shared_status_port} reuseport, {node.settings['status_listen']}"})
                node.write_conf()
                self.proxies.append(node)
            self.writer = self.proxies[0]
            for node in self.proxies:
                node.start()
        except BaseException:
            self.stop()
            raise

    def start_sync(self, weights: dict[str, int] | None = None, probes: dict | None = None) -> ManagedProcess:
        self.pgwshard_yml = json.loads(json.dumps(self.pgwshard_yml))
        self.pgwshard_yml["kong"].update({"declarative_file": self.kong_yml_path,
                                          "nodes": [n.admin_url for n in self.proxies]})
        return super().start_sync(weights, probes)

    def patch_plugin(self, config: dict) -> None:
        """The plugin's config in the file every node loads (DB-less: no Admin API writes), posted
        to each node, as pgwshard-sync will post it from then on."""
        doc = yaml.safe_load(Path(self.kong_yml_path).read_text())
        for service in doc["services"]:
            for plugin in service.get("plugins", []):
                if plugin["name"] == "pgwshard":
                    plugin["config"].update(config)
        Path(self.kong_yml_path).write_text(yaml.safe_dump(doc))
        for node in self.proxies:
            status, body = admin(node.admin_url, "POST", "/config", doc)
            assert status == 201, body

    def read_urls(self) -> list[str]:
        return [n.status_url for n in self.proxies]
