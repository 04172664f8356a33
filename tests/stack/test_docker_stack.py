"""Offline checks of the Docker stack (docker/): no Docker engine runs here.

What a user of `docker compose -f docker/docker-compose.yml up --build` would hit first: a file
the stack names that does not exist, a port or hostname that one config spells differently from
another, Kong settings that differ from kong/kong.conf, a declarative file Kong would reject.
"""
from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from kong_plugin_pgwshard.harness.processes import temp_dir
from kong_plugin_pgwshard.plugin import listener

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"
KONG_CONF = REPO / "kong" / "kong.conf"
KONG_YML = REPO / "kong" / "kong.yml"
PUSHGATEWAYS = ("pushgateway-1", "pushgateway-2", "pushgateway-3")


# --- parsing helpers ---------------------------------------------------------------------------

def _compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            word, _, rest = pending.strip().partition(" ")
            instructions.append((word.upper(), rest.strip()))
        pending = ""
    return instructions


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in _dockerfile_instructions():
        if word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def _kong_conf() -> dict[str, str]:
    """kong.conf as Kong reads it: `key = value`, `#` starts a comment unless escaped."""
    settings: dict[str, str] = {}
    for line in KONG_CONF.read_text().splitlines():
        line = re.split(r"(?<!\\)#", line, maxsplit=1)[0].replace("\\#", "#").strip()
        if line:
            key, sep, value = line.partition("=")
            assert sep, f"kong/kong.conf: not a setting: {line!r}"
            settings[key.strip()] = value.strip()
    return settings


def _service_env(service: str) -> dict[str, str]:
    env = _compose()["services"][service].get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: str(value) for key, value in env.items()}


def _bind_mounts(service: str) -> dict[str, Path]:
    """container path -> host path (resolved against docker/) of a service's bind mounts."""
    mounts = {}
    for volume in _compose()["services"][service].get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (DOCKER / source).resolve()
    return mounts


def _daemon_config_on_host(tmp_path: Path) -> Path:
    """The pgwshard-sync container's config with each file it names moved to its bind mount's
    host path: pgwshard-sync checks at load that the files exist."""
    mounts = _bind_mounts("pgwshard-sync")
    config = yaml.safe_load(mounts[_daemon_command_config()].read_text())
    config["kong"]["declarative_file"] = str(mounts[config["kong"]["declarative_file"]])
    on_host = tmp_path / "pgwshard.yml"
    on_host.write_text(yaml.safe_dump(config))
    return on_host


def _published(service: str) -> dict[int, tuple[str, int]]:
    """container port -> (host ip, host port) of a service's published ports."""
    published = {}
    for spec in _compose()["services"][service].get("ports", []):
        host_ip, host_port, container_port = str(spec).split(":")
        published[int(container_port)] = (host_ip, int(host_port))
    return published


def _host_port(address: str) -> tuple[str, int]:
    parts = urlsplit(address if "://" in address else f"//{address}")
    assert parts.hostname and parts.port, f"no host:port in {address!r}"
    return parts.hostname, parts.port


def _daemon_config() -> dict:
    mounts = _bind_mounts("pgwshard-sync")
    config_path = _daemon_command_config()
    return yaml.safe_load(mounts[config_path].read_text())


def _daemon_command_config() -> str:
    command = _compose()["services"]["pgwshard-sync"]["command"]
    return command[command.index("--config") + 1]


def _kong_declarative_file() -> Path:
    return _bind_mounts("kong")[_service_env("kong")["KONG_DECLARATIVE_CONFIG"]]


# --- the compose file --------------------------------------------------------------------------

def test_compose_file_names_the_whole_stack():
    services = _compose()["services"]
    assert set(services) == {"kong", "consul", "prometheus", "pgwshard-sync", *PUSHGATEWAYS}
    assert services["kong"]["build"]["dockerfile"] == "docker/Dockerfile"
    # Kong and the daemon run the same image: one install of the package.
    assert services["kong"]["image"] == services["pgwshard-sync"]["image"]
    assert services["consul"]["command"][:2] == ["agent", "-dev"]
    for name in PUSHGATEWAYS:
        command = services[name]["command"]
        persistence = [arg for arg in command if arg.startswith("--persistence.file=")]
        assert persistence, f"{name} keeps its groups only in memory"
        volume_targets = [v.split(":")[1] for v in services[name]["volumes"]]
        assert str(Path(persistence[0].partition("=")[2]).parent) in volume_targets, \
            f"{name}'s persistence file is not on a volume"


