"""Real components for tests: an `mlflow server` on loopback, and a proxy in front of it that can
hang or ask for a password, as a sick or protected team server would."""

from __future__ import annotations

import base64
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent  # console scripts of the environment running the tests


def free_port() -> int:
    """A TCP port nobody listens on at the moment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 120, alive=lambda: True) -> None:
    """Return once `url`/health answers 200; fail after `timeout` s or when `alive()` is False."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            if not alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not become healthy") from None
            time.sleep(0.25)


class MlflowServer:
    """`mlflow server` with a SQLite backend and proxied artifacts in `folder`, on one port.

    Started in its own process group: the server runs uvicorn as a child, and `kill` must take
    both down at once, as a crash would. `start` again serves the same store on the same port.
    """

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env = folder, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        """Start serving and wait until healthy."""
        self.proc = subprocess.Popen(
            [BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "server-artifacts")],
            cwd=self.folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env,
            start_new_session=True,
        )  # fmt: skip
        wait_healthy(self.url, alive=lambda: self.proc.poll() is None)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the server and its workers; wait until they are gone."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while _group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _group_alive(self.proc.pid):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class Proxy:
    """A TCP proxy on loopback in front of `target_port`.

    `hang` set: requests are read and never answered (a server whose API hangs).
    `credentials` (user, password) set: HTTP requests without them (basic auth) get 401.
    `seen` collects the raw bytes of every request, to check what was sent.
    """

    def __init__(self, target_port: int, credentials: tuple[str, str] | None = None) -> None:
        self.target_port, self.credentials = target_port, credentials
        self.hang = threading.Event()
        self.seen: list[bytes] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        """Stop accepting; open connections end with the test process."""
        self._closed.set()
        self._server.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        upstream = None
        try:
            while not self._closed.is_set():
                readable, _, _ = select.select([client] + ([upstream] if upstream else []), [],
                                               [], 0.5)  # fmt: skip
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        self.seen.append(data)
                        if self.hang.is_set():
                            continue  # swallowed: the client waits for an answer forever
                        if self.credentials and self._refused(data):
                            client.sendall(
                                b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\n\r\n"
                            )
                            return
                        if upstream is None:
                            upstream = socket.create_connection(("127.0.0.1", self.target_port))
                        upstream.sendall(data)
                    else:
                        client.sendall(data)
        except OSError:
            return
        finally:
            client.close()
            if upstream is not None:
                upstream.close()

    def _refused(self, data: bytes) -> bool:
        # Only a request's first packet starts with a method; bodies pass through.
        head = data.split(b"\r\n\r\n", 1)[0]
        if head.split(b" ", 1)[0] not in (b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"HEAD"):
            return False
        user, password = self.credentials
        token = b"basic " + base64.b64encode(f"{user}:{password}".encode()).lower()
        return token not in head.lower()
