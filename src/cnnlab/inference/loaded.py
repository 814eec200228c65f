"""A logged model loaded for eval and predict: from a run id or a models:/ URI, rebuilt by
cnnlab (cnnlab.inference.exported), or loaded by MLflow where the store is trusted."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow
import torch
import yaml

from cnnlab import one_line
from cnnlab.inference import exported
from cnnlab.tracking.queries import get_run, run_config
from cnnlab.tracking.sqlite import check_store
from cnnlab.tracking.store import (
    TrackingError,
    check_reachable,
)


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
        tags = get_run(tracking_uri, model_ref)[1].data.tags
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
