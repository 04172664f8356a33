"""A pushgateway's death seen at once: an idle TCP connection to each, which its kernel closes
when the process ends (SIGKILL, a crash, the OOM killer).

Probes and Consul checks run every interval (Consul's checks at 1 s at the least), so a death
waits for the next one while every push routed to the dead instance fails. An idle connection
needs no interval: the moment it is closed, it is reconnected once; refused, the process is
gone (nothing listens at its address), and the source is told. A connection the pushgateway
merely closed (an idle timeout) is reconnected silently. A host that vanishes closes nothing:
that case stays with the probes or the checks. Only a member this process could connect to
can be declared gone, so a pushgateway pgwshard-sync cannot reach is never judged by it.
"""
from __future__ import annotations

import concurrent.futures
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable

from ...core.ring import Member

log = logging.getLogger("pgwshard.health")

# A member that refused a connection (down, or not up yet) is tried again this often.
RECONNECT_SECONDS = 1.0
# One that could not be reached at all (a timeout, no route) this often: each round of connects
# holds the watch up to `connect_timeout`, and such a member is the probes' or Consul's case anyway.
UNREACHABLE_RETRY_SECONDS = 30.0
CONNECTORS = 16  # connections opened at once


class DeathWatch:
    """Keeps an idle connection to every member of `follow()`'s set, on one thread.

    `on_gone(member)` is called (from that thread) when a member's connection closed and a new
    one is refused; `on_back(member)` when a member that was gone accepts a connection again.
    """

    def __init__(self, on_gone: Callable[[Member], None], on_back: Callable[[Member], None] = lambda m: None,
                 connect_timeout: float = 0.5):
        self.on_gone, self.on_back = on_gone, on_back
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._wanted: frozenset[Member] = frozenset()
        self._sockets: dict[Member, socket.socket] = {}
        self._retry_at: dict[Member, float] = {}
        self._gone: set[Member] = set()  # declared gone, not connected since
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = threading.Event()
        self._connector = concurrent.futures.ThreadPoolExecutor(CONNECTORS, thread_name_prefix="pgwshard-deathwatch-connect")
        self._thread = threading.Thread(target=self._run, name="pgwshard-deathwatch", daemon=True)
        self._thread.start()

    def follow(self, members: Iterable[Member]) -> None:
        """Watch exactly these members from now on."""
        with self._lock:
            self._wanted = frozenset(members)
        self._wake()

    def gone(self) -> frozenset[Member]:
        """Followed members declared gone and not connected since."""
        with self._lock:
            return frozenset(self._gone)

    def watching(self) -> frozenset[Member]:
        """The members it holds a connection to right now."""
        with self._lock:
            return frozenset(self._sockets)

    def _hold(self, member: Member, sock: socket.socket | None) -> None:
        with self._lock:  # `watching` reads the dict from other threads
            old = self._sockets.pop(member, None)
            if sock is not None:
                self._sockets[member] = sock
        if old is not None and old is not sock:
            old.close()

    def close(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(5)
        self._connector.shutdown(wait=False)
        for sock in self._sockets.values():
            sock.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # closed: the thread is stopping anyway

    def _connect(self, member: Member) -> socket.socket | None | bool:
        """A new idle connection; False when refused; None for any other failure."""
        try:
            sock = socket.create_connection((member.host, member.port), timeout=self.connect_timeout)
        except ConnectionRefusedError:
            return False
        except OSError:
            return None
        sock.setblocking(False)
        return sock

    def _reconcile(self) -> None:
        """Drop connections to members no longer followed; open the missing ones that are due."""
        with self._lock:
            wanted = self._wanted
        for member in list(self._sockets):
            if member not in wanted:
                self._hold(member, None)
        with self._lock:
            self._gone &= wanted
        now = time.monotonic()
        due = [m for m in wanted - self._sockets.keys() if self._retry_at.get(m, 0.0) <= now]
        # in parallel: a round waits for one connect timeout, not one per unreachable member
        for member, sock in zip(due, self._connector.map(self._connect, due), strict=True):
            if isinstance(sock, socket.socket):
                self._hold(member, sock)
                self._retry_at.pop(member, None)
                if member in self._gone:
                    with self._lock:
                        self._gone.discard(member)
                    self.on_back(member)
            else:
                self._retry_at[member] = now + (RECONNECT_SECONDS if sock is False else UNREACHABLE_RETRY_SECONDS)

    def _closed(self, member: Member) -> None:
        """Its connection ended: gone if a new one is refused."""
        self._hold(member, None)
        sock = self._connect(member)
        if isinstance(sock, socket.socket):
            self._hold(member, sock)  # an idle timeout of the server's, or a quick restart
            return
        self._retry_at[member] = time.monotonic() + RECONNECT_SECONDS
        if sock is False and member not in self._gone:
            with self._lock:
                self._gone.add(member)
            log.info("pushgateway %s closed its connection and refuses a new one: gone", member.name)
            self.on_gone(member)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._reconcile()
                with selectors.DefaultSelector() as selector:  # epoll: no limit of 1024 descriptors
                    selector.register(self._wake_r, selectors.EVENT_READ)
                    for member, sock in self._sockets.items():
                        selector.register(sock, selectors.EVENT_READ, member)
                    ready = selector.select(RECONNECT_SECONDS)
                for key, _ in ready:
                    if key.data is None:
                        self._wake_r.recv(4096)
                    else:  # an idle connection readable: closed (EOF, RST), or talking out of turn
                        self._closed(key.data)
            except Exception:  # noqa: BLE001 - the watch must outlive a bug in one round
                log.exception("death watch round failed; going on")
                self._stop.wait(RECONNECT_SECONDS)
