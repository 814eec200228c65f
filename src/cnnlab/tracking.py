"""Everything that talks to MLflow. The rest of cnnlab sees a `Tracker` for one run.

Runs are written through an `MlflowClient` bound to one explicit URI rather than mlflow's
process-global active run, so a test can point a run at a temporary SQLite store and nothing
carries over from one run to the next.
"""

from __future__ import annotations

import copy
import errno
import functools
import json
import os
import shutil
import sqlite3
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import sqlalchemy
import torch
import yaml
from mlflow.entities import Metric, Param
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from cnnlab import CnnlabError

# MLflow draws a progress bar for every artifact download; cnnlab's output stays readable.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

_PARAMS_PER_BATCH = 100  # MLflow's cap on params in one log_batch call
_PARAM_VALUE_CHARS = 6000  # MLflow's cap on one param value


_clock = {"seconds": 0.0, "depth": 0}


def mlflow_seconds() -> float:
    """Wall time this process has spent creating runs and in Tracker's writes to them.

    A running total that only cnnlab-bench reads; reads (resume, reproduce) are not counted.
    """
    return _clock["seconds"]


def _timed(fn: Callable[..., Any]) -> Callable[..., Any]:
    # Adds fn's wall time to mlflow_seconds(); a timed call inside another counts once.
    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        outermost = _clock["depth"] == 0
        _clock["depth"] += 1
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _clock["depth"] -= 1
            if outermost:
                _clock["seconds"] += time.perf_counter() - start

    return timed


class TrackingError(CnnlabError):
    """The tracking store cannot be reached or used."""


def resolve_uri(uri: str | None, launch_dir: Path) -> str:
    """The absolute tracking URI: None means the SQLite store mlflow.db in `launch_dir`."""
    if uri is None:
        return f"sqlite:///{(launch_dir / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # A relative SQLite path would follow the process's cwd; pin it to the launch directory.
        return f"sqlite:///{(launch_dir / uri[len('sqlite:///') :]).resolve()}"
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail within `timeout` seconds if an HTTP tracking server does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise TrackingError(
        f"tracking server {uri} is unreachable ({reason}); start it with "
        "`mlflow server --host 127.0.0.1 --port 5000` or set tracking.uri=null for the local store"
    )


_SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database


def check_store(uri: str) -> None:
    """Fail in one line, naming the file and the fix, if a SQLite store can't be used as it is.

    A missing or empty file passes (a new store). A truncated or corrupt file, another program's
    database, or a file where the store's `mlartifacts` folder belongs is refused and left as it
    is, before MLflow writes anything.
    """
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///") :])
    artifacts = db.parent / "mlartifacts"  # where _experiment_id puts the store's artifacts
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


class Tracker:
    """Writes one MLflow run: params, metrics, tags, artifacts and the model."""

    @classmethod
    def attach(cls, uri: str, run_id: str) -> Tracker:
        """A Tracker for an existing run (a sweep's parent, a resumed run)."""
        client = MlflowClient(tracking_uri=uri)
        return cls(client, uri, run_id, client.get_run(run_id).info.experiment_id)

    def __init__(self, client: MlflowClient, uri: str, run_id: str, experiment_id: str) -> None:
        self.client = client
        self.uri = uri
        self.run_id = run_id
        self.experiment_id = experiment_id
        self._logged_until: dict[str, int] = {}  # metric -> last step already in the store

    @_timed
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flat key -> value params in as few calls as MLflow allows."""
        items = [Param(k, str(v)[:_PARAM_VALUE_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _PARAMS_PER_BATCH])

    @_timed
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log several metrics at one step in one call."""
        timestamp = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), timestamp, step)
            for k, v in metrics.items()
            if step > self._logged_until.get(k, -1)
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    @_timed
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values are stored as strings)."""
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    @_timed
    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Store a dict or list as a YAML/JSON artifact (by the file's extension)."""
        self.client.log_dict(self.run_id, obj, artifact_file)

    @_timed
    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        """Copy a folder into the run's artifacts."""
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def status(self) -> str:
        """RUNNING, FINISHED, FAILED or KILLED."""
        return self.client.get_run(self.run_id).info.status

    def set_running(self) -> None:
        """Mark the run RUNNING again, to continue it."""
        self.client.update_run(self.run_id, status="RUNNING")
        print(f"MLflow run {self.run_id} resumed in {self.uri}")

    @_timed
    def end(self, status: str) -> None:
        """Close the run as FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status)

    def children(self) -> list[dict[str, Any]]:
        """The runs whose parent is this run, oldest first, as plain dicts (`values`: what the
        sweep set for the run)."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.run_id}'",
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
                "values": json.loads(r.data.tags.get("cnnlab.sweep_values", "{}")),
            }
            for r in runs
        ]

    @_timed
    def log_checkpoint(self, path: Path) -> None:
        """Store `path` as the run's checkpoints/<name>, replacing an earlier one."""
        self.client.log_artifact(self.run_id, str(path), "checkpoints")

    def download(self, artifact_path: str, dst: Path) -> Path | None:
        """A local copy of one of the run's artifacts, or None if the run has no such file."""
        folder, _, name = artifact_path.rpartition("/")
        if name not in {Path(a.path).name for a in self.client.list_artifacts(self.run_id, folder)}:
            return None
        return Path(self.client.download_artifacts(self.run_id, artifact_path, str(dst)))

    def skip_logged_steps(self, keys: list[str]) -> None:
        """Log none of `keys` at steps the run already has: a resumed run repeats no point."""
        for key in keys:
            history = self.client.get_metric_history(self.run_id, key)
            if history:
                self._logged_until[key] = max(m.step for m in history)

    @_timed
    def log_text(self, text: str, artifact_file: str) -> None:
        """Store a text artifact."""
        self.client.log_text(self.run_id, text, artifact_file)

    @_timed
    def log_model(self, model: Any, input_example: np.ndarray, requirements: list[str]) -> str:
        """Log `model` as an MLflow PyTorch model; return the URI that loads it."""
        # A copy whose parameters own their storage: in training they are views into one flat
        # buffer (step.flat_parameters), which the exported program would store whole per view.
        model = copy.deepcopy(model).cpu().eval()
        for p in model.parameters():
            p.data = p.data.clone()
        with torch.no_grad():
            output = model(torch.from_numpy(input_example)).cpu().numpy()
        # mlflow.pytorch.log_model resolves its store from the global tracking URI.
        mlflow.set_tracking_uri(self.uri)
        logged = self.client.create_logged_model(
            self.experiment_id, name="model", source_run_id=self.run_id
        )
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=infer_signature(input_example, output),
            input_example=input_example,
            # Given, not inferred: inference re-imports the model in a subprocess (seconds).
            pip_requirements=requirements,
            model_id=logged.model_id,
            run_id=self.run_id,
        )
        return info.model_uri


