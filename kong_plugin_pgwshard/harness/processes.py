"""Real processes for the local stack, benchmarks and tests: on loopback ports chosen here,
always stopped.

Every wait is bounded in time; every process is killed on stop even if it ignores SIGTERM.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

_TEMP_PATHS: list[str] = []


def temp_dir(prefix: str) -> str:
    """A temporary directory removed when the test session's interpreter exits.

    Not removed on stop(): a test may stop and restart a process on its old data."""
    path = tempfile.mkdtemp(prefix=prefix)
    _TEMP_PATHS.append(path)
    return path


# what a test forgot to stop: ManagedProcesses, and Kong nodes (harness/kong.py)
_RUNNING: set[Any] = set()


@atexit.register
def _clean_up() -> None:
    """A safety net: whatever a test forgot to stop is stopped when the interpreter exits."""
    for process in list(_RUNNING):
        process.stop(timeout=2)
    for path in _TEMP_PATHS:
        shutil.rmtree(path, ignore_errors=True)


def free_port(ip: str = "127.0.0.1") -> int:
    """A TCP port on `ip` (a loopback address, 127.0.0.1 or ::1) that nothing listens on right now."""
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def http_request(url: str, method: str = "GET", body: bytes | None = None,
                 timeout: float = 2.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One request; returns (status, body) for any HTTP answer, raises OSError if none came."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET url: http_request's (status, body)."""
    return http_request(url, timeout=timeout)


def proc_stat(pid: int) -> list[str]:
    """/proc/<pid>/stat from its third field (state) on: the command name before it may hold
    spaces."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used, from /proc (for benchmarks)."""
    fields = proc_stat(pid)  # utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is pid (an nginx master's workers, say)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(proc_stat(int(entry.name))[1]) == pid:  # ppid is field 4
                    children.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass  # gone meanwhile
    return children


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll predicate() until it returns a truthy value or timeout seconds pass."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - a probe may fail while a process starts
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f": {last_exc}" if last_exc else ""))


class ManagedProcess:
    """A child process with its output in a log file, stopped on stop() or context exit."""

    def __init__(self, name: str, argv: list[str], env: dict | None = None, cwd: str | None = None,
                 group: str | None = None):
        """group: run in this group (a root harness giving a socket to nginx workers' group)."""
        self.name = name
        self.group = group
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(temp_dir(f"pgwshard-{name}-")) / "output.log"

    def start(self) -> ManagedProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env, cwd=self.cwd, start_new_session=True, group=self.group,
        )
        log.close()
        _RUNNING.add(self)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 5.0, sig: int = signal.SIGTERM) -> None:
        _RUNNING.discard(self)
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        self.proc = None

    def kill(self) -> None:
        """Die abruptly, as a crashed instance would."""
        self.stop(sig=signal.SIGKILL)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


PERSISTENCE_INTERVAL = "5s"  # the loss window README "Persistence" states for the shipped stacks


