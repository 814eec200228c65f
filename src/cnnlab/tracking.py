"""Everything that talks to MLflow. The rest of cnnlab sees a `Tracker` for one run.

Runs are written through an `MlflowClient` bound to one explicit URI rather than mlflow's
process-global active run, so a test can point a run at a temporary SQLite store and nothing
carries over from one run to the next. A run's writes go through a local journal delivered by a
background thread, so a slow or lost tracking server never stalls training and loses nothing.
"""

from __future__ import annotations

import copy
import errno
import itertools
import json
import logging
import os
import re
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import sqlalchemy
import torch
import yaml
from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    LoggedModelStatus,
    Metric,
    Param,
    RunTag,
)
from mlflow.models import Model, infer_signature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.tracking import MlflowClient

from cnnlab import CnnlabError, TrialPruned, exported, interrupts, one_line
from cnnlab.store import (
    TrackingError,
    artifacts_beside,
    check_reachable,
    sqlite_file,
    store_failure,
)

# MLflow draws a progress bar for every artifact download; cnnlab's output stays readable.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# A retried request is the Journal's business; it says once that the store fails, not per try.
logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
# Its collectors say at INFO, once per run, that there is no GPU to sample.
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


# ------------------------------------------------------------------------------------- journal
class Journal:
    """A run's writes, kept in order in `folder` and delivered to the store by a thread.

    Training never waits on the store: a write is one line appended to `journal.jsonl` (files
    are copied beside it first, since the caller may overwrite them), and a background thread
    delivers the lines in order, retrying while the store is unreachable. `delivered` counts the
    lines that reached the store, so `cnnlab-sync` can deliver the rest after the process is gone.
    """

    def __init__(self, folder: Path, client: MlflowClient, uri: str, run_id: str) -> None:
        self.folder, self.client, self.uri, self.run_id = folder, client, uri, run_id
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {"uri": uri, "run_id": run_id}  # never a password: see split_credentials
        (folder / "meta.json").write_text(json.dumps(meta))
        self._lines = (folder / "journal.jsonl").open("a", encoding="utf-8")
        self._written = self._delivered = _read_delivered(folder)
        self._changed = threading.Condition()
        self._stopping = False
        self.error: str | None = None  # why the store last refused, while it does
        self._thread = threading.Thread(target=self._deliver_forever, daemon=True)
        self._thread.start()

    # ---- the caller's side: append, then wait at the end
    def append(self, op: dict[str, Any]) -> None:
        """Queue one write; returns at once."""
        with self._changed:
            try:
                self._lines.write(json.dumps(op) + "\n")
                self._lines.flush()
            except OSError as exc:  # a full disk
                raise TrackingError(
                    f"cannot write {self.folder / 'journal.jsonl'} ({exc.strerror}); free disk "
                    f"space, then continue with train.resume={self.run_id}"
                ) from exc
            self._written += 1
            self._changed.notify_all()

    def stage(self, name: str) -> Path:
        """A new empty folder in the journal for the files of the next write."""
        folder = self.folder / "files" / f"{self._written:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name if name else folder

    def pending(self) -> int:
        """How many writes have not reached the store yet."""
        with self._changed:
            return self._written - self._delivered

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every write to arrive; whether they all did."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._delivered < self._written:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 1.0))
        return True

    def close(self, timeout: float) -> bool:
        """Flush, stop the thread; remove the journal if everything arrived. Whether it did."""
        done = self.flush(timeout)
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._lines.close()
        if done:
            self._thread.join(timeout=5)
            shutil.rmtree(self.folder, ignore_errors=True)
            with suppress(OSError):
                self.folder.parent.rmdir()  # the pending folder itself, once empty
        return done

    # ---- the thread's side
    def _deliver_forever(self) -> None:
        reader = (self.folder / "journal.jsonl").open(encoding="utf-8")
        for _ in range(self._delivered):
            reader.readline()
        backoff = 0.5
        while True:
            with self._changed:
                while self._delivered >= self._written and not self._stopping:
                    self._changed.wait()
                if self._stopping:
                    return
                available = self._written - self._delivered
            ops = [json.loads(reader.readline()) for _ in range(available)]
            while ops:
                try:
                    done = deliver(self.client, self.folder, self.run_id, ops)
                except Exception as exc:  # noqa: BLE001 - any failure: keep the write, retry
                    first = self.error is None
                    self.error = store_failure(self.uri, exc)
                    if first:
                        print(
                            f"warning: tracking store {self.uri} failed ({self.error}); "
                            "training goes on, logs wait in " + str(self.folder),
                            file=sys.stderr,
                        )
                    with self._changed:
                        if self._changed.wait_for(lambda: self._stopping, timeout=backoff):
                            return
                    backoff = min(backoff * 2, 8.0)
                    continue
                if self.error is not None:
                    print(f"tracking store {self.uri} answers again", file=sys.stderr)
                self.error, backoff = None, 0.5
                ops = ops[done:]
                with self._changed:
                    self._delivered += done
                    _write_delivered(self.folder, self._delivered)
                    self._changed.notify_all()


