"""cnnlab-ui: serve the MLflow UI of a cnnlab store on loopback; print its training runs' links.

    cnnlab-ui                          # ./mlflow.db (or tracking.uri, $MLFLOW_TRACKING_URI)
    cnnlab-ui --port 5001 tracking.uri=sqlite:////data/exp/mlflow.db
    cnnlab-ui tracking.uri=http://mlflow.team:5000   # a server: only print its links

For a SQLite store it runs `mlflow server` on 127.0.0.1 (the runs' artifacts from the
mlartifacts folder beside the database) until Ctrl-C. The links open each experiment on its
training runs: MLflow 3's UI opens experiments on its GenAI view unless told otherwise
(`workflowType=machine_learning`; a browser remembers the choice once made in the sidebar).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

from cnnlab import CnnlabError
from cnnlab.commands.cli import command
from cnnlab.config.compose import compose_config, store_uri
from cnnlab.tracking.store import TrackingError, artifacts_beside, check_reachable, sqlite_file
from cnnlab.training import interrupts


def serve(uri: str, host: str, port: int, timeout: float = 120) -> None:
    """Serve the store at `uri` until interrupted, after printing its training views' links;
    for a tracking server, only print them."""
    if uri.startswith(("http://", "https://")):
        check_reachable(uri)
        _print_views(uri, uri)
        return
    db = sqlite_file(uri)
    if db is None:
        raise CnnlabError(
            f"no MLflow store at {uri}: cnnlab-ui serves a SQLite store (tracking.uri=sqlite:///"
            "PATH) or prints a tracking server's links (tracking.uri=http://HOST:PORT)"
        )
    from cnnlab.tracking.sqlite import check_store

    # The store must be there already: serving it never creates or migrates one.
    check_store(uri, existing=True)
    url = f"http://{host}:{port}"
    _check_free(host, port)  # else another server's /health could pass for this one's
    log = db.parent / "cnnlab-ui.log"
    with log.open("ab") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
             "--artifacts-destination", str(artifacts_beside(db)), "--serve-artifacts",
             "--host", host, "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        with interrupts.handled():  # Ctrl-C, SIGTERM, SIGHUP: the server stops with us
            _wait_until_up(server, url, log, timeout)
            _print_views(uri, url)
            print(f"Serving {uri} on {url} (log: {log}); Ctrl-C stops it", flush=True)
            server.wait()
            raise CnnlabError(f"mlflow server stopped (exit status {server.returncode}); see {log}")
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def _check_free(host: str, port: int) -> None:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise CnnlabError(
                f"cannot serve on {host}:{port} ({exc.strerror}): pick another --port"
            ) from None


def _wait_until_up(server: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            lines = log.read_text(errors="replace").strip().splitlines()
            last = lines[-1] if lines else f"exit status {server.returncode}"
            taken = "address already in use" in log.read_text(errors="replace").lower()
            fix = "pick another --port" if taken else f"see {log}"
            raise CnnlabError(f"mlflow server stopped at once ({last.strip()[:300]}); {fix}")
        try:
            check_reachable(url, timeout=2)
            return
        except TrackingError:
            if time.monotonic() > deadline:
                raise CnnlabError(f"mlflow server on {url} did not answer in {timeout:g} s; "
                                  f"see {log}") from None  # fmt: skip
            time.sleep(0.5)


def _print_views(uri: str, url: str) -> None:
    from cnnlab.tracking.queries import training_views

    views = training_views(uri, url)
    if not views:
        print(f"{uri} has no experiments yet; they appear at {url} once cnnlab-train logs one")
    for name, runs, link in views:
        print(f"Experiment {name} ({runs} run{'' if runs == 1 else 's'}): {link}")


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (loopback)")
    parser.add_argument("--port", type=int, default=5000, help="port to serve on")


def _serve(args: argparse.Namespace) -> None:
    serve(store_uri(compose_config(args.overrides)), args.host, args.port)


def main() -> None:
    """Console entry point of cnnlab-ui."""
    command("cnnlab-ui", __doc__, _arguments, _serve)