class LoadedModel(torch.nn.Module):
    """A logged model as an ordinary module: (B, C, H, W) images -> (B, classes) logits."""

    def __init__(self, program: Any, in_shape: tuple[int, ...]) -> None:
        super().__init__()
        # Held outside the module tree: an exported program refuses .train() and .eval().
        self.__dict__["program"] = program
        self.in_shape = in_shape  # (C, H, W) of one image, from the model's signature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the logged network."""
        return self.program(x)


def load_model(model_ref: str, tracking_uri: str) -> LoadedModel:
    """Load a logged model back as a CPU module: a models:/ or runs:/ URI, or a run id."""
    check_reachable(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    model_uri = model_ref
    if "://" not in model_ref and ":/" not in model_ref:  # a run id: the model that run logged
        tags = attach_run(tracking_uri, model_ref).client.get_run(model_ref).data.tags
        if "cnnlab.model_uri" not in tags:
            raise TrackingError(f"run {model_ref} logged no model (tracking.log_model=false?)")
        model_uri = tags["cnnlab.model_uri"]
    try:
        signature = mlflow.models.get_model_info(model_uri).signature
        program = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    except (mlflow.exceptions.MlflowException, OSError) as exc:
        raise TrackingError(f"cannot load model {model_uri} from {tracking_uri}: {exc}") from exc
    in_shape = tuple(signature.inputs.to_dict()[0]["tensor-spec"]["shape"][1:])
    return LoadedModel(program, in_shape)


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

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@_timed
def create_run(uri: str, experiment: str, run_name: str | None, tags: Mapping[str, str]) -> Tracker:
    """Create a RUNNING run (in a new store or experiment if need be); the caller ends it."""
    check_store(uri)
    _seed_sqlite_store(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        experiment_id = _experiment_id(client, uri, experiment)
        run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"cannot open a run in {uri}: {exc.message.splitlines()[0]}") from exc
    print(f"MLflow run {run.info.run_name} ({run.info.run_id}) in {uri}")
    return Tracker(client, uri, run.info.run_id, experiment_id)


def attach_run(uri: str, run_id: str) -> Tracker:
    """A Tracker for an existing run, with a clear error when the store has no such run."""
    check_store(uri)
    try:
        return Tracker.attach(uri, run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"no run {run_id} in {uri}; check the id and tracking.uri") from exc


def run_config(uri: str, run_id: str) -> dict[str, Any]:
    """The resolved config a run logged (config/config.yaml)."""
    tracker = attach_run(uri, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        path = tracker.download("config/config.yaml", Path(tmp))
        if path is None:
            raise TrackingError(f"run {run_id} logged no config/config.yaml")
        return yaml.safe_load(path.read_text())


def run_record(uri: str, run_id: str) -> dict[str, Any]:
    """A run's name, status, tags, final metrics and the train_loss history [(step, value)]."""
    tracker = attach_run(uri, run_id)
    run = tracker.client.get_run(run_id)
    history = tracker.client.get_metric_history(run_id, "train_loss")
    return {
        "run_id": run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "tags": dict(run.data.tags),
        "metrics": dict(run.data.metrics),
        "train_loss": sorted((m.step, m.value) for m in history),
    }


@contextmanager
def start_run(
    uri: str, experiment: str, run_name: str | None, tags: Mapping[str, str], enabled: bool = True
) -> Iterator[Tracker | NullTracker]:
    """Open a run and always close it: FINISHED, FAILED (with the reason) or KILLED (Ctrl-C)."""
    if not enabled:
        yield NullTracker()
        return
    with closing_run(create_run(uri, experiment, run_name, tags)) as tracker:
        yield tracker


@contextmanager
def closing_run(tracker: Tracker) -> Iterator[Tracker]:
    """End `tracker`'s run on the way out: FINISHED, FAILED (with the reason) or KILLED."""
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as exc:
        tracker.set_tags({"cnnlab.error": f"{type(exc).__name__}: {exc}"[:5000]})
        raise
    finally:
        tracker.end(status)


def _seed_sqlite_store(uri: str) -> None:
    """Start a new SQLite store as a copy of an empty, already migrated one: whole or not at all.

    Creating a store runs MLflow's schema migrations (seconds); the migrated empty store is made
    once per MLflow version in ~/.cache/cnnlab and copied from then on. Either is written to a
    temporary file and renamed, so a full disk leaves no half-written store to fail every later run.
    """
    if not uri.startswith("sqlite:///"):
        return
    target = Path(uri[len("sqlite:///") :])
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


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        # Artifacts beside the database file, so the store is one movable folder.
        artifact_location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)
