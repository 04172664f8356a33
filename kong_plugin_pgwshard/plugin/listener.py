"""The plugin server's listening socket: there before Kong's workers proxy, replaced without a
refused connection, handed from holder to server with its queue. Standard library only: it
runs before the slow imports (start.py).

Kong 3.9.3 starts the plugin server from a timer of worker 0 while every worker already
proxies (kong/runloop/plugin_servers/process.lua); a request whose worker calls StartInstance
before the socket exists gets 500 (plugin.lua: "starting instance: no such file or directory";
no retry). Python's own start-up loses that race. But Kong's master runs the query command
(`pluginserver_<name>_query_cmd`, io.popen) before it forks any worker, on `kong start` and on
every `kong reload`. So the query command, given `--hold-socket`, binds the socket there and
leaves a *holder*: a small forked process that keeps the socket listening (connections queue,
none is refused) until the server Kong spawns claims it. The server connects to the holder's
claim socket (`<socket>.claim`, mode 0600), receives the listening socket itself (SCM_RIGHTS)
and accepts what queued meanwhile. A holder nobody claims (`kong check` runs no query; a
control plane, an externally managed server that never comes) removes the socket and exits
after HOLD_SECONDS, or as soon as another server takes the path over.

The master runs as root where the workers (and the server they spawn) do not: the holder
gives both sockets to the owner of the socket's directory (Kong's prefix, which must be the
workers' user's for the server to bind there anyway) and then runs as that user itself; the
claim socket accepts only that user (or root), checked again from the peer's credentials.

On `kong reload` the old server still serves the path when the query runs, and the reload's own
work (reading the declarative config) can take seconds: the query then holds nothing (Kong
runs: `<prefix>/pids/nginx.pid` names a live process that started before the file was written),
the old server serves on, and the new server, once started, replaces the path in one step
(bind_unix) while the old one drains. A CLI command that loads plugin schemas (`kong
migrations`, `kong config db_import`) next to a running node holds nothing either. On `kong
start` and `kong restart` no Kong runs there (nginx removes its pid file as it exits): the
holder takes the path over, from a server of the stopped node that may still be draining too.
An externally managed server (no start_cmd) wants no `--hold-socket`.
"""
from __future__ import annotations

import os
import select
import socket
import struct
import time

CLAIM_SUFFIX = ".claim"
HOLD_SECONDS = 60.0  # Kong spawns the server within a second of its workers; a loaded host is slower
CLAIM_TIMEOUT = 2.0


def bind_unix(path: str, queue_size: int = 4096, mode: int | None = None,
              owner: tuple[int, int] | None = None) -> socket.socket:
    """A listening unix socket at path, replacing whatever is there in one step: bound under a
    temporary name beside it, listening, then renamed over path. A client never meets a missing
    file (a remove-then-bind window) nor a closed socket: until the rename it reaches the
    previous server, which notices the takeover and drains (rpc.RPCServer)."""
    temporary = f"{path}.{os.getpid()}.new"
    if os.path.lexists(temporary):
        os.remove(temporary)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(temporary)
        if mode is not None:
            os.chmod(temporary, mode)
        if owner is not None:
            os.chown(temporary, *owner)
        listener.listen(queue_size)
        os.rename(temporary, path)
    except BaseException:
        listener.close()
        if os.path.lexists(temporary):
            os.remove(temporary)
        raise
    return listener


