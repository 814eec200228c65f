"""Where a run's tracking store is: its absolute URI, the credentials taken out of it, whether
a server answers. No MLflow here: every command resolves and checks its store before it pays
for importing MLflow (cnnlab.tracking does the rest).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from contextlib import suppress
from pathlib import Path

from cnnlab import CnnlabError, needs_cluster_extra, one_line
from cnnlab.config.compose import resolve_uri

log = logging.getLogger(__name__)


class TrackingError(CnnlabError):
    """The tracking store cannot be reached or used."""


_SQLITE = "sqlite:///"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a SQLite store's URI; None for any other store."""
    return Path(uri[len(_SQLITE) :]) if uri.startswith(_SQLITE) else None


def artifacts_beside(db: Path) -> Path:
    """Where a SQLite store keeps its runs' artifacts: beside the file, one movable folder."""
    return db.parent / "mlartifacts"


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(uri without user:password@, user, password) of an http(s) tracking URI."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri, None, None
    host = parts.netloc.rpartition("@")[2]
    clean = urllib.parse.urlunsplit(parts._replace(netloc=host))
    user = urllib.parse.unquote(parts.username or "")
    return clean, user, urllib.parse.unquote(parts.password or "")


def move_credentials_to_env(uri: str) -> str:
    """Take user:password out of `uri` into MLFLOW_TRACKING_USERNAME/PASSWORD; the clean URI.

    MLflow sends those variables as HTTP basic auth. A password left in the URI would end up in
    params, the logged config, Hydra's output folder and error messages.
    """
    clean, user, password = split_credentials(uri)
    if user is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password or ""
    return clean


def set_request_timeout(seconds: int) -> None:
    """Bound every HTTP request to a tracking server (MLflow's default waits 120 s x 7 retries)."""
    # One retry: the Journal retries on its own, off the training thread, without a limit.
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(seconds)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail within `timeout` seconds if an HTTP tracking server does not answer its health
    check, or at once if a PostgreSQL store's driver is not installed."""
    if uri.startswith("postgresql") and importlib.util.find_spec("psycopg") is None:
        # SQLAlchemy 2 maps postgresql:// to psycopg 3, which only the cluster extra installs.
        scheme = uri.partition(":")[0]
        raise TrackingError(needs_cluster_extra(f"tracking.uri={scheme}://...", "psycopg"))
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(_server_request(uri, "/health"), timeout=timeout) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise TrackingError(
        f"tracking server {uri} is unreachable ({reason}); start it with "
        "`mlflow server --host 127.0.0.1 --port 5000` or set tracking.uri=null for the local store"
    )


def _server_request(uri: str, path: str) -> urllib.request.Request:
    """A GET of `path` on the server at `uri`, with the user's credentials as MLflow sends them."""
    request = urllib.request.Request(f"{uri.rstrip('/')}{path}")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user:
        token = f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(token).decode())
    return request


# MLflow's client retries a 5xx answer, then reports only this, without the server's words.
_SERVER_FAILS = re.compile(r"too many (5\d\d) error responses")


def store_failure(uri: str, exc: BaseException) -> str:
    """Why the store refused a write, in one line.

    A server that answers 5xx is up but fails behind itself: typically its database (a team
    server's PostgreSQL) or its artifact storage is down. That is said, with the server's reason.
    """
    status = _SERVER_FAILS.search(str(exc))
    if status is None or not uri.startswith(("http://", "https://")):
        return one_line(exc)
    reason = ""
    try:  # any request that needs the database; only the body of a failure is read
        urllib.request.urlopen(
            _server_request(uri, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=_"),
            timeout=5,
        ).close()
    except urllib.error.HTTPError as answer:
        with suppress(ValueError, AttributeError, OSError):
            body = json.loads(answer.read(65536))
            reason = f": {str(body['message']).strip().splitlines()[0][:300]}"
    except OSError:
        pass
    return (
        f"the server answers HTTP {status[1]}{reason}; it runs, but its database or artifact "
        "storage fails: see the server's log"
    )


def say_where_it_went(
    run_id: str, status: str, uri: str, launch_dir: Path, what: str = "Run"
) -> None:
    """The lines that end a tracked run (or a sweep's parent): where it is, and the commands
    that open, reproduce or continue it, from `launch_dir` (with tracking.uri=... where the
    store is not that folder's mlflow.db, which every command opens by default)."""
    where = "" if uri == resolve_uri(None, launch_dir) else f" tracking.uri={uri}"
    log.info("%s %s %s in %s", what, run_id, status, uri)
    if status == "KILLED" and what == "Run":  # interrupted or pruned: resumable
        log.info("  continue it:  cnnlab-train train.resume=%s%s", run_id, where)
        return
    log.info("  browse it:    cnnlab-ui%s", where)
    if what == "Run":
        log.info("  reproduce it: cnnlab-reproduce %s%s", run_id, where)
