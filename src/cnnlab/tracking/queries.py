"""Reading a store: a run's logged config and state, its metric histories, a sweep's children and
the UI's training views."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from cnnlab.tracking.sqlite import check_store
from cnnlab.tracking.store import (
    TrackingError,
)


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


def get_run(uri: str, run_id: str) -> tuple[MlflowClient, Any]:
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


def download_artifact(
    client: MlflowClient, run_id: str, artifact_path: str, dst: Path
) -> Path | None:
    if not _has_artifact(client, run_id, artifact_path):
        return None
    return Path(client.download_artifacts(run_id, artifact_path, str(dst)))


def run_config(uri: str, run_id: str, *, missing_ok: bool = False) -> dict[str, Any] | None:
    """The resolved config a run logged (config/config.yaml); None if it logged none and
    `missing_ok` (a model logged by other code than cnnlab's)."""
    client, _ = get_run(uri, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        path = download_artifact(client, run_id, "config/config.yaml", Path(tmp))
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
    client, run = get_run(uri, run_id)
    return run.info.status, _has_artifact(client, run_id, artifact_path)


def run_record(uri: str, run_id: str) -> dict[str, Any]:
    """A run's name, status, tags, final metrics and the train_loss history [(step, value)]."""
    _, run = get_run(uri, run_id)
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
