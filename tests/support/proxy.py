"""A TCP proxy whose link can be cut, or stalled, and restored, to break Shuttle⇄Weaver
connections. A stall stops bytes flowing while the connections stay open, as on a network
that drops packets instead of resetting connections: the far side learns of it only from
silence, and frames in flight are lost when it gives up on the connection."""

from __future__ import annotations

import contextlib
import socket
import threading


class Proxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._cut = False
        self._closed = False
        # set while bytes may flow: towards Weaver (upstream), towards the Shuttle (down)
        self._up = threading.Event()
        self._down = threading.Event()
        self._up.set()
        self._down.set()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Drop every connection and refuse new ones until `restore`."""
        with self._lock:
            self._cut = True
            for conn in self._open:
                _close(conn)
            self._open.clear()

    def stall(self, upstream: bool = True, downstream: bool = True) -> None:
        """Stop forwarding in the given directions until `restore`."""
        if upstream:
            self._up.clear()
        if downstream:
            self._down.clear()

    def restore(self) -> None:
        with self._lock:
            self._cut = False
        self._up.set()
        self._down.set()

    def close(self) -> None:
        self.cut()
        self._closed = True
        _close(self._listener)
        self._up.set()  # so that no pump waits for ever
        self._down.set()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._cut:
                    _close(client)
                    continue
                try:
                    server = socket.create_connection(self.upstream)
                except OSError:
                    _close(client)
                    continue
                self._open += [client, server]
            for a, b, flowing in ((client, server, self._up), (server, client, self._down)):
                threading.Thread(target=self._pump, args=(a, b, flowing), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, flowing: threading.Event) -> None:
        try:
            while data := source.recv(65536):
                flowing.wait()
                sink.sendall(data)
        except OSError:
            pass  # the other side, or cut(), closed it
        finally:
            _close(source)
            _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
