"""The embedded SQLite store: refused in one line when it cannot be used as it is, and created from
a migrated template so a new store costs no migration."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from contextlib import closing, suppress
from pathlib import Path

import mlflow
import sqlalchemy
from mlflow.tracking import MlflowClient

from cnnlab.tracking.store import (
    TrackingError,
    artifacts_beside,
    sqlite_file,
)

_SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database


def check_store(uri: str, existing: bool = False) -> None:
    """Fail in one line, naming the file and the fix, if a SQLite store can't be used as it is.

    A missing or empty file passes (a new store), unless the store must be `existing` (commands
    that only read, which never create or migrate one). A truncated or corrupt file, another
    program's database, or a file where the store's `mlartifacts` folder belongs is refused and
    left as it is, before MLflow writes anything.
    """
    db = sqlite_file(uri)
    if db is None:
        return
    if existing and (not db.exists() or (db.is_file() and db.stat().st_size == 0)):
        raise TrackingError(
            f"no MLflow store at {db}: train a run first (cnnlab-train), or point tracking.uri "
            "at a store"
        )
    artifacts = artifacts_beside(db)
    if artifacts.exists() and not artifacts.is_dir():
        raise TrackingError(
            f"{artifacts} is a file, but the store {db} keeps its runs' artifacts in a folder "
            "of that name; move the file aside and run again"
        )
    if db.is_dir():
        raise TrackingError(f"{db} is a folder, not a SQLite file; point tracking.uri at a file")
    if _check_header(db):
        _check_tables(db)
        try:
            MlflowClient(tracking_uri=uri)  # opens (and caches) MLflow's store; checks its schema
        except (sqlalchemy.exc.SQLAlchemyError, mlflow.exceptions.MlflowException) as exc:
            reason = str(getattr(exc, "orig", None) or getattr(exc, "message", exc))
            raise TrackingError(
                f"cannot open the MLflow store {db}: {reason.splitlines()[0]}"
            ) from exc


_NEW_STORE = "move it aside (keep it to recover its runs) and run again to start a new store"


def _check_header(db: Path) -> bool:
    """Whether `db` holds a database: False for a missing or empty file (a new store); a
    TrackingError for a file that is not SQLite's or is shorter than its header says."""
    new_store = _NEW_STORE
    try:
        size = db.stat().st_size
        with db.open("rb") as f:
            header = f.read(100)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise TrackingError(f"cannot read the MLflow store {db} ({exc.strerror})") from exc
    if size == 0:
        return False
    if header[:16] != _SQLITE_MAGIC:
        raise TrackingError(f"{db} is not a SQLite database, so not an MLflow store; {new_store}")
    # The header's page size x page count is the file's length, unless a WAL file holds pages
    # (byte 18 = 2) or an old SQLite left the count unset (offsets 24 and 92 then differ).
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    if header[18] != 2 and header[24:28] == header[92:96] and size < page_size * pages:
        raise TrackingError(
            f"the MLflow store {db} is truncated ({size} of {page_size * pages} bytes: a full "
            f"disk or an interrupted copy?); {new_store}"
        )
    return True


def _check_tables(db: Path) -> None:
    """A TrackingError for a corrupt database or another program's (no MLflow tables)."""
    try:
        with closing(sqlite3.connect(db, timeout=20)) as connection:
            tables = {
                row[0]
                for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
            raise TrackingError(f"the MLflow store {db} is corrupt ({exc}); {_NEW_STORE}") from exc
        raise TrackingError(f"cannot read the MLflow store {db} ({exc})") from exc
    other = sorted(t for t in tables if not t.startswith(("sqlite_", "alembic_")))
    if other and not {"experiments", "runs"} & set(other):
        raise TrackingError(
            f"{db} is another program's SQLite database (tables {', '.join(other[:5])}; none of "
            "MLflow's), which MLflow would alter; set tracking.uri to another file"
        )


def seed_sqlite_store(uri: str) -> None:
    """Start a new SQLite store as a copy of an empty, already migrated one: whole or not at all.

    Creating a store runs MLflow's schema migrations (seconds); the migrated empty store is made
    once per MLflow version in ~/.cache/cnnlab and copied from then on. Either is written to a
    temporary file and renamed, so a full disk leaves no half-written store to fail every later run.
    """
    target = sqlite_file(uri)
    if target is None:
        return
    if target.exists():
        return
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cnnlab"
    template = cache / f"mlflow-{mlflow.__version__}-empty.db"
    failures = (OSError, sqlalchemy.exc.SQLAlchemyError, mlflow.exceptions.MlflowException)
    if not template.exists():
        staging = cache / f".{template.name}.{os.getpid()}"
        try:
            cache.mkdir(parents=True, exist_ok=True)
            MlflowClient(f"sqlite:///{staging}").search_experiments()  # runs the migrations
            staging.replace(template)  # atomic: a concurrent job sees all of it or nothing
        except failures:
            pass  # no cache: the new store is migrated in place of the copy below, only slower
        finally:
            with suppress(OSError):
                staging.unlink(missing_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if template.exists():
            shutil.copyfile(template, staging)
        else:
            MlflowClient(f"sqlite:///{staging}").search_experiments()
        try:
            os.link(staging, target)  # unlike a rename, keeps a store another job made meanwhile
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links
            if not target.exists():
                staging.replace(target)
    except failures as exc:
        reason = getattr(exc, "strerror", None) or str(getattr(exc, "orig", None) or exc)
        denied = getattr(exc, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS)
        fix = (
            f"make {target.parent} writable (or set tracking.uri to a store elsewhere)"
            if denied or "readonly" in reason
            else "free some space on its disk (or set tracking.uri to a store on another disk)"
        )
        raise TrackingError(
            f"cannot create the MLflow store {target} ({reason.splitlines()[0]}); nothing was "
            f"left behind: {fix} and run again"
        ) from exc
    finally:
        with suppress(OSError):
            staging.unlink(missing_ok=True)  # gone from here already once linked
