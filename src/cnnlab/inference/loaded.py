"""A logged model loaded for eval and predict: from a run id or a models:/ URI, rebuilt by
cnnlab (cnnlab.inference.exported), or loaded by MLflow where the store is trusted."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from cnnlab.inference import exported
from cnnlab.tracking.logged_models import download_model, mlflow_load
from cnnlab.tracking.queries import run_config
from cnnlab.tracking.store import TrackingError


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
    config = None
    with tempfile.TemporaryDirectory() as tmp:
        local, mlmodel, model_uri, run_id = download_model(model_ref, tracking_uri, Path(tmp))
        run_id = run_id or mlmodel.get("run_id")
        # Checked before anything else is read: a refused model costs nothing more.
        archive = None if trust_store else exported.archive(local, mlmodel, model_uri)
        in_shape, num_classes = exported.signature_shapes(mlmodel, model_uri)
        if archive is None:
            network = mlflow_load(local, model_uri)
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