def test_published_ports_listen_on_loopback_only():
    for name in _compose()["services"]:
        for container_port, (host_ip, _) in _published(name).items():
            assert host_ip == "127.0.0.1", f"{name}:{container_port} is published on {host_ip}"
    assert set(_published("kong")) == {8000, 8001}


def test_depends_on_waits_for_what_each_service_needs():
    services = _compose()["services"]
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], \
                    f"{name} waits for {dependency} to be healthy, but it has no healthcheck"
    assert set(services["pgwshard-sync"]["depends_on"]) >= {"kong", "consul"}


def _compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config_accepts_the_file():
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    result = subprocess.run([*command, "-f", str(COMPOSE_FILE), "config", "-q"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --- files the stack names ---------------------------------------------------------------------

def test_every_file_the_stack_names_exists():
    compose = _compose()
    for name, service in compose["services"].items():
        if "build" in service:
            context = (DOCKER / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file()
            assert context == REPO
        for target, source in _bind_mounts(name).items():
            assert source.exists(), f"{name} mounts {source} at {target}, which does not exist"
    for word, rest in _dockerfile_instructions():
        if word == "COPY":
            sources = [arg for arg in shlex.split(rest) if not arg.startswith("--")][:-1]
            for source in sources:
                assert (REPO / source).exists(), f"Dockerfile copies {source}, not in the repo"


def test_image_copies_what_pip_needs_and_links_the_packaged_commands():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    copied = {source for word, rest in _dockerfile_instructions() if word == "COPY"
              for source in [arg for arg in shlex.split(rest) if not arg.startswith("--")][:-1]}
    # setuptools reads the readme and finds the packages: without them `pip install` fails.
    needed = {"pyproject.toml", project["project"]["readme"],
              *(p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"])}
    assert needed <= copied, f"the image lacks {needed - copied}"
    links = re.findall(r"ln -s /opt/pgwshard/bin/(\S+) /usr/local/bin/(\S+?);",
                       " ".join(rest for word, rest in _dockerfile_instructions() if word == "RUN"))
    assert {src for src, dst in links if src == dst} == set(project["project"]["scripts"])


def test_build_context_ignore_file_keeps_what_the_dockerfile_copies():
    patterns = [line.strip() for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def included(path: str) -> bool:
        keep = True  # the last matching pattern decides, as in .dockerignore
        for pattern in patterns:
            negate = pattern.startswith("!")
            pattern = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
                keep = negate
        return keep

    for word, rest in _dockerfile_instructions():
        if word == "COPY":
            for source in [arg for arg in shlex.split(rest) if not arg.startswith("--")][:-1]:
                assert included(source), f"Dockerfile.dockerignore leaves out {source}"
    assert not included(".git")


# --- Kong's settings ---------------------------------------------------------------------------

def _kong_settings_in_image() -> dict[str, str]:
    """kong.conf settings the stack sets through KONG_* variables (image, then compose)."""
    env = {**_dockerfile_env(), **_service_env("kong")}
    return {key[len("KONG_"):].lower(): value for key, value in env.items() if key.startswith("KONG_")}


def test_kong_env_equals_kong_conf():
    conf = _kong_conf()
    in_image = _kong_settings_in_image()
    for key, value in conf.items():
        assert in_image.get(key) == value, f"kong.conf {key} = {value!r}, the stack has {in_image.get(key)!r}"
    plugin_server = {key: value for key, value in in_image.items()
                     if key.startswith("pluginserver") or key == "plugins"}
    assert plugin_server == {key: value for key, value in conf.items()
                             if key.startswith("pluginserver") or key == "plugins"}


def test_plugin_server_commands_are_the_packaged_entry_point():
    in_image = _kong_settings_in_image()
    assert in_image["plugins"].split(",") == ["bundled", "pgwshard"]
    assert in_image["pluginserver_names"] == "pgwshard"
    start = shlex.split(in_image["pluginserver_pgwshard_start_cmd"])
    query = shlex.split(in_image["pluginserver_pgwshard_query_cmd"])
    assert start[0] == query[0] and Path(start[0]).is_absolute()
    # The Dockerfile links the venv's script to the path kong.conf names.
    links = [rest for word, rest in _dockerfile_instructions() if word == "RUN" and start[0] in rest]
    assert any(f"/opt/pgwshard/bin/{Path(start[0]).name} {start[0]}" in rest for rest in links)
    # The socket Kong dials is the one the server listens on: <prefix>/pgwshard.sock.
    prefix = start[start.index("-p") + 1] if "-p" in start else "/usr/local/kong"
    assert in_image["pluginserver_pgwshard_socket"] == f"{prefix.rstrip('/')}/pgwshard.sock"
    # The query command, run from this checkout's install (at a prefix of its own: it holds the
    # socket there for the server, README "Kong starting, ..."), prints what Kong reads at start.
    assert query[query.index("-p") + 1] == prefix
    own_prefix = temp_dir("pgwshard-query-")
    args = [own_prefix if arg == prefix else arg for arg in query[1:]]
    local = [str(Path(sys.executable).parent / Path(query[0]).name), *args]
    result = subprocess.run(local, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    [info] = json.loads(result.stdout)
    assert info["Name"] == "pgwshard" and "access" in info["Phases"]
    held = listener.claim(f"{own_prefix}/pgwshard.sock")  # as the server would: the holder exits
    assert held is not None
    held.close()


# --- hostnames and ports agree -----------------------------------------------------------------

def test_docker_declarative_file_differs_from_kong_yml_only_in_targets():
    docker = yaml.safe_load(_kong_declarative_file().read_text())
    reference = yaml.safe_load(KONG_YML.read_text())
    for config in (docker, reference):
        for upstream in config.get("upstreams", []):
            upstream.pop("targets", None)
    assert docker == reference


def test_declarative_file_targets_the_compose_pushgateways():
    declarative = yaml.safe_load(_kong_declarative_file().read_text())
    daemon = _daemon_config()
    [upstream] = [u for u in declarative["upstreams"] if u["name"] == daemon["kong"]["upstream"]]
    targets = sorted(t["target"] for t in upstream["targets"])
    assert targets == sorted(daemon["pushgateways"])
    for target in targets:
        host, port = _host_port(target)
        assert host in PUSHGATEWAYS
        healthcheck = " ".join(_compose()["services"][host]["healthcheck"]["test"])
        assert f"localhost:{port}/" in healthcheck, f"{host} does not listen on {port}"
    [service] = [s for s in declarative["services"] if s["host"] == upstream["name"]]
    plugin = [p for p in service["plugins"] if p["name"] == "pgwshard"][0]
    assert plugin["config"]["membership"] == "upstream"
    assert plugin["config"]["upstream"] == upstream["name"]
    # The plugin reads targets from this node's Admin API, which must listen there.
    admin_url = plugin["config"].get("admin_url", "http://127.0.0.1:8001")
    admin_listen = _host_port(_service_env("kong")["KONG_ADMIN_LISTEN"].split()[0])
    assert _host_port(admin_url)[1] == admin_listen[1]
    assert admin_listen[0] in ("0.0.0.0", "127.0.0.1")


def test_daemon_reaches_consul_kong_and_is_scraped():
    daemon = _daemon_config()
    compose = _compose()
    consul_host, consul_port = _host_port(daemon["consul"]["address"])
    assert consul_host == "consul" and consul_port in _published("consul")
    assert daemon["health"]["source"] == "consul"
    assert daemon["consul"]["register"]["enabled"] is True
    assert daemon["kong"]["mode"] == "declarative"
    for node in daemon["kong"]["nodes"]:
        host, port = _host_port(node)
        assert host == "kong" and port == _host_port(_service_env("kong")["KONG_ADMIN_LISTEN"])[1]
    # The file the daemon rewrites is the one Kong loaded at start.
    assert _bind_mounts("pgwshard-sync")[daemon["kong"]["declarative_file"]] == _kong_declarative_file()
    prometheus = yaml.safe_load(_bind_mounts("prometheus")["/etc/prometheus/prometheus.yml"].read_text())
    scraped = {t for job in prometheus["scrape_configs"] for sc in job.get("static_configs", [])
               for t in sc["targets"]}
    _, metrics_port = _host_port(daemon["metrics"]["listen"])
    assert f"pgwshard-sync:{metrics_port}" in scraped
    assert compose["services"]["prometheus"]["command"][0] == "--config.file=/etc/prometheus/prometheus.yml"


def test_daemon_config_loads_with_the_daemons_own_validation(tmp_path):
    from kong_plugin_pgwshard.sync.settings import load_settings
    from kong_plugin_pgwshard.sync.sinks import DeclarativeSink, sinks_from_settings

    path = _daemon_config_on_host(tmp_path)
    settings = load_settings(str(path), environ={})  # unknown or misspelt keys raise ConfigError
    assert [m.name for m in settings.pushgateways] == [f"{name}:9091" for name in PUSHGATEWAYS]
    assert settings.source == "consul" and settings.consul.register.enabled
    [sink] = sinks_from_settings(settings)
    assert isinstance(sink, DeclarativeSink)
    assert sink.declarative_file == settings.kong.declarative_file
    # The container's command, with --check: validates the config and exits.
    entrypoint = _compose()["services"]["pgwshard-sync"]["entrypoint"]
    command = [str(Path(sys.executable).parent / Path(entrypoint[0]).name), "--config", str(path), "--check"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def stack_plugin_server(tmp_path):
    """The image's plugin-server command (Kong's start_cmd), run from this checkout with its
    prefix moved to a temp dir; yields the socket path Kong's settings name, moved alike."""
    from kong_plugin_pgwshard.harness.processes import ManagedProcess, wait_until

    settings = _kong_settings_in_image()
    argv = shlex.split(settings["pluginserver_pgwshard_start_cmd"])
    prefix = argv[argv.index("-p") + 1]
    argv[0] = str(Path(sys.executable).parent / Path(argv[0]).name)
    argv[argv.index("-p") + 1] = str(tmp_path)
    socket_path = settings["pluginserver_pgwshard_socket"].replace(prefix, str(tmp_path), 1)
    server = ManagedProcess("stack-plugin-server", argv, cwd=str(REPO)).start()
    try:
        def listening() -> bool:
            if not server.running:
                raise RuntimeError(f"plugin server exited: {server.log()[-2000:]}")
            return Path(socket_path).is_socket()

        wait_until(listening, 20, what=f"plugin server socket {socket_path}")
        yield socket_path
    finally:
        server.stop()


def test_stack_routes_pushes_to_the_healthy_compose_pushgateways(stack_plugin_server, tmp_path):
    """The stack's own files end to end, Kong replaced by its Admin API double and this test:
    pgwshard-sync's sink (docker/pgwshard.yml) loads docker/kong.yml with the healthy set into
    Kong's /config; the plugin (configured by docker/kong.yml, started by the image's command)
    follows the upstream and routes each push to its owner among the compose hostnames."""
    from dataclasses import replace

    from kong_plugin_pgwshard.core.grouping import parse_push_path
    from kong_plugin_pgwshard.core.ring import Ring
    from kong_plugin_pgwshard.harness.kong_rpc import KongPlugin, KongRPC, Request
    from kong_plugin_pgwshard.harness.processes import wait_until
    from kong_plugin_pgwshard.sync.settings import load_settings
    from kong_plugin_pgwshard.sync.sinks import sinks_from_settings
    from tests.support.kong_admin_double import KongAdminDouble

    admin = KongAdminDouble(db_less=True).start()
    rpc = KongRPC(stack_plugin_server)
    try:
        settings = load_settings(str(_daemon_config_on_host(tmp_path)), environ={})
        settings = replace(settings, kong=replace(settings.kong, nodes=(admin.url,)))
        [sink] = sinks_from_settings(settings)
        healthy = [m for m in settings.pushgateways if m.host != "pushgateway-2"]  # -2 is down
        sink.apply(healthy)
        assert admin.target_names("pushgateways") == ["pushgateway-1:9091", "pushgateway-3:9091"]

        declarative = yaml.safe_load(_kong_declarative_file().read_text())
        [plugin] = [p for s in declarative["services"] for p in s.get("plugins", []) if p["name"] == "pgwshard"]
        # The config as Kong hands it over: the schema the server gives Kong, defaults filled,
        # Kong's keys injected (harness/kong_rpc.py kong_config names the Kong files)
        kong = KongPlugin(rpc, rpc.plugin_info("pgwshard")["Schema"],
                          {**plugin["config"], "admin_url": admin.url, "refresh_interval": 0.2},
                          route_id="r1", service_id="s1")
        ring = Ring(healthy)
        paths = [f"/metrics/job/batch/instance/{i}" for i in "abcdefgh"]

        def routed() -> dict[str, tuple[str, int] | None]:
            return {path: kong.access(Request(path)).target for path in paths}

        expected = {path: (ring.owner(parse_push_path(path)).host, 9091) for path in paths}
        assert wait_until(lambda: routed() == expected, 10, what="pushes routed to their owners")
        assert {host for host, _ in expected.values()} == {"pushgateway-1", "pushgateway-3"}
        # A read is left to the route's upstream.
        assert kong.access(Request("/api/v1/metrics", method="GET")).target is None
    finally:
        rpc.close()
        admin.stop()


def test_prometheus_scrapes_passing_pushgateways_from_consul():
    prometheus = yaml.safe_load(_bind_mounts("prometheus")["/etc/prometheus/prometheus.yml"].read_text())
    daemon = _daemon_config()
    [job] = [job for job in prometheus["scrape_configs"] if "consul_sd_configs" in job]
    assert job["honor_labels"] is True
    [sd] = job["consul_sd_configs"]
    assert _host_port(sd["server"]) == _host_port(daemon["consul"]["address"])
    assert sd["services"] == [daemon["consul"]["service"]]
    keep = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    assert keep == [{"source_labels": ["__meta_consul_health"], "regex": "passing", "action": "keep"}]


def test_prometheus_config_passes_promtool(tmp_path):
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed")
    config = yaml.safe_load(_bind_mounts("prometheus")["/etc/prometheus/prometheus.yml"].read_text())
    # Debian builds Prometheus without Consul discovery (the prom/prometheus image has it), so
    # the Consul block is swapped for an equivalent static target; the rest is checked as is.
    for job in config["scrape_configs"]:
        if job.pop("consul_sd_configs", None) is not None:
            job["static_configs"] = [{"targets": ["pushgateway-1:9091"]}]
    mounts = _bind_mounts("prometheus")
    config["rule_files"] = [str(mounts[path]) for path in config.get("rule_files", [])]  # as mounted
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    result = subprocess.run(["promtool", "check", "config", str(checked)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_says_where_its_example_pushes_land():
    from kong_plugin_pgwshard.core.grouping import parse_push_path
    from kong_plugin_pgwshard.core.ring import Member, Ring

    text = " ".join((DOCKER / "README.md").read_text().split())
    claims = re.findall(r"((?:[a-h], )*[a-h](?: and [a-h])?) go to (pushgateway-\d)", text)
    ring = Ring(Member.parse(f"{name}:9091") for name in PUSHGATEWAYS)
    said = {instance: owner for instances, owner in claims
            for instance in re.split(r", | and ", instances)}
    assert sorted(said) == list("abcdefgh"), "README's example lists other groups than it pushes"
    for instance, owner in said.items():
        key = parse_push_path(f"/metrics/job/batch/instance/{instance}")
        assert ring.owner(key).name == f"{owner}:9091", f"README: {instance} goes to {owner}"