def claim(path: str) -> socket.socket | None:
    """The listening socket a holder keeps for path, handed over; None when there is no holder
    (or it went away meanwhile: then bind_unix)."""
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    channel.settimeout(CLAIM_TIMEOUT)
    try:
        channel.connect(path + CLAIM_SUFFIX)
        _, fds, _, _ = socket.recv_fds(channel, 1, 1)
    except OSError:
        return None
    finally:
        channel.close()
    if not fds:
        return None
    listener = socket.socket(fileno=fds[0])
    for extra in fds[1:]:
        os.close(extra)
    if (listener.family != socket.AF_UNIX or listener.type != socket.SOCK_STREAM
            or not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
        listener.close()
        return None
    return listener


def hold(path: str, queue_size: int = 4096, mode: int | None = None, seconds: float = HOLD_SECONDS,
         kong_pid_file: str | None = None) -> int | None:
    """Unless the Kong of kong_pid_file runs (a reload), bind path (over whatever is there) and
    fork a holder that keeps it until a server claims it; returns the holder's pid (None: nothing
    held). The caller goes on (prints the plugin info Kong asked for) and exits; the holder is
    detached from it and from Kong's output pipe."""
    if kong_pid_file is not None and _running(kong_pid_file):
        return None
    owner = _owner_of(os.path.dirname(path) or ".")
    listener = bind_unix(path, queue_size, mode, owner)
    claims = _bind_claim_socket(path + CLAIM_SUFFIX, owner)
    pid = os.fork()
    if pid:
        listener.close()
        claims.close()
        return pid
    try:  # the holder: never returns into the caller's code
        _detach(keep=(listener.fileno(), claims.fileno()))
        if owner is not None:
            os.setgroups([])
            os.setgid(owner[1])
            os.setuid(owner[0])
        _serve_claims(path, listener, claims, seconds)
    finally:
        os._exit(0)


def _running(pid_file: str) -> bool:
    """The process a pid file names runs, and wrote the file: a stale file naming a pid taken
    again since (a container's nginx is pid 1 on every start) does not count."""
    try:
        with open(pid_file) as f:
            pid = int(f.read().strip())
        written = os.stat(pid_file).st_mtime
    except (OSError, ValueError):
        return False
    started = _start_time(pid)
    return started is not None and written >= started - 1.0


def _start_time(pid: int) -> float | None:
    """When a process started (epoch seconds), from /proc; None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _owner_of(directory: str) -> tuple[int, int] | None:
    """(uid, gid) to give the sockets: the directory's owner, when running as root (Kong's
    master); None otherwise (the sockets are already this user's)."""
    if os.geteuid() != 0:
        return None
    st = os.stat(directory)
    return st.st_uid, st.st_gid


def _bind_claim_socket(path: str, owner: tuple[int, int] | None) -> socket.socket:
    if os.path.lexists(path):
        os.remove(path)
    claims = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # 0600 from the start: no window where another user may connect
    try:
        claims.bind(path)
    finally:
        os.umask(old_umask)
    if owner is not None:
        os.chown(path, *owner)
    claims.listen(8)
    return claims


def _detach(keep: tuple[int, ...]) -> None:
    """A session of its own, stdio on /dev/null (Kong reads the query's output until EOF), and
    no other inherited descriptor: the master's listening sockets must not outlive Kong here."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the directory listing's own descriptor, closed already


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _serve_claims(path: str, listener: socket.socket, claims: socket.socket, seconds: float) -> None:
    """Keep listener (its queue untouched) until a server of the same user, or root, claims it;
    give up when `seconds` pass or another server took the path over."""
    ours, claim_path = _inode(path), path + CLAIM_SUFFIX
    claim_inode = _inode(claim_path)
    deadline = time.monotonic() + seconds
    me = os.geteuid()
    try:
        while time.monotonic() < deadline and _inode(path) == ours:
            readable, _, _ = select.select([claims], [], [], 0.2)
            if not readable:
                continue
            conn, _ = claims.accept()
            with conn:
                _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                struct.calcsize("3i")))
                if uid not in (me, 0):
                    continue
                conn.settimeout(CLAIM_TIMEOUT)
                try:
                    socket.send_fds(conn, [b"1"], [listener.fileno()])
                except OSError:
                    continue  # the claimer went away: keep holding for the next one
                ours = None  # the server has it: the path is its now, not to be removed
                return
        # unclaimed: leave no socket that accepts and never answers
    finally:
        if ours is not None and _inode(path) == ours:
            os.remove(path)
        if _inode(claim_path) == claim_inode and claim_inode is not None:
            os.remove(claim_path)
        listener.close()
        claims.close()
