"""The journal: a run's writes kept in order on disk and delivered to the store by a thread, so
a slow or lost tracking server never stalls training and loses nothing; cnnlab-sync delivers
what a process left."""

from __future__ import annotations

import itertools
import json
import logging
import re
import shutil
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import mlflow
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
from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.tracking import MlflowClient

from cnnlab import CnnlabError, one_line
from cnnlab.tracking.sqlite import check_store
from cnnlab.tracking.store import (
    TrackingError,
    store_failure,
)

log = logging.getLogger(__name__)


# Seconds one write may take while every request of it succeeds (a model's files, one request
# each, to a server answering in seconds): only past this does a healthy store count as stuck.
OP_PATIENCE = 600


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
        """Wait for every write to arrive while the store keeps answering: a slow but healthy
        server gets the whole run; one that fails costs `timeout` seconds from the last write it
        took (or from now). Whether they all arrived."""
        with self._changed:
            progress, seen = time.monotonic(), self._delivered
            while self._delivered < self._written:
                if self._delivered > seen:  # the store took something: wait on
                    progress, seen = time.monotonic(), self._delivered
                # A write of many requests (a model's files) may take long with every request
                # answered; only a failure since the last delivered write starts the clock.
                patience = timeout if self.error is not None else max(timeout, OP_PATIENCE)
                left = progress + patience - time.monotonic()
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
                        log.warning(
                            "warning: tracking store %s failed (%s); training goes on, logs "
                            "wait in %s", self.uri, self.error, self.folder,
                        )  # fmt: skip
                    with self._changed:
                        if self._changed.wait_for(lambda: self._stopping, timeout=backoff):
                            return
                    backoff = min(backoff * 2, 8.0)
                    continue
                if self.error is not None:
                    log.warning("tracking store %s answers again", self.uri)  # by the failure
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
        # Replayed (delivered, then a crash before it was counted): the store refuses a second
        # identical input, so it is sent only if the run has none of these datasets yet.
        have = {d.dataset.digest for d in client.get_run(run_id).inputs.dataset_inputs}
        if all(d["dataset"]["digest"] in have for d in op["datasets"]):
            return 1
        client.log_inputs(run_id, datasets=[
            DatasetInput(Dataset(**d["dataset"]), [InputTag("mlflow.data.context", d["context"])])
            for d in op["datasets"]
        ])  # fmt: skip
        return 1
    if op["op"] == "register":
        register_model(client, op.get("run_id", run_id), op["name"], op["alias"])
        return 1
    source = staged_source(folder, op.get("src"))
    if not source.exists():  # staged files go only once delivered: a replay of a delivered op
        return 1
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
        logged = client.get_logged_model(id_file.read_text().strip())
        if logged.source_run_id != run_id:  # an edited journal: never write another's model
            raise JournalError(f"{id_file} names model {logged.model_id} of another run")
    else:
        logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
        id_file.write_text(logged.model_id)
    outputs = client.get_run(run_id).outputs
    if logged.model_id not in {o.model_id for o in (outputs.model_outputs if outputs else [])}:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])  # once only
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
        log.warning("warning: run %s logged no model to register as %s", run_id, name)
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
        log.warning(
            "warning: could not register run %s's model as %s@%s: %s",
            run_id, name, alias, one_line(exc),
        )  # fmt: skip
        return 0
    log.info(
        "Registered the model of run %s as models:/%s@%s (version %s)",
        run_id, name, alias, version.version,
    )  # fmt: skip
    return int(version.version)


def journal_dir(pending_dir: Path, run_id: str) -> Path:
    """The journal of run `run_id`: its folder in `pending_dir` (tracking.pending_dir), where
    its undelivered writes wait."""
    return pending_dir / run_id


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