def _read_delivered(folder: Path) -> int:
    try:
        return int((folder / "delivered").read_text())
    except (OSError, ValueError):
        return 0


def _write_delivered(folder: Path, count: int) -> None:
    partial = folder / "delivered.part"
    partial.write_text(str(count))
    partial.replace(folder / "delivered")  # never a half-written count


class JournalError(CnnlabError):
    """A journal line cnnlab did not write (edited, or not a journal at all): refused."""


# What a journal's file op names: a file or folder Journal.stage made, files/<write>/<name>.
_STAGED = re.compile(r"files/\d{6,}/(?!\.\.?$)[^/\\\x00]+")  # 6 digits, more past 999999


def staged_source(folder: Path, src: Any) -> Path:
    """The staged file or folder a journal op names, inside `folder` and reached through no
    symbolic link, or JournalError.

    A journal is data on disk that anyone who can write the launch folder can edit: a path it
    names is uploaded to the store and then deleted, so it may only ever be one it staged.
    """
    path = folder / str(src)
    if not isinstance(src, str) or not _STAGED.fullmatch(src):
        raise JournalError(f"names {src!r}, not a file the journal staged (files/<number>/name)")
    links = [p for p in (folder / "files", path.parent, path) if p.is_symlink()]
    if path.is_dir():  # a logged folder or model: nothing in it may lead out either
        links += [p for p in path.rglob("*") if p.is_symlink()]
    if links:
        raise JournalError(f"names {src}, which is or holds a symbolic link ({links[0]})")
    if not path.resolve().is_relative_to(folder.resolve()):
        raise JournalError(f"names {src}, which resolves outside its folder")
    return path


def deliver(client: MlflowClient, folder: Path, run_id: str, ops: list[dict[str, Any]]) -> int:
    """Send the first of `ops` (several consecutive metrics/params/tags as one request) to the
    store; return how many were sent. Raises if the store refuses."""
    op = ops[0]
    if op["op"] == "batch":
        group = list(itertools.takewhile(lambda o: o["op"] == "batch", ops))[:100]
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, ts, step) for o in group for k, v, ts, step in o["metrics"]],
            params=[Param(k, v) for o in group for k, v in o["params"].items()],
            tags=[RunTag(k, v) for o in group for k, v in o["tags"].items()],
        )
        for o in group:
            if o.get("status") is not None:  # only the last op of a run carries it
                client.set_terminated(run_id, o["status"])
        return len(group)
    if op["op"] == "inputs":
        client.log_inputs(run_id, datasets=[
            DatasetInput(Dataset(**d["dataset"]), [InputTag("mlflow.data.context", d["context"])])
            for d in op["datasets"]
        ])  # fmt: skip
        return 1
    if op["op"] == "register":
        register_model(client, op.get("run_id", run_id), op["name"], op["alias"])
        return 1
    source = staged_source(folder, op.get("src"))
    if op["op"] == "file":
        client.log_artifact(run_id, str(source), op["dir"])
    elif op["op"] == "dir":
        client.log_artifacts(run_id, str(source), op["dir"])
    elif op["op"] == "model":
        _deliver_model(client, source, run_id, op["experiment_id"])
    for path in (source, source.parent):  # delivered files make room, the journal stays small
        shutil.rmtree(path, ignore_errors=True)
    return 1


def _deliver_model(client: MlflowClient, model_dir: Path, run_id: str, experiment_id: str) -> None:
    # What mlflow.pytorch.log_model does after saving, for a model saved earlier: a LoggedModel
    # linked to the run, its MLmodel naming it, the files uploaded, READY. A retry after a lost
    # reply reuses the LoggedModel created before instead of leaving one PENDING.
    id_file = model_dir.parent / "model_id"
    if id_file.exists():
        logged = client.get_logged_model(id_file.read_text())
    else:
        logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
        id_file.write_text(logged.model_id)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    meta = Model.load(str(model_dir))
    meta.model_id = meta.model_uuid = logged.model_id
    meta.run_id, meta.artifact_path = run_id, logged.artifact_location
    meta.save(str(model_dir / MLMODEL_FILE_NAME))
    client.log_model_artifacts(logged.model_id, str(model_dir))
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.set_tag(run_id, "cnnlab.model_uri", f"models:/{logged.model_id}")


