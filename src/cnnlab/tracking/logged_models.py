"""A logged model's files fetched from the store, for cnnlab.inference to load safely; and
MLflow's own loader, for a store the user trusts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import mlflow
import yaml

from cnnlab import one_line
from cnnlab.tracking.queries import get_run
from cnnlab.tracking.sqlite import check_store
from cnnlab.tracking.store import TrackingError, check_reachable

_LOGGED_MODEL = re.compile(r"models:/m-[0-9A-Za-z]+")  # an MLflow 3 logged model's URI


def download_model(
    model_ref: str, tracking_uri: str, dst: Path
) -> tuple[Path, dict, str, str | None]:
    """The files of a logged model (a models:/ or runs:/ URI, or the model a run id logged)
    downloaded into `dst`: (their folder, the parsed MLmodel, the model's URI, the run id where
    `model_ref` is one)."""
    check_reachable(tracking_uri)
    check_store(tracking_uri, existing=True)  # only reads: never creates or migrates a store
    # MLflow resolves a models:/ URI through its global tracking URI only (download_artifacts'
    # tracking_uri does not reach logged models): set to this store, for this command's process.
    mlflow.set_tracking_uri(tracking_uri)
    model_uri, run_id = model_ref, None
    if "://" not in model_ref and ":/" not in model_ref:  # a run id: the model that run logged
        tags = get_run(tracking_uri, model_ref)[1].data.tags
        if "cnnlab.model_uri" not in tags:
            raise TrackingError(f"run {model_ref} logged no model (tracking.log_model=false?)")
        model_uri, run_id = tags["cnnlab.model_uri"], model_ref
        # A tag is data anyone who can write the store may set: it may only name a model the
        # store itself holds, never a folder (file:///...) or another store's files.
        if not _LOGGED_MODEL.fullmatch(model_uri):
            raise TrackingError(
                f"run {model_ref}'s tag cnnlab.model_uri={model_uri!r} names no logged model of "
                "this store (models:/m-<id>); refused, nothing was read"
            )
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
        mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    except (mlflow.exceptions.MlflowException, OSError, yaml.YAMLError) as exc:
        raise TrackingError(
            f"cannot load model {model_uri} from {tracking_uri}: {one_line(exc)}"
        ) from exc
    if not isinstance(mlmodel, dict):
        raise TrackingError(f"model {model_uri} has no readable MLmodel file")
    return local, mlmodel, model_uri, run_id


def mlflow_load(local: Path, model_uri: str) -> Any:
    """The model in `local` as MLflow loads it (a pickle, a torch.export program, bundled
    code): only for a store the user trusts, since loading can run its code."""
    try:
        return mlflow.pytorch.load_model(str(local), map_location="cpu")
    except Exception as exc:  # whatever a foreign model raises: one line, not a traceback
        raise TrackingError(f"cannot load model {model_uri}: {one_line(exc)}") from exc
