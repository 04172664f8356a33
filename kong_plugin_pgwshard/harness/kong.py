"""Real Kong (3.9.3 from ../shared/kong-3.9.3, or any Kong 3.9 install) on loopback ports
chosen here, with the shipped kong.conf lines, always stopped.

Kong is started as its users start it: `kong start -c kong.conf` (nginx daemonized, workers
spawning the plugin server from worker 0), `kong reload`, `kong stop`. Started as root, its
workers run as an unprivileged user (`nginx_user`, Kong's default `kong kong`, `nobody` where
there is no such user) and so does the plugin server they spawn: the prefix is given to that
user, as Kong's packages give /usr/local/kong to `kong`, so that the server can make its socket
there.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .processes import _RUNNING, child_pids, free_port, http_get, temp_dir, wait_until

KONG_ENV = "PGWSHARD_KONG"  # the `kong` executable to run; not KONG_*, which Kong reads as its config
# where .ci/build-kong.sh builds it: readable by the workers' user (root's ~/.cache is not)
KONG_CACHE = Path(os.environ.get("PGWSHARD_KONG_CACHE") or (
    "/var/cache/pgwshard" if os.geteuid() == 0
    else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pgwshard"))
# the workers' user and group when started as root (no `kong` user here); PGWSHARD_KONG_USER
# ("root root") where the checkout is out of nobody's reach (.ci/run decides)
WORKER_USER = tuple((os.environ.get("PGWSHARD_KONG_USER") or "nobody nogroup").split())

# Lines Kong 3.9.3 itself logs at [error] or above in runs that are fine, each with its cause;
# error_lines() leaves them out so that a test sees pgwshard's errors, not Kong's noise.
KONG_NOISE = (
    # kong/runloop/balancer/targets.lua: a target event for an upstream whose balancer this
    # worker has not built yet (targets created right after their upstream, DB mode)
    re.compile(r"target create: balancer not found"),
    # kong/runloop/plugin_servers/process.lua:211 calls kong.log.error (no such function) when
    # the plugin server it stops on exit_worker is already gone
    re.compile(r"process\.lua:211: attempt to call field 'error'"),
    # lua-resty-events: a worker's timer loses the events broker as workers exit (a reload's
    # old workers, a stop)
    re.compile(r"communicate\(\): event worker failed to communicate with broker"),
)
_LEVELS = re.compile(r"\[(error|crit|alert|emerg)\]")


def kong_binary() -> str | None:
    """$PGWSHARD_KONG, else `kong` on PATH, else the build .ci/build-kong.sh caches; None if none."""
    explicit = os.environ.get(KONG_ENV)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which("kong")
    if found:
        return found
    cached = KONG_CACHE / "kong-3.9.3" / "bin" / "kong"
    return str(cached) if os.access(cached, os.X_OK) else None


def read_conf_lines(path: str | Path) -> dict[str, str]:
    """The `key = value` lines of a kong.conf file, comments and blank lines left out."""
    settings: dict[str, str] = {}
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            key, sep, value = line.partition("=")
            if not sep:
                raise ValueError(f"{path}: not a `key = value` line: {raw!r}")
            settings[key.strip()] = value.strip()
    return settings


def plugin_server_command() -> str:
    """The installed `pgwshard-plugin` beside this interpreter (a virtualenv's bin/)."""
    beside = Path(sys.executable).with_name("pgwshard-plugin")
    found = str(beside) if beside.exists() else shutil.which("pgwshard-plugin")
    if not found:
        raise RuntimeError("pgwshard-plugin is not installed beside this Python")
    return found


def _kong_env() -> dict[str, str]:
    """This environment without KONG_*: Kong reads every KONG_<KEY> as kong.conf's <key>."""
    return {k: v for k, v in os.environ.items() if not k.startswith("KONG_")}


class Kong:
    """One Kong node: kong.conf written from the shipped plugin lines plus `settings`."""

    def __init__(self, settings: dict[str, str], plugin_lines: str | Path | None = None,
                 binary: str | None = None, name: str = "kong", status: bool = True,
                 admin: bool = True, proxy: bool = True, env: dict[str, str] | None = None):
        """settings: kong.conf keys beside the plugin lines (database, declarative_config, role,
        ...; they win over the plugin lines); plugin_lines: the kong.conf whose lines users copy
        (kong/kong.conf), its paths /usr/local/kong and /usr/local/bin/pgwshard-plugin replaced by
        this node's prefix and the installed server; status/admin/proxy: listen on a free port;
        env: variables added to the environment `kong` runs in (its nginx workers, and the plugin
        server they start, keep only those an `nginx_main_env` line names)."""
        self.binary = binary or kong_binary()
        if self.binary is None:
            raise RuntimeError(f"no Kong: run .ci/build-kong.sh or set {KONG_ENV}")
        self.name = name
        self.env = dict(env or {})
        self.prefix = temp_dir(f"pgwshard-{name}-")
        self.proxy_port = free_port() if proxy else None
        self.admin_port = free_port() if admin else None
        self.status_port = free_port() if status else None
        self.user = WORKER_USER if os.geteuid() == 0 else None
        if self.user:  # the plugin server, run as the workers' user, makes its socket here
            os.chown(self.prefix, pwd.getpwnam(self.user[0]).pw_uid, -1)
        os.chmod(self.prefix, 0o755)
        conf: dict[str, str] = {"prefix": self.prefix}
        if plugin_lines is not None:
            server = plugin_server_command()
            for key, value in read_conf_lines(plugin_lines).items():
                conf[key] = self.localize(value, server)
        conf.update({
            "proxy_listen": f"127.0.0.1:{self.proxy_port}" if proxy else "off",
            "admin_listen": f"127.0.0.1:{self.admin_port}" if admin else "off",
            "status_listen": f"127.0.0.1:{self.status_port}" if status else "off",
            "admin_gui_listen": "off",  # Kong Manager is not built; its default port is per host
            "anonymous_reports": "off",
        })
        if self.user:
            conf["nginx_user"] = " ".join(self.user)
        conf.update(settings)
        self.settings = conf
        self.conf_path = Path(temp_dir(f"pgwshard-{name}-conf-")) / "kong.conf"
        self.write_conf()

    def localize(self, value: str, server: str | None = None) -> str:
        """A kong.conf value as README and kong/kong.conf write it, for this node: /usr/local/kong
        is its prefix, /usr/local/bin/pgwshard-plugin the installed server."""
        return (value.replace("/usr/local/bin/pgwshard-plugin", server or plugin_server_command())
                .replace("/usr/local/kong", self.prefix))

    def write_conf(self) -> None:
        self.conf_path.write_text("".join(f"{k} = {v}\n" for k, v in self.settings.items()))

    def use_ports(self, proxy: int | None = None, admin: int | None = None, status: int | None = None) -> None:
        """Listen on these ports instead of the free ones chosen (a stack with well-known
        ports); before start(). A port left None keeps its choice."""
        for name, port in (("proxy", proxy), ("admin", admin), ("status", status)):
            if port is not None and getattr(self, f"{name}_port") is not None:
                setattr(self, f"{name}_port", port)
                self.settings[f"{name}_listen"] = f"127.0.0.1:{port}"
        self.write_conf()

    # -- where it answers ---------------------------------------------------------------------
    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.status_port}"

    @property
    def socket_path(self) -> str:
        return self.settings.get("pluginserver_pgwshard_socket", os.path.join(self.prefix, "pgwshard.socket"))

    # -- the CLI ------------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """`kong ARGS`, its output captured; raises with Kong's words when it fails and check."""
        assert self.binary is not None
        done = subprocess.run([self.binary, *args], capture_output=True, text=True, timeout=timeout,
                              env={**_kong_env(), **self.env}, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise RuntimeError(f"kong {' '.join(args)} failed ({done.returncode}): {done.stderr[-3000:]}"
                               f"{done.stdout[-1000:]}\n{self.error_log()[-3000:]}")
        return done

    def start(self, wait: bool = True) -> Kong:
        """`kong start`; with wait, returns once Kong says it is ready (the Status API's
        /status/ready: routes and plugins built) or its Admin API answers. Never through the
        proxy: a request there would start the plugin's instance."""
        _RUNNING.add(self)
        self.cli("start", "-c", str(self.conf_path))
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self, timeout: float = 30) -> None:
        url = f"{self.status_url}/status/ready" if self.status_port else f"{self.admin_url}/status"
        wait_until(lambda: http_get(url, timeout=2)[0] == 200, timeout, what=f"{self.name} ready ({url})")

    def reload(self) -> None:
        """`kong reload`: new workers (a new plugin server), the old ones finish their requests."""
        self.cli("reload", "-c", str(self.conf_path))

    def stop(self, timeout: float = 20) -> None:
        """`kong stop`, then whatever is left of this node killed: nothing outlives a test."""
        _RUNNING.discard(self)
        master = self.master_pid()
        if master is not None:
            self.cli("stop", "-p", self.prefix, timeout=timeout, check=False)
        deadline = time.monotonic() + timeout
        while self._own_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in self._own_pids():
            _kill(pid)

    def restart(self) -> None:
        self.stop()
        self.start()

    # -- its processes ------------------------------------------------------------------------
    def master_pid(self) -> int | None:
        try:
            pid = int((Path(self.prefix) / "pids" / "nginx.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def plugin_server_environ(self, pid: int) -> dict[str, str]:
        """The environment a plugin server of this node runs with (/proc/PID/environ)."""
        raw = (Path("/proc") / str(pid) / "environ").read_bytes()
        return dict(item.decode("utf-8", "replace").partition("=")[::2] for item in raw.split(b"\0") if item)

    def plugin_server_pids(self) -> list[int]:
        """The plugin servers running for this node (two for a moment during a reload)."""
        return [pid for pid, cmd in self._plugin_commands() if b"--dump" not in cmd]

    def holder_pids(self) -> list[int]:
        """The socket holders `query_cmd` (`--dump --hold-socket`) left for this node: one from
        `kong start` until the server claims the socket (plugin/listener.py)."""
        return [pid for pid, cmd in self._plugin_commands() if b"--hold-socket" in cmd]

    def _plugin_commands(self) -> list[tuple[int, bytes]]:
        marker = f"-p {self.prefix}".encode()
        return [(pid, cmd) for pid, cmd in _cmdlines() if b"pgwshard-plugin" in cmd and marker in cmd]

    def _own_pids(self) -> list[int]:
        """Every process of this node: the nginx master, its workers, the plugin servers and
        socket holders."""
        master = self.master_pid()
        nginx = [master, *child_pids(master)] if master is not None else []
        return [*nginx, *(pid for pid, _ in self._plugin_commands())]

    # -- its log ------------------------------------------------------------------------------
    def error_log(self) -> str:
        path = Path(self.prefix) / "logs" / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def error_lines(self, since: int = 0) -> list[str]:
        """error.log's [error] and worse lines from byte offset `since`, Kong's own noise
        (KONG_NOISE) left out."""
        lines = self.error_log()[since:].splitlines()
        return [line for line in lines if _LEVELS.search(line) and not any(p.search(line) for p in KONG_NOISE)]

    def log_offset(self) -> int:
        return len(self.error_log())


def _cmdlines() -> list[tuple[int, bytes]]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ")))
            except OSError:
                pass  # gone meanwhile
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def shipped_declarative(kong_yml: str | Path, targets: list[str], membership_url: str,
                        deletes_url: str | None = None, refresh_interval: float | None = None) -> dict:
    """A shipped kong.yml (kong/kong.yml) as a user fills it in for a DB-less node: the
    upstream's targets, the plugin's admin_url (the node's Status API, README "Kong
    topologies") and, with deletes_url, the `pgwshard-deletes` service its comment gives,
    uncommented as written."""
    import yaml

    text = Path(kong_yml).read_text()
    if deletes_url is not None:
        lines, out, in_block = text.splitlines(), [], False
        for line in lines:
            if line.startswith("#  - name: pgwshard-deletes"):
                in_block = True
            if in_block and line.startswith("#  "):
                out.append(line[1:])
            else:
                in_block = in_block and line.startswith("#  ")
                out.append(line)
        text = "\n".join(out) + "\n"
    doc = yaml.safe_load(text)
    (upstream,) = doc["upstreams"]
    upstream["targets"] = [{"target": t} for t in targets]
    for service in doc["services"]:
        if deletes_url is not None and service["name"] == "pgwshard-deletes":
            service["url"] = deletes_url
        for plugin in service.get("plugins", []):
            if plugin["name"] == "pgwshard":
                plugin["config"]["admin_url"] = membership_url
                if refresh_interval is not None:
                    plugin["config"]["refresh_interval"] = refresh_interval
    if deletes_url is not None and not any(s["name"] == "pgwshard-deletes" for s in doc["services"]):
        raise ValueError(f"{kong_yml}: no pgwshard-deletes service to uncomment")
    return doc


# -- DB mode and hybrid (harness/postgres.py gives the database) ------------------------------

def bootstrap_database(binary: str, pg_settings: dict[str, str]) -> None:
    """`kong migrations bootstrap` once on a fresh database (Kong's own schema)."""
    conf = Path(temp_dir("pgwshard-kong-migrations-")) / "kong.conf"
    conf.write_text("".join(f"{k} = {v}\n" for k, v in pg_settings.items()))
    done = subprocess.run([binary, "migrations", "bootstrap", "-c", str(conf)], capture_output=True, text=True,
                          timeout=180, env=_kong_env(), stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"kong migrations bootstrap failed: {done.stderr[-3000:]}{done.stdout[-1000:]}")


def cluster_certificate(binary: str, directory: str | None = None) -> tuple[str, str]:
    """A hybrid cluster's shared pair, as Kong's docs make it: `kong hybrid gen_cert`. Readable
    by the workers' user (they load it), in `directory` (a test's own) or a temporary one."""
    directory = directory or temp_dir("pgwshard-kong-cluster-")
    cert, key = os.path.join(directory, "cluster.crt"), os.path.join(directory, "cluster.key")
    done = subprocess.run([binary, "hybrid", "gen_cert", cert, key], capture_output=True, text=True,
                          timeout=60, env=_kong_env(), stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"kong hybrid gen_cert failed: {done.stderr[-2000:]}")
    if os.geteuid() == 0 and WORKER_USER:
        uid = pwd.getpwnam(WORKER_USER[0]).pw_uid
        for path in (cert, key):
            os.chown(path, uid, -1)
    os.chmod(directory, 0o755)
    return cert, key


def control_plane_settings(pg_settings: dict[str, str], cert: str, key: str) -> dict[str, str]:
    """kong.conf keys of a hybrid control plane on `pg_settings`' database, its cluster port
    free (read it back from settings["cluster_listen"]); no proxy: a CP proxies nothing."""
    return {**pg_settings, "role": "control_plane", "cluster_cert": cert, "cluster_cert_key": key,
            "cluster_listen": f"127.0.0.1:{free_port()}"}


def data_plane_settings(control_plane: Kong) -> dict[str, str]:
    """kong.conf keys of a DB-less data plane of `control_plane` (its cert pair and cluster port);
    its Status API (Kong's default, on) is where the plugin reads the targets."""
    cp = control_plane.settings
    return {"role": "data_plane", "database": "off", "cluster_control_plane": cp["cluster_listen"],
            "cluster_cert": cp["cluster_cert"], "cluster_cert_key": cp["cluster_cert_key"]}
