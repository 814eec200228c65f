"""Real servers on loopback, for cnnlab-bench and cnnlab's own tests: an `mlflow server` that
keeps its store, artifacts and log in one folder and is stopped through its process group
(never by name), and a TCP proxy in front of a port that can delay every request, hang, or ask
for a password, as a slow, sick or protected team server would."""

from __future__ import annotations

import base64
import logging
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

from cnnlab import CnnlabError
from cnnlab.bench.procs import free_port, stop_group, wait_until

logger = logging.getLogger(__name__)

# The first bytes of a chunk that starts an HTTP request (a body's later chunks have none).
_METHODS = (b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"HEAD")
_UNAUTHORIZED = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class ServerError(CnnlabError):
    """A server that did not come up."""


def wait_healthy(
    url: str,
    timeout: float = 120,
    alive: Callable[[], bool] = lambda: True,
    log: Path | None = None,
) -> None:
    """Return once `url`/health answers 200; ServerError (with `log`'s tail) after `timeout` s
    or once `alive()` is False."""
    wait_until(
        lambda: _healthy(url), f"{url} did not become healthy", timeout, alive, log,
        error=ServerError, interval=0.25,
    )  # fmt: skip


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2):
            return True
    except OSError:
        return False


class MlflowServer:
    """`mlflow server` on one port, with proxied artifacts in `folder` and its runs in
    `backend_store_uri` (default: a SQLite file in `folder`; a team's is PostgreSQL).

    Started in its own process group: the server runs uvicorn and a job runner as children, and
    `kill` must take them all down at once, as a crash would. `start` again serves the same store
    on the same port. The server's output goes to `folder`/server.log. As a context manager:
    started on entry, stopped with SIGTERM on exit.
    """

    def __init__(
        self,
        folder: Path,
        env: Mapping[str, str] | None = None,
        backend_store_uri: str | None = None,
    ) -> None:
        self.folder, self.env = folder, env
        self.backend_store_uri = backend_store_uri or f"sqlite:///{folder / 'server.db'}"
        self.artifacts = folder / "server-artifacts"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> MlflowServer:
        """Start serving and wait until healthy (a new database is migrated first: seconds)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        log = self.folder / "server.log"
        with log.open("ab") as out:
            self.proc = proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server",
                 "--backend-store-uri", self.backend_store_uri,
                 "--artifacts-destination", str(self.artifacts), "--serve-artifacts",
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                cwd=self.folder, stdout=out, stderr=subprocess.STDOUT,
                env=dict(self.env) if self.env is not None else None, start_new_session=True,
            )  # fmt: skip
        logger.debug("mlflow server (PID %d) starting on %s", proc.pid, self.url)
        try:
            wait_healthy(self.url, timeout, alive=lambda: proc.poll() is None, log=log)
        except ServerError:
            self.kill()
            raise
        return self

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 90) -> None:
        """Send `sig` to the server and its workers; wait until they are gone (SIGKILL to what
        is left after `timeout` s)."""
        if self.proc is None:
            return
        stop_group(self.proc, sig, timeout, kill_timeout=10)
        self.proc = None

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill(signal.SIGTERM)


class Proxy:
    """A TCP proxy on loopback in front of `target_port`.

    `delay` > 0: each request waits that many seconds before it is passed on (a slow server).
    `hang` set: requests are read and never answered (a server whose API hangs).
    `credentials` (user, password) set: HTTP requests without them (basic auth) get 401.
    `seen` collects the raw bytes of every request, to check what was sent (unless
    `keep_requests` is False: a long run's uploads are not kept in memory).
    As a context manager: closed on exit.
    """

    def __init__(
        self,
        target_port: int,
        credentials: tuple[str, str] | None = None,
        delay: float = 0.0,
        keep_requests: bool = True,
    ) -> None:
        self.target_port, self.credentials = target_port, credentials
        self.delay, self.keep_requests = delay, keep_requests
        self.hang = threading.Event()
        self.seen: list[bytes] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        """Stop accepting; open connections end within half a second."""
        self._closed.set()
        self._server.close()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        # Both ways, until either side closes; upstream is connected at the first request.
        upstream: socket.socket | None = None
        try:
            while not self._closed.is_set():
                waiting = [client] if upstream is None else [client, upstream]
                for sock in select.select(waiting, [], [], 0.5)[0]:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is upstream:
                        client.sendall(data)
                        continue
                    if self.keep_requests:
                        self.seen.append(data)
                    if self.hang.is_set():
                        continue  # swallowed: the client waits for an answer forever
                    if self.credentials and self._refused(data):
                        client.sendall(_UNAUTHORIZED)
                        return
                    if self.delay and data.split(b" ", 1)[0] in _METHODS:
                        time.sleep(self.delay)
                    if upstream is None:
                        upstream = socket.create_connection(("127.0.0.1", self.target_port))
                    upstream.sendall(data)
        except OSError:
            return  # the server is not up, or went away: the client sees the connection close
        finally:
            client.close()
            if upstream is not None:
                upstream.close()

    def _refused(self, data: bytes) -> bool:
        # Only a request's first packet starts with a method; bodies pass through.
        head = data.split(b"\r\n\r\n", 1)[0]
        if head.split(b" ", 1)[0] not in _METHODS:
            return False
        user, password = self.credentials
        token = b"basic " + base64.b64encode(f"{user}:{password}".encode()).lower()
        return token not in head.lower()
