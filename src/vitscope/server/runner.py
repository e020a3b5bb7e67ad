"""Running the app with uvicorn: in the foreground (``vitscope serve``) or on a background thread
(:func:`vitscope.show`, tests).

The listening socket is bound here, before uvicorn starts, so that ``port=0`` (any free port) works
and the printed URL is always the real one, and so that a busy port fails with a clear message.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
import urllib.request
from typing import Any, Optional

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


class ServeError(RuntimeError):
    """The server could not start (port busy, bad host, ...); the message says what to do."""


def bind(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0``: any free port)."""
    if not 0 <= int(port) <= 65535:
        raise ServeError(f"port {port} is out of range; give 0..65535 (0 = any free port)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ServeError(f"cannot listen on host {host!r} ({e}); use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from e
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ServeError(f"port {port} on {host} is already in use; pass --port N for another port (or --port 0 for any free one)") from e
        raise ServeError(f"cannot listen on {host}:{port} ({e})") from e
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def _config(app: Any) -> Any:
    import uvicorn

    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=2)


def serve_forever(app: Any, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` until Ctrl-C."""
    import uvicorn

    uvicorn.Server(_config(app)).run(sockets=[sock])


class BackgroundServer:
    """``app`` served by uvicorn on a daemon thread; :meth:`stop` ends it."""

    def __init__(self, app: Any, host: str = DEFAULT_HOST, port: int = 0) -> None:
        import uvicorn

        self.app = app
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.server = uvicorn.Server(_config(app))
        self.thread = threading.Thread(target=self._run, name=f"vitscope-server-{self.url}", daemon=True)
        self.error: Optional[BaseException] = None

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self.error = e

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        """Start serving and wait until ``/api/run`` answers."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.error is not None or not self.thread.is_alive():
                raise ServeError(f"the server on {self.url} stopped while starting ({self.error!r})")
            if self.server.started:
                try:
                    with urllib.request.urlopen(self.url + "api/run", timeout=5) as r:
                        if r.status == 200:
                            return self
                except OSError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise ServeError(f"the server on {self.url} did not answer within {timeout:.0f} s")

    @property
    def running(self) -> bool:
        return self.thread.is_alive() and not self.server.should_exit

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        try:
            self.sock.close()
        except OSError:
            pass
