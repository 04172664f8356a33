"""Loopback TCP servers that misbehave on purpose: they answer with bytes that are not HTTP, or
accept and never answer, or play a proxy that records whatever reaches it; or relay to a real
server while counting the connections a client opens (is it pooling?)."""
from __future__ import annotations

import socket
import threading


class RawServer:
    """Accepts connections on a free loopback port; `mode` says what each gets:
    "garbage": the request is read, then non-HTTP bytes are sent and the connection closed;
    "hang": the connection is held open and never answered (until stop);
    "record": like a proxy that never answers; every byte received is kept in `received`;
    "relay": every connection is relayed to `upstream` (host:port) both ways, untouched.
    `connections` counts the connections accepted."""

    def __init__(self, mode: str, upstream: str | None = None):
        self.mode = mode
        self.upstream = upstream
        self.received = bytearray()
        self.connections = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> RawServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._held:
            conn.close()
        self._sock.close()

    def __enter__(self) -> RawServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(0.5)
        if self.mode == "relay":
            assert self.upstream is not None, "relay needs an upstream"
            host, _, port = self.upstream.rpartition(":")
            far = socket.create_connection((host, int(port)), timeout=5)
            far.settimeout(0.5)
            threading.Thread(target=self._pump, args=(far, conn), daemon=True).start()
            self._pump(conn, far)
            return
        if self.mode == "hang":
            self._held.append(conn)
            return
        data = b""
        for _ in range(100):  # bounded: a request head, or whatever arrives in 50 s at most
            if self._stop.is_set():
                break
            try:
                chunk = conn.recv(65536)
            except (TimeoutError, OSError):
                if self.mode == "garbage" and data:
                    break
                continue
            if not chunk:
                break
            data += chunk
            with self._lock:
                self.received += chunk
            if self.mode == "garbage" and b"\r\n\r\n" in data:
                break
        if self.mode == "garbage":
            try:
                conn.sendall(b"\x00\x13\x37 not http at all \xff\xfe\r\n\r\n")
            except OSError:
                pass
        conn.close()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Copy bytes until either side closes, or stop()."""
        try:
            while not self._stop.is_set():
                try:
                    chunk = source.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for side in (source, sink):
                try:
                    side.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
