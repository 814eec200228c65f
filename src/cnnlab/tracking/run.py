"""Everything that talks to MLflow. The rest of cnnlab sees a `Tracker` for one run.

Runs are written through an `MlflowClient` bound to one explicit URI rather than mlflow's
process-global active run, so a test can point a run at a temporary SQLite store and nothing
carries over from one run to the next. A run's writes go through a local journal delivered by a
background thread, so a slow or lost tracking server never stalls training and loses nothing.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import yaml
from mlflow.entities import (
    Dataset,
    LoggedModelStatus,
)
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from cnnlab import TrialPruned
from cnnlab.tracking.journal import Journal, journal_dir, sync
from cnnlab.tracking.queries import download_artifact, get_run, run_children, training_view
from cnnlab.tracking.sqlite import check_store, seed_sqlite_store
from cnnlab.tracking.store import (
    TrackingError,
    artifacts_beside,
    sqlite_file,
)
from cnnlab.training import interrupts

log = logging.getLogger(__name__)

# MLflow draws a progress bar for every artifact download; cnnlab's output stays readable.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# A retried request is the Journal's business; it says once that the store fails, not per try.
logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


# Its collectors say at INFO, once per run, that there is no GPU to sample.
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


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
        pending_dir: Path,
        flush_timeout: float = 60.0,
    ) -> None:
        self.client = client
        self.uri = uri
        self.run_id = run_id
        self.ended: str | None = None  # the status `end` closed the run with, once it has
        self.experiment_id = experiment_id
        self.flush_timeout = flush_timeout
        self._logged_until: dict[str, int] = {}  # metric -> last step already in the store
        self._pending_dir = pending_dir
        self._journal: Journal | None = None

    @property
    def journal(self) -> Journal:
        """The run's journal, opened at the first write (reads alone leave no trace)."""
        if self._journal is None:
            self._journal = Journal(journal_dir(self._pending_dir, self.run_id), self.client,
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
        log.info("MLflow run %s resumed in %s", self.run_id, self.uri)

    # ---- reads, straight from the store
    def status(self) -> str:
        """RUNNING, FINISHED, FAILED or KILLED."""
        return self.client.get_run(self.run_id).info.status

    def children(self) -> list[dict[str, Any]]:
        """The runs whose parent is this run, oldest first (see `run_children`)."""
        return run_children(self.client, self.experiment_id, self.run_id)

    def download(self, artifact_path: str, dst: Path) -> Path | None:
        """A local copy of one of the run's artifacts, or None if the run has no such file."""
        return download_artifact(self.client, self.run_id, artifact_path, dst)

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
    pending_dir: Path,
    flush_timeout: float = 60.0,
    first: Callable[[Tracker], None] | None = None,
) -> Tracker:
    """Create a RUNNING run (in a new store or experiment if need be); the caller ends it.

    `pending_dir` is the folder where the run's writes wait for the store (tracking.pending_dir).
    `first` writes to the run before it is announced: what must be in its journal before
    anyone (or any signal) can act on the run, e.g. its config, which a resume reads.
    """
    check_store(uri)
    seed_sqlite_store(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        experiment_id = _experiment_id(client, uri, experiment)
        run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"cannot open a run in {uri}: {exc.message.splitlines()[0]}") from exc
    tracker = Tracker(client, uri, run.info.run_id, experiment_id, pending_dir, flush_timeout)
    if first is not None:
        try:
            first(tracker)
        except BaseException:
            with suppress(Exception):  # the first error is the one to report
                client.set_terminated(run.info.run_id, "FAILED")
            raise
    log.info("MLflow run %s (%s) in %s", run.info.run_name, run.info.run_id, uri)
    if uri.startswith(("http://", "https://")):
        log.info("  %s", training_view(uri, experiment_id, run.info.run_id))
    return tracker


def deliver_left(run_id: str, pending_dir: Path) -> None:
    """Deliver what an earlier process of run `run_id` left undelivered in `pending_dir` (a
    SIGKILL, a lost store), so that the store has all it logged: e.g. its config, before a
    resume reads it."""
    journal = journal_dir(pending_dir, run_id)
    if (journal / "journal.jsonl").exists():
        _, _, count = sync(journal)
        log.info("Delivered %d logged item(s) that run %s had kept in %s", count, run_id, journal)


def attach_run(uri: str, run_id: str, pending_dir: Path, flush_timeout: float = 60.0) -> Tracker:
    """A Tracker for an existing run (a sweep's parent, a resumed run).

    Writes an earlier process of this run could not deliver (kept in `pending_dir`) go first.
    """
    deliver_left(run_id, pending_dir)
    check_store(uri)
    client, run = get_run(uri, run_id)
    return Tracker(client, uri, run_id, run.info.experiment_id, pending_dir, flush_timeout)


@contextmanager
def closing_run(tracker: Tracker | NullTracker) -> Iterator[Tracker | NullTracker]:
    """End `tracker`'s run on the way out: FINISHED, FAILED (with the reason) or KILLED.

    Signals wait while the run's last writes are delivered (a second one stops at once), so a
    stop at any moment after the run exists ends it KILLED, not RUNNING.
    """
    status = "FAILED"
    try:
        yield tracker
        if (signum := interrupts.swallowed()) is not None:  # a stop Python itself ignored
            raise interrupts.Terminated(signum)
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
                log.warning("warning: %s", exc)  # the run's own error comes first


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