class Pushgateway(ManagedProcess):
    """Debian's prometheus-pushgateway on a free loopback port with its own persistence file."""

    BINARY = "prometheus-pushgateway"

    def __init__(self, port: int | None = None, extra_args: list[str] | None = None,
                 data_dir: str | None = None, ip: str = "127.0.0.1"):
        """data_dir: reuse another instance's persistence (restart with other flags);
        ip: the loopback address to listen on ("::1" for IPv6)."""
        self.ip = ip
        self.port = port or free_port(ip)
        self.data_dir = data_dir or temp_dir("pgwshard-pgw-")
        binary = shutil.which(self.BINARY) or "/usr/bin/prometheus-pushgateway"
        super().__init__(f"pushgateway-{self.port}", [
            binary,
            f"--web.listen-address={self.address}",
            f"--persistence.file={self.data_dir}/pushgateway.data",
            # A killed instance loses what it acknowledged since its last write: README "Persistence"
            f"--persistence.interval={PERSISTENCE_INTERVAL}",
            "--log.level=warn",
            *(extra_args or []),
        ])

    @property
    def address(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> Pushgateway:
        super().start()
        wait_until(lambda: http_get(self.url + "/-/ready")[0] == 200, 15, what=f"{self.name} ready")
        return self

    def groups(self) -> list[dict]:
        """The groups this instance holds, as /api/v1/metrics lists them."""
        import json
        status, body = http_get(self.url + "/api/v1/metrics")
        assert status == 200, body
        return json.loads(body)["data"]

    def stop(self, timeout: float = 5.0, sig: int = signal.SIGTERM) -> None:
        super().stop(timeout, sig)


def consul_binary() -> str | None:
    """The consul binary built by .ci/build-consul.sh (cached), or $PGWSHARD_CONSUL, or None."""
    explicit = os.environ.get("PGWSHARD_CONSUL")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which("consul")
    if found:
        return found
    xdg_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cache = Path(os.environ.get("PGWSHARD_CACHE") or xdg_cache / "pgwshard")
    candidates = sorted(cache.glob("consul-*/consul"))
    return str(candidates[-1]) if candidates else None


class Consul(ManagedProcess):
    """A real `consul agent -dev` bound to loopback on free ports (no DNS, no gRPC)."""

    def __init__(self, http_port: int | None = None):
        binary = consul_binary()
        if binary is None:
            raise RuntimeError("no consul binary: run .ci/build-consul.sh")
        self.http_port = http_port or free_port()
        self.data_dir = temp_dir("pgwshard-consul-")
        super().__init__(f"consul-{self.http_port}", [
            binary, "agent", "-dev", "-log-level=warn",
            "-bind=127.0.0.1", "-client=127.0.0.1", "-advertise=127.0.0.1",
            f"-http-port={self.http_port}", "-dns-port=-1", "-grpc-port=-1", "-grpc-tls-port=-1",
            f"-serf-lan-port={free_port()}", f"-serf-wan-port={free_port()}",
            f"-server-port={free_port()}", "-node=pgwshard-test",
        ])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Consul:
        super().start()
        wait_until(lambda: http_get(self.url + "/v1/status/leader")[1].strip() not in (b"", b'""'),
                   30, what="consul leader")
        return self


class PluginServer(ManagedProcess):
    """The real `pgwshard-plugin`, listening on <prefix>/pgwshard.sock, following this process as
    Kong's plugin servers follow Kong.

    nginx workers run as an unprivileged user when the harness runs as root (the host never
    renders `user root`): they must pass the prefix and may connect to the socket (loopback
    tests only; a real install gives the socket to a group, see systemd/).
    """

    SOCKET_MODE = 0o666

    def __init__(self, extra_args: list[str] | None = None, prefix: str | None = None):
        """prefix: another server's directory (a restart on the same socket, as Kong respawns it)."""
        import sys
        self.prefix = prefix or temp_dir("pgwshard-prefix-")
        os.chmod(self.prefix, 0o711)
        super().__init__("plugin-server", [
            sys.executable, "-m", "kong_plugin_pgwshard.plugin.start", "-p", self.prefix,
            "--socket-mode", f"{self.SOCKET_MODE:o}", *(extra_args or []),
        ])

    @property
    def socket_path(self) -> str:
        return os.path.join(self.prefix, "pgwshard.sock")

    def start(self) -> PluginServer:
        super().start()

        def accepting() -> bool:
            if not self.running:
                raise RuntimeError(f"plugin server exited: {self.log()[-2000:]}")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(self.socket_path)
            return True

        wait_until(accepting, 20, what="plugin server socket")
        os.chmod(self.socket_path, self.SOCKET_MODE)  # also for servers that know no --socket-mode
        return self

    def rss_kib(self) -> int:
        """Resident memory of the server process, from /proc."""
        assert self.proc is not None, "not started"
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")


class Respawner:
    """Restarts a process that dies, as Kong respawns its plugin servers: one start per second at
    most, none once the command is not found (exit 127) (kong/runloop/plugin_servers/process.lua).
    Has `start()` and `stop()` like the process it watches; stop() stops both."""

    def __init__(self, process: ManagedProcess, interval: float = 0.2):
        self.process = process
        self.interval = interval
        self.restarts = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Respawner:
        if not self.process.running:
            self.process.start()
        self._thread = threading.Thread(target=self._watch, name=f"respawn-{self.process.name}", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        last_start = time.monotonic()
        while not self._stop.wait(self.interval):
            proc = self.process.proc
            if proc is None or proc.poll() is None:
                continue  # running, or stopped on purpose
            if proc.returncode == 127:
                return  # Kong gives up too: the command is not there
            self._stop.wait(max(0.0, last_start + 1.0 - time.monotonic()))
            if self._stop.is_set():
                return
            last_start = time.monotonic()
            try:
                self.process.start()
                self.restarts += 1
            except Exception:  # noqa: BLE001 - try again at the next tick, as Kong does
                pass

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.process.stop(timeout)