def register_model(client: MlflowClient, run_id: str, name: str, alias: str) -> int:
    """Register the model run `run_id` logged as a version of registered model `name` (created
    if need be), point `alias` at it; the version (0: the run has no model, nothing done). A
    retry registers no second version."""
    model_uri = client.get_run(run_id).data.tags.get("cnnlab.model_uri")
    if model_uri is None:  # not worth retrying (the journal retries what raises): say so
        print(f"warning: run {run_id} logged no model to register as {name}", file=sys.stderr)
        return 0
    with suppress(mlflow.exceptions.MlflowException):  # it exists already: a new version of it
        client.create_registered_model(name)
    model_id = model_uri.removeprefix("models:/")
    # The model's files, not its models:/ URI: a SQL registry resolves that URI through the
    # process's global tracking URI (MLflow's own TODO), which need not be this store's.
    source = client.get_logged_model(model_id).artifact_location
    try:
        existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        version = next((v for v in existing if v.source == source), None) or (
            client.create_model_version(name, source, run_id=run_id, model_id=model_id)
        )
        client.set_registered_model_alias(name, alias, version.version)
    except mlflow.exceptions.MlflowException as exc:
        if exc.get_http_status_code() >= 500:
            raise  # the store fails: the journal retries
        # Refused for good (a name or alias the registry rejects): a retry would hold the
        # run's end back forever, so say so and go on.
        print(f"warning: could not register run {run_id}'s model as {name}@{alias}: "
              f"{one_line(exc)}", file=sys.stderr)  # fmt: skip
        return 0
    print(f"Registered the model of run {run_id} as models:/{name}@{alias} (version "
          f"{version.version})")  # fmt: skip
    return int(version.version)


def pending_dir(spool: Path, run_id: str) -> Path:
    """Where a run's undelivered writes wait."""
    return spool / run_id


_OPS = {"batch", "inputs", "register", "file", "dir", "model"}


def read_journal(folder: Path) -> tuple[dict[str, str], list[dict[str, Any]], int]:
    """A left journal's (meta, undelivered ops, delivered count), every line checked before
    anything is sent or deleted; JournalError (one line, nothing touched) for anything cnnlab
    did not write."""
    where = folder / "journal.jsonl"
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if not (isinstance(meta, dict) and isinstance(meta.get("uri"), str)
                and isinstance(meta.get("run_id"), str)):  # fmt: skip
            raise ValueError("not {uri, run_id}")
    except (OSError, ValueError) as exc:
        raise JournalError(f"{folder / 'meta.json'} is not a journal's: {exc}") from None
    delivered = _read_delivered(folder)
    ops = []
    lines = where.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines[delivered:], start=delivered + 1):
        if not line.strip():
            continue
        try:
            try:
                op = json.loads(line)
            except ValueError:
                raise ValueError("is not a JSON line") from None
            if not isinstance(op, dict) or op.get("op") not in _OPS:
                raise ValueError("is not one of a journal's ops")
            if op["op"] in ("file", "dir", "model"):
                staged_source(folder, op.get("src"))
        except (ValueError, JournalError) as exc:
            raise JournalError(
                f"{where} line {number} {exc}; refused: nothing was delivered or deleted"
            ) from None
        ops.append(op)
    return meta, ops, delivered


