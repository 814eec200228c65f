"""Everything that talks to MLflow. The rest of cnnlab sees a `Tracker` for one run.

Runs are written through an `MlflowClient` bound to one explicit URI rather than mlflow's
process-global active run, so a test can point a run at a temporary SQLite store and nothing
carries over from one run to the next.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import yaml
from mlflow.entities import Metric, Param
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cnnlab import CnnlabError, models, schema

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

    def __init__(self, network: Any, in_shape: tuple[int, ...]) -> None:
        super().__init__()
        # Held outside the module tree: an exported program refuses .train() and .eval().
        self.__dict__["network"] = network
        self.in_shape = in_shape  # (C, H, W) of one image, from the model's signature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the logged network."""
        return self.network(x)


TRUST_STORE_HINT = "pass --trust-store if you trust the store that wrote it"

# torch.export's ScalarType numbers (torch/_export/serde/schema.py): part of its archive format.
_EXPORT_DTYPES = {6: torch.float16, 7: torch.float32, 8: torch.float64, 13: torch.bfloat16}


def load_model(model_ref: str, tracking_uri: str, trust_store: bool = False) -> LoadedModel:
    """Load a logged model back as a CPU module: a models:/ or runs:/ URI, or a run id.

    Nothing the store holds runs as code: the network is rebuilt from its run's logged config and
    the weights are read from the model's pt2 archive as raw tensors. `trust_store` loads it as
    MLflow stores it instead (a pickle, a torch.export program, bundled code), which can run code.
    """
    check_reachable(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    model_uri, run_id = model_ref, None
    if "://" not in model_ref and ":/" not in model_ref:  # a run id: the model that run logged
        tags = attach_run(tracking_uri, model_ref).client.get_run(model_ref).data.tags
        if "cnnlab.model_uri" not in tags:
            raise TrackingError(f"run {model_ref} logged no model (tracking.log_model=false?)")
        model_uri, run_id = tags["cnnlab.model_uri"], model_ref
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
            mlmodel = yaml.safe_load((local / "MLmodel").read_text())
        except (mlflow.exceptions.MlflowException, OSError, yaml.YAMLError) as exc:
            raise TrackingError(
                f"cannot load model {model_uri} from {tracking_uri}: {_first_line(exc)}"
            ) from exc
        if not isinstance(mlmodel, dict):
            raise TrackingError(f"model {model_uri} has no readable MLmodel file")
        # Checked before anything else is read: a refused model costs nothing more.
        archive = None if trust_store else _exported_archive(local, mlmodel, model_uri)
        in_shape, num_classes = _signature_shapes(mlmodel, model_uri)
        if archive is None:
            try:
                network = mlflow.pytorch.load_model(str(local), map_location="cpu")
            except Exception as exc:  # whatever a foreign model raises: one line, not a traceback
                raise TrackingError(f"cannot load model {model_uri}: {_first_line(exc)}") from exc
        else:
            try:
                config = run_config(tracking_uri, str(run_id or mlmodel.get("run_id")))
            except TrackingError as exc:
                raise TrackingError(
                    f"model {model_uri} is rebuilt from its run's logged config: {exc}; "
                    f"{TRUST_STORE_HINT}"
                ) from exc
            network = _rebuilt_network(config, in_shape, num_classes, archive, model_uri)
    return LoadedModel(network, in_shape)


def _first_line(exc: BaseException) -> str:
    # An exception as one line: its class and the first line of its message.
    text = str(exc).strip()
    return f"{exc.__class__.__name__}: {text.splitlines()[0]}" if text else exc.__class__.__name__


def _signature_shapes(mlmodel: dict[str, Any], model_uri: str) -> tuple[tuple[int, ...], int]:
    # (C, H, W) of one image and the number of classes, from the signature's tensor specs
    # (inputs (-1, C, H, W), outputs (-1, classes)).
    try:
        inputs, outputs = (
            json.loads(mlmodel["signature"][side])[0]["tensor-spec"]["shape"]
            for side in ("inputs", "outputs")
        )
        in_shape, num_classes = tuple(inputs[1:]), outputs[-1]
        if all(isinstance(n, int) and n > 0 for n in (*in_shape, num_classes)):
            return in_shape, num_classes
    except (KeyError, IndexError, TypeError, ValueError):
        pass
    raise TrackingError(
        f"model {model_uri} has no tensor signature (-1, C, H, W) -> (-1, classes) in its MLmodel"
    )


def _exported_archive(local: Path, mlmodel: dict[str, Any], model_uri: str) -> Path:
    # The model's pt2 archive, or a one-line refusal for a format that runs code when loaded.
    flavors = mlmodel.get("flavors")
    flavor = flavors.get("pytorch") if isinstance(flavors, dict) else None
    if not isinstance(flavor, dict) or not isinstance(flavor.get("model_data"), str):
        raise TrackingError(f"model {model_uri} is not an MLflow PyTorch model")
    data = (local / flavor["model_data"]).resolve()
    if not data.is_relative_to(local.resolve()):
        raise TrackingError(f"model {model_uri} points outside itself (model_data); not loaded")
    archive = data / "model.pt2"
    if data.is_file() or (data / "model.pth").exists():
        raise TrackingError(
            f"model {model_uri} is stored as a pickle (torch.save), which can run code when "
            f"loaded; {TRUST_STORE_HINT}"
        )
    if not archive.is_file():
        raise TrackingError(f"model {model_uri} has no {flavor['model_data']}/model.pt2 to load")
    return archive


def _rebuilt_network(
    config: dict[str, Any],
    in_shape: tuple[int, ...],
    num_classes: int,
    archive: Path,
    model_uri: str,
) -> torch.nn.Module:
    # The logged config's model, built without memory (meta), then given the archive's weights.
    classes = {"cnnlab.models.ConvNet": models.ConvNet, "cnnlab.models.MLP": models.MLP}
    try:
        cfg = schema.typed_config(config)  # typed keys; an unknown _target_ is an error
        schema.validate(cfg)
        kwargs = OmegaConf.to_container(cfg.model)
        cls = classes[kwargs.pop("_target_")]
        with torch.device("meta"):
            network = cls(in_shape=in_shape, num_classes=num_classes, **kwargs)
        network.load_state_dict(_exported_weights(archive), strict=True, assign=True)
    except (
        CnnlabError, OmegaConfBaseException, AttributeError, KeyError, TypeError, ValueError,
        RuntimeError, zipfile.BadZipFile,
    ) as exc:  # fmt: skip
        # load_state_dict's first line is a heading; the mismatch itself is on the second.
        reason = "; ".join(line.strip() for line in str(exc).strip().splitlines()[:2])
        raise TrackingError(
            f"model {model_uri}: cannot rebuild it from its run's config and model.pt2 "
            f"({exc.__class__.__name__}: {reason}); {TRUST_STORE_HINT}"
        ) from exc
    return network.eval()


def _exported_weights(path: Path) -> dict[str, torch.Tensor]:
    # The parameters of a torch.export archive as raw tensors. torch.export.load would also
    # unpickle records and eval() the graph's shape expressions (sympy), so it is never called.
    with zipfile.ZipFile(path) as archive:
        [config_name] = [
            n for n in archive.namelist() if n.endswith("/data/weights/model_weights_config.json")
        ]
        root = config_name.removesuffix("data/weights/model_weights_config.json")
        if archive.read(f"{root}byteorder").decode() != sys.byteorder:
            raise ValueError("the weights were written with another byte order")
        weights = {}
        for name, entry in json.loads(archive.read(config_name))["config"].items():
            if entry["use_pickle"] is not False:
                raise ValueError(f"weight {name} is pickled")
            meta = entry["tensor_meta"]
            record = archive.getinfo(f"{root}data/weights/{entry['path_name']}")
            if record.compress_type != zipfile.ZIP_STORED:  # no inflating: memory <= file size
                raise ValueError(f"weight {name} is compressed")
            flat = torch.frombuffer(
                bytearray(archive.read(record)), dtype=_EXPORT_DTYPES[meta["dtype"]]
            )
            weights[name] = torch.as_strided(
                flat,
                [d["as_int"] for d in meta["sizes"]],
                [d["as_int"] for d in meta["strides"]],
                meta["storage_offset"]["as_int"],
            )
    return weights


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
    """Start a new SQLite store as a copy of an empty, already migrated one.

    Creating a store runs MLflow's schema migrations (seconds); the migrated empty store is made
    once per MLflow version in ~/.cache/cnnlab and copied from then on.
    """
    if not uri.startswith("sqlite:///"):
        return
    target = Path(uri[len("sqlite:///") :])
    if target.exists():
        return
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cnnlab"
    template = cache / f"mlflow-{mlflow.__version__}-empty.db"
    try:
        if not template.exists():
            cache.mkdir(parents=True, exist_ok=True)
            staging = cache / f".{template.name}.{os.getpid()}"
            MlflowClient(f"sqlite:///{staging}").search_experiments()  # runs the migrations
            staging.replace(template)  # atomic: a concurrent job sees all of it or nothing
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, target)
    except OSError:
        pass  # no cache: MLflow migrates the new store itself, only slower


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        # Artifacts beside the database file, so the store is one movable folder.
        artifact_location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)