def sync(folder: Path) -> tuple[str, str, int]:
    """Deliver a journal left by a process that could not reach its store: (uri, run, count)."""
    meta, ops, delivered = read_journal(folder)
    check_store(meta["uri"], existing=True)  # the run's store: never one its meta.json makes up
    client = MlflowClient(tracking_uri=meta["uri"])
    sent = 0
    while ops:
        try:
            done = deliver(client, folder, meta["run_id"], ops)
        except Exception as exc:  # noqa: BLE001 - the store refused: keep the rest for next time
            raise TrackingError(
                f"{meta['uri']} refused the logs of run {meta['run_id']} "
                f"({store_failure(meta['uri'], exc)}); "
                f"{len(ops)} item(s) are still in {folder}: run cnnlab-sync again"
            ) from exc
        ops, delivered, sent = ops[done:], delivered + done, sent + done
        _write_delivered(folder, delivered)
    shutil.rmtree(folder, ignore_errors=True)
    with suppress(OSError):
        folder.parent.rmdir()
    return meta["uri"], meta["run_id"], sent


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
    new_store = "move it aside (keep it to recover its runs) and run again to start a new store"
    try:
        size = db.stat().st_size
        with db.open("rb") as f:
            header = f.read(100)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise TrackingError(f"cannot read the MLflow store {db} ({exc.strerror})") from exc
    if size == 0:
        return
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
    try:
        with closing(sqlite3.connect(db, timeout=20)) as connection:
            tables = {
                row[0]
                for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
            raise TrackingError(f"the MLflow store {db} is corrupt ({exc}); {new_store}") from exc
        raise TrackingError(f"cannot read the MLflow store {db} ({exc})") from exc
    other = sorted(t for t in tables if not t.startswith(("sqlite_", "alembic_")))
    if other and not {"experiments", "runs"} & set(other):
        raise TrackingError(
            f"{db} is another program's SQLite database (tables {', '.join(other[:5])}; none of "
            "MLflow's), which MLflow would alter; set tracking.uri to another file"
        )
    try:
        MlflowClient(tracking_uri=uri)  # opens (and caches) MLflow's store; checks its schema
    except (sqlalchemy.exc.SQLAlchemyError, mlflow.exceptions.MlflowException) as exc:
        reason = str(getattr(exc, "orig", None) or getattr(exc, "message", exc))
        raise TrackingError(f"cannot open the MLflow store {db}: {reason.splitlines()[0]}") from exc


# One dataset a run read, as the journal keeps it: {"dataset": mlflow Dataset's fields,
# "context": "training" | "evaluation"}.
DatasetRecord = dict[str, Any]


def dataset_record(
    name: str, digest: str, folder: Path, context: str, shape: tuple[int, ...], num_classes: int
) -> DatasetRecord:
    """What the MLflow UI shows of one split of image files: name, digest, where the files are,
    a tensor schema (uint8 images, int64 labels) and a profile (rows, shape, classes)."""
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.types import Schema, TensorSpec

    schema = TensorDatasetSchema(
        Schema([TensorSpec(np.dtype(np.uint8), (-1, *shape[1:]), "images")]),
        Schema([TensorSpec(np.dtype(np.int64), (-1,), "labels")]),
    )
    profile = {"num_rows": shape[0], "images_shape": list(shape), "num_classes": num_classes}
    dataset = Dataset(
        name, digest, "local", json.dumps({"uri": folder.resolve().as_uri()}),
        json.dumps(schema.to_dict()), json.dumps(profile),
    )  # fmt: skip
    return {"context": context, "dataset": dict(dataset)}


class Tracker:
    """Writes one MLflow run: params, metrics, tags, artifacts and the model.

    Every write goes through the run's Journal, so none blocks training on the store; `end`
    waits up to `flush_timeout` seconds for the store to take them all.
    """

    def __init__(
        self,
        client: MlflowClient,
        uri: str,
        run_id: str,
        experiment_id: str,
        spool: Path,
        flush_timeout: float = 60.0,
    ) -> None:
        self.client = client
        self.uri = uri
        self.run_id = run_id
        self.ended: str | None = None  # the status `end` closed the run with, once it has
        self.experiment_id = experiment_id
        self.flush_timeout = flush_timeout
        self._logged_until: dict[str, int] = {}  # metric -> last step already in the store
        self._spool = spool
        self._journal: Journal | None = None

    @property
    def journal(self) -> Journal:
        """The run's journal, opened at the first write (reads alone leave no trace)."""
        if self._journal is None:
            self._journal = Journal(pending_dir(self._spool, self.run_id), self.client,
                                    self.uri, self.run_id)  # fmt: skip
        return self._journal

    def _batch(self, metrics=(), params=None, tags=None, status=None) -> None:
        self.journal.append(
            {"op": "batch", "metrics": list(metrics), "params": params or {},
             "tags": tags or {}, "status": status}
        )  # fmt: skip

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flat key -> value params."""
        self._batch(params={k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log several metrics at one step."""
        timestamp = int(time.time() * 1000)
        batch = [
            (k, float(v), timestamp, step)
            for k, v in metrics.items()
            if step > self._logged_until.get(k, -1)
        ]
        if batch:
            self._batch(metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values are stored as strings)."""
        self._batch(tags={k: str(v) for k, v in tags.items()})

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Store a dict or list as a YAML artifact."""
        self.log_text(yaml.safe_dump(obj, default_flow_style=False, sort_keys=False), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store a text artifact."""
        folder, _, name = artifact_file.rpartition("/")
        staged = self.journal.stage(name)
        staged.write_text(text, encoding="utf-8")
        self._file(staged, folder)

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        """Copy a folder into the run's artifacts."""
        staged = self.journal.stage(Path(local_dir).name)
        shutil.copytree(local_dir, staged)
        self.journal.append({"op": "dir", "src": str(staged.relative_to(self.journal.folder)),
                             "dir": artifact_path})  # fmt: skip

    def log_inputs(self, datasets: list[DatasetRecord]) -> None:
        """Record the datasets the run read (the UI's Dataset column), each with its context."""
        self.journal.append({"op": "inputs", "datasets": datasets})

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Store a matplotlib figure as a PNG artifact (the UI previews it)."""
        folder, _, name = artifact_file.rpartition("/")
        staged = self.journal.stage(name)
        figure.savefig(staged, format="png", dpi=100)
        self._file(staged, folder)

    def register_model(self, name: str, alias: str, run_id: str | None = None) -> None:
        """Register the model logged by this run (or by `run_id`, e.g. a sweep's best child) as
        a version of `name` with `alias`; after the model itself has been delivered."""
        self.journal.append({"op": "register", "name": name, "alias": alias,
                             "run_id": run_id or self.run_id})  # fmt: skip

    def log_checkpoint(self, path: Path) -> None:
        """Store `path` as the run's checkpoints/<name>, replacing an earlier one."""
        staged = self.journal.stage(path.name)
        shutil.copyfile(path, staged)
        self._file(staged, "checkpoints")

    def _file(self, staged: Path, artifact_dir: str) -> None:
        self.journal.append({"op": "file", "src": str(staged.relative_to(self.journal.folder)),
                             "dir": artifact_dir or None})  # fmt: skip

    def log_model(
        self,
        model: Any,
        input_example: np.ndarray,
        requirements: list[str],
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Save `model` as an MLflow PyTorch model (pt2) and queue it; sets cnnlab.model_uri.

        `metadata` (plain values: class names, ...) goes into the MLmodel, for cnnlab-predict.
        """
        # A copy whose parameters own their storage: in training they are views into one flat
        # buffer (step.flat_parameters), which the exported program would store whole per view.
        model = copy.deepcopy(model).cpu().eval()
        for p in model.parameters():
            p.data = p.data.clone()
        with torch.no_grad():
            output = model(torch.from_numpy(input_example)).cpu().numpy()
        staged = self.journal.stage("model")
        mlflow.pytorch.save_model(
            model,
            str(staged),
            serialization_format="pt2",  # a program and tensors: loading it runs no pickle
            signature=infer_signature(input_example, output),
            input_example=input_example,
            # Given, not inferred: inference re-imports the model in a subprocess (seconds).
            pip_requirements=requirements,
            metadata=dict(metadata) if metadata else None,
        )
        self.journal.append({"op": "model", "src": str(staged.relative_to(self.journal.folder)),
                             "experiment_id": self.experiment_id})  # fmt: skip

    def end(self, status: str) -> None:
        """Close the run as FINISHED, FAILED or KILLED once every write has arrived.

        Raises TrackingError, after at most `flush_timeout` seconds, if the store is still
        unreachable: the run is left RUNNING there and its writes wait for `cnnlab-sync`.
        """
        self._batch(status=status)
        if not self.journal.close(self.flush_timeout):
            folder = self.journal.folder
            raise TrackingError(
                f"tracking store {self.uri} still fails ({self.journal.error}); "
                f"{self.journal.pending()} logged item(s) of run {self.run_id} are kept in "
                f"{folder}: upload them with `cnnlab-sync {folder}` once it is back"
            )
        self.ended = status

    def set_running(self) -> None:
        """Mark the run RUNNING again, to continue it (at once: a dead store fails the resume)."""
        self.client.update_run(self.run_id, status="RUNNING")
        print(f"MLflow run {self.run_id} resumed in {self.uri}")

    # ---- reads, straight from the store
    def status(self) -> str:
        """RUNNING, FINISHED, FAILED or KILLED."""
        return self.client.get_run(self.run_id).info.status

    def children(self) -> list[dict[str, Any]]:
        """The runs whose parent is this run, oldest first (see `run_children`)."""
        return run_children(self.client, self.experiment_id, self.run_id)

    def download(self, artifact_path: str, dst: Path) -> Path | None:
        """A local copy of one of the run's artifacts, or None if the run has no such file."""
        return _download(self.client, self.run_id, artifact_path, dst)

    def next_step(self, prefix: str) -> int:
        """The step after the last one any metric named `prefix`... has in the store (of a
        resumed run: as skip_logged_steps read them)."""
        return max(
            (step + 1 for key, step in self._logged_until.items() if key.startswith(prefix)),
            default=0,
        )

    def skip_logged_steps(self) -> None:
        """Log no metric at a step the run already has: a resumed run repeats no point."""
        for metric in self.client.get_run(self.run_id).data._metric_objs:  # at its last step
            self._logged_until[metric.key] = metric.step

    def tags(self) -> dict[str, str]:
        """The run's tags, as the store has them."""
        return dict(self.client.get_run(self.run_id).data.tags)

    def fail_unfinished_models(self) -> None:
        """Mark FAILED the models this run left PENDING (a process killed while logging one)."""
        models = self.client.search_logged_models(
            [self.experiment_id], filter_string=f"source_run_id = '{self.run_id}'"
        )  # (the store's filter ignores status, so that is checked here)
        for logged in models:
            if logged.status == LoggedModelStatus.PENDING:
                self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)


class LoadedModel(torch.nn.Module):
    """A logged model as an ordinary module: (B, C, H, W) images -> (B, classes) logits."""

    def __init__(
        self,
        network: Any,
        in_shape: tuple[int, ...],
        classes: list[str] | None = None,
        run_id: str | None = None,
        light_on_dark: bool = True,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # Held outside the module tree: an exported program refuses .train() and .eval().
        self.__dict__["network"] = network
        self.in_shape = in_shape  # (C, H, W) of one image, from the model's signature
        self.classes = classes  # names by label, where the run logged them
        self.run_id = run_id  # the run that logged it, where the MLmodel says
        self.light_on_dark = light_on_dark  # learnt MNIST-like strokes: predict may invert
        self.config = config  # its run's logged config, where loading it read that already

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the logged network."""
        return self.network(x)


def load_model(model_ref: str, tracking_uri: str, trust_store: bool = False) -> LoadedModel:
    """Load a logged model back as a CPU module: a models:/ or runs:/ URI, or a run id.

    Nothing the store holds runs as code: the network is rebuilt from its run's logged config and
    the weights are read from the model's pt2 archive as raw tensors. `trust_store` loads it as
    MLflow stores it instead (a pickle, a torch.export program, bundled code), which can run code.
    """
    check_reachable(tracking_uri)
    check_store(tracking_uri, existing=True)  # only reads: never creates or migrates a store
    # MLflow resolves a models:/ URI through its global tracking URI only (download_artifacts'
    # tracking_uri does not reach logged models): set to this store, for this command's process.
    mlflow.set_tracking_uri(tracking_uri)
    model_uri, run_id, config = model_ref, None, None
    if "://" not in model_ref and ":/" not in model_ref:  # a run id: the model that run logged
        tags = _get_run(tracking_uri, model_ref)[1].data.tags
        if "cnnlab.model_uri" not in tags:
            raise TrackingError(f"run {model_ref} logged no model (tracking.log_model=false?)")
        model_uri, run_id = tags["cnnlab.model_uri"], model_ref
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
            mlmodel = yaml.safe_load((local / "MLmodel").read_text())
        except (mlflow.exceptions.MlflowException, OSError, yaml.YAMLError) as exc:
            raise TrackingError(
                f"cannot load model {model_uri} from {tracking_uri}: {one_line(exc)}"
            ) from exc
        if not isinstance(mlmodel, dict):
            raise TrackingError(f"model {model_uri} has no readable MLmodel file")
        run_id = run_id or mlmodel.get("run_id")
        # Checked before anything else is read: a refused model costs nothing more.
        archive = None if trust_store else exported.archive(local, mlmodel, model_uri)
        in_shape, num_classes = exported.signature_shapes(mlmodel, model_uri)
        if archive is None:
            try:
                network = mlflow.pytorch.load_model(str(local), map_location="cpu")
            except Exception as exc:  # whatever a foreign model raises: one line, not a traceback
                reason = one_line(exc)
                raise TrackingError(f"cannot load model {model_uri}: {reason}") from exc
        else:
            try:
                config = run_config(tracking_uri, str(run_id))
            except TrackingError as exc:
                raise TrackingError(
                    f"model {model_uri} is rebuilt from its run's logged config: {exc}; "
                    f"{exported.TRUST_STORE_HINT}"
                ) from exc
            network = exported.rebuilt_network(config, in_shape, num_classes, archive, model_uri)
    metadata = mlmodel.get("metadata") if isinstance(mlmodel.get("metadata"), dict) else {}
    # Models logged before this was recorded were all MNIST-like when greyscale.
    light_on_dark = metadata.get("cnnlab.light_on_dark", in_shape[0] == 1) is True
    return LoadedModel(
        network,
        in_shape,
        _class_names(metadata, num_classes),
        str(run_id) if run_id else None,
        light_on_dark,
        config,
    )


def _class_names(metadata: dict[str, Any], num_classes: int) -> list[str] | None:
    # Plain YAML data, used only if it is what cnnlab writes: one string per class.
    names = metadata.get("cnnlab.classes")
    if isinstance(names, list) and len(names) == num_classes:
        return [str(n) for n in names]
    return None


def run_children(client: MlflowClient, experiment_id: str, run_id: str) -> list[dict[str, Any]]:
    """The runs whose parent is `run_id`, oldest first, as plain dicts (`values`: what the
    sweep set for the run; `start`, `end`: epoch seconds, `end` None while it runs)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    return [
        {
            "run_id": r.info.run_id,
            "run_name": r.info.run_name,
            "status": r.info.status,
            "params": dict(r.data.params),
            "metrics": dict(r.data.metrics),
            "error": r.data.tags.get("cnnlab.error", ""),
            # PRUNED for a search's pruned trial (its run ends KILLED), else the run's status
            "state": r.data.tags.get("cnnlab.trial_state", r.info.status),
            "values": json.loads(r.data.tags.get("cnnlab.sweep_values", "{}")),
            "start": r.info.start_time / 1000,
            "end": r.info.end_time / 1000 if r.info.end_time else None,
        }
        for r in runs
    ]


def sweep_children(uri: str, experiment: str) -> list[dict[str, Any]]:
    """The child runs of the newest sweep in `experiment` (see `run_children`)."""
    parents = find_runs(uri, experiment, "cnnlab.role", "sweep")
    if not parents:
        return []
    client = MlflowClient(tracking_uri=uri)
    return run_children(client, client.get_run(parents[0]).info.experiment_id, parents[0])


def training_view(url: str, experiment_id: str, run_id: str | None = None) -> str:
    """The UI's link to an experiment's training runs (or to one run) on the server at `url`.

    MLflow 3's UI opens an experiment on its GenAI view, whatever the experiment's kind tag,
    unless the link asks for the model-training one (or the browser chose it before)."""
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{url.rstrip('/')}/#/experiments/{experiment_id}/{page}?workflowType=machine_learning"


def training_views(uri: str, url: str) -> list[tuple[str, int, str]]:
    """(name, number of runs, training_view link) of each experiment of the store at `uri`,
    served at `url`; the default experiment only where it has runs."""
    client = MlflowClient(tracking_uri=uri)
    views = []
    for experiment in client.search_experiments():
        runs = len(client.search_runs([experiment.experiment_id], max_results=1000))
        if runs or experiment.name != "Default":
            views.append((experiment.name, runs, training_view(url, experiment.experiment_id)))
    return views


def find_runs(uri: str, experiment: str, tag: str, value: str) -> list[str]:
    """Ids of the runs in `experiment` whose `tag` is `value`, newest first."""
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{tag}` = '{value}'",
        order_by=["attributes.start_time DESC"],
    )
    return [r.info.run_id for r in runs]


class NullTracker:
    """Stands in for a Tracker when tracking is off (tracking.enabled=false): logs nothing."""

    run_id = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log nothing."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log nothing."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Log nothing."""

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Log nothing."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log nothing."""

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        """Log nothing."""

    def log_checkpoint(self, path: Path) -> None:
        """Log nothing."""

    def log_inputs(self, datasets: list[DatasetRecord]) -> None:
        """Log nothing."""

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Log nothing."""

    def register_model(self, name: str, alias: str, run_id: str | None = None) -> None:
        """Register nothing."""

    def log_model(self, *_: Any) -> None:  # Tracker.log_model's arguments
        """Log nothing."""

    def end(self, status: str) -> None:
        """Nothing to close."""


def create_run(
    uri: str,
    experiment: str,
    run_name: str | None,
    tags: Mapping[str, str],
    spool: Path,
    flush_timeout: float = 60.0,
) -> Tracker:
    """Create a RUNNING run (in a new store or experiment if need be); the caller ends it.

    `spool` is the folder where the run's writes wait for the store (tracking.pending_dir).
    """
    check_store(uri)
    _seed_sqlite_store(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        experiment_id = _experiment_id(client, uri, experiment)
        run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"cannot open a run in {uri}: {exc.message.splitlines()[0]}") from exc
    print(f"MLflow run {run.info.run_name} ({run.info.run_id}) in {uri}")
    if uri.startswith(("http://", "https://")):
        print(f"  {training_view(uri, experiment_id, run.info.run_id)}")
    return Tracker(client, uri, run.info.run_id, experiment_id, spool, flush_timeout)


def attach_run(uri: str, run_id: str, spool: Path, flush_timeout: float = 60.0) -> Tracker:
    """A Tracker for an existing run (a sweep's parent, a resumed run).

    Writes an earlier process of this run could not deliver (kept in `spool`) go first.
    """
    pending = pending_dir(spool, run_id)
    if (pending / "journal.jsonl").exists():
        _, _, count = sync(pending)
        print(f"Delivered {count} logged item(s) that run {run_id} had kept in {pending}")
    check_store(uri)
    client, run = _get_run(uri, run_id)
    return Tracker(client, uri, run_id, run.info.experiment_id, spool, flush_timeout)


def _get_run(uri: str, run_id: str) -> tuple[MlflowClient, Any]:
    """A client for `uri` and run `run_id` read from it, with a clear error if there is none."""
    check_store(uri, existing=True)  # a run is read: the store must be there, and MLflow's
    client = MlflowClient(tracking_uri=uri)
    try:
        return client, client.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"no run {run_id} in {uri}; check the id and tracking.uri") from exc


def _has_artifact(client: MlflowClient, run_id: str, artifact_path: str) -> bool:
    folder, _, name = artifact_path.rpartition("/")
    return name in {Path(a.path).name for a in client.list_artifacts(run_id, folder)}


def _download(client: MlflowClient, run_id: str, artifact_path: str, dst: Path) -> Path | None:
    if not _has_artifact(client, run_id, artifact_path):
        return None
    return Path(client.download_artifacts(run_id, artifact_path, str(dst)))


def run_config(uri: str, run_id: str, missing_ok: bool = False) -> dict[str, Any] | None:
    """The resolved config a run logged (config/config.yaml); None if it logged none and
    `missing_ok` (a model logged by other code than cnnlab's)."""
    client, _ = _get_run(uri, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        path = _download(client, run_id, "config/config.yaml", Path(tmp))
        if path is None:
            if missing_ok:
                return None
            raise TrackingError(f"run {run_id} logged no config/config.yaml")
        tree = yaml.safe_load(path.read_text())
    if where := _interpolation(tree):
        # cnnlab logs the resolved config; an interpolation there was put in by someone else,
        # and resolving it here would read this machine (${oc.env:SECRET}) into the new run.
        raise TrackingError(
            f"run {run_id}'s logged config holds an interpolation at {where}: a logged config "
            "is the resolved one, and cnnlab resolves nothing in it; refused"
        )
    return tree


def _interpolation(node: Any, key: str = "") -> str | None:
    """The first key of a plain config tree whose name or value holds ${...}."""
    if isinstance(node, str):
        return (key or "its top") if "${" in node else None
    if isinstance(node, dict):
        children = node.items()
    else:
        children = enumerate(node) if isinstance(node, list) else ()
    for name, value in children:
        path = f"{key}.{name}" if key else str(name)
        if "${" in str(name):
            return path
        if found := _interpolation(value, path):
            return found
    return None


def run_state(uri: str, run_id: str, artifact_path: str) -> tuple[str, bool]:
    """(status, whether it has logged `artifact_path`) of run `run_id`."""
    client, run = _get_run(uri, run_id)
    return run.info.status, _has_artifact(client, run_id, artifact_path)


def run_record(uri: str, run_id: str) -> dict[str, Any]:
    """A run's name, status, tags, final metrics and the train_loss history [(step, value)]."""
    _, run = _get_run(uri, run_id)
    return {
        "run_id": run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "tags": dict(run.data.tags),
        "metrics": dict(run.data.metrics),
        "train_loss": metric_history(uri, run_id, "train_loss"),
    }


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """Every (step, value) run `run_id` logged of metric `key`, by step."""
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)


class SystemMetrics:
    """Samples the machine into the run every `interval` seconds, as `system/<name>` at steps
    `start`, `start` + 1, ...: what the UI's System metrics tab plots.

    MLflow's own collectors take the samples (CPU, memory, disk, network; NVIDIA or AMD GPUs
    where their libraries see one), so the names are the ones the UI knows. Unlike MLflow's
    monitor, which writes to the store itself and gives up when a request fails, the samples go
    through the run's journal, so a slow or lost store delays them like any other metric.
    """

    def __init__(self, run: Tracker, interval: float, start: int = 0) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # Only its collectors are used (the constructor contacts no store): never start()ed.
        self._collectors = SystemMetricsMonitor(run.run_id, tracking_uri=run.uri)
        self.run, self.interval, self.step = run, interval, start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_forever, daemon=True)
        self._thread.start()

    def _sample(self) -> dict[str, float]:
        self._collectors.collect_metrics()
        metrics = self._collectors.aggregate_metrics()
        for collector in self._collectors.monitors:
            collector.clear_metrics()
        return metrics

    def _sample_forever(self) -> None:
        # CPU use is measured from one sample to the next, per thread (psutil): the first
        # sample only starts the clock.
        self._sample()
        while not self._stop.wait(self.interval):
            metrics = self._sample()
            try:
                self.run.log_metrics({f"system/{k}": v for k, v in metrics.items()}, self.step)
            except TrackingError:  # the journal's disk is full: training says so, not this
                return
            self.step += 1

    def stop(self) -> None:
        """Take no more samples (the last one, if being taken, is logged first)."""
        self._stop.set()
        self._thread.join()


@contextmanager
def system_metrics(
    run: Tracker | NullTracker, interval: float | None, resumed: bool = False
) -> Iterator[None]:
    """Sample the machine into `run` every `interval` seconds while the block runs (None: not
    at all); a resumed run's samples continue its steps."""
    if interval is None or not isinstance(run, Tracker):
        yield
        return
    sampler = SystemMetrics(run, interval, run.next_step("system/") if resumed else 0)
    try:
        yield
    finally:
        sampler.stop()


@contextmanager
def closing_run(tracker: Tracker | NullTracker) -> Iterator[Tracker | NullTracker]:
    """End `tracker`'s run on the way out: FINISHED, FAILED (with the reason) or KILLED.

    Signals wait while the run's last writes are delivered (a second one stops at once), so a
    stop at any moment after the run exists ends it KILLED, not RUNNING.
    """
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except TrialPruned as exc:  # stopped early by a search, resumable like a stopped run
        status = "KILLED"
        tracker.set_tags(exc.tags)
        raise
    except BaseException as exc:
        tracker.set_tags({"cnnlab.error": f"{type(exc).__name__}: {exc}"[:5000]})
        raise
    finally:
        with interrupts.deferred():
            try:
                tracker.end(status)
            except TrackingError as exc:
                if status == "FINISHED":
                    raise
                print(f"warning: {exc}", file=sys.stderr)  # the run's own error comes first


def _seed_sqlite_store(uri: str) -> None:
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


# What the experiment is for: model training, not GenAI. MLflow's experiment-type selector
# reads it; 3.17's UI still opens every experiment on the view of its sidebar switch (GenAI by
# default), so cnnlab's links ask for the training view themselves (training_view).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND[0] not in experiment.tags:  # made before cnnlab set it; a user's stays
            client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
        return experiment.experiment_id
    db = sqlite_file(uri)
    artifact_location = artifacts_beside(db).as_uri() if db is not None else None
    return client.create_experiment(
        name, artifact_location=artifact_location, tags=dict([EXPERIMENT_KIND])
    )
