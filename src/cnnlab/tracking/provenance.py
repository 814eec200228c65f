"""What ran: the code's version, the libraries, the device, the data and the overrides; and the
config a run logs so that it can be run again."""

from __future__ import annotations

import getpass
import hashlib
import subprocess
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cnnlab import __version__
from cnnlab.data.splits import Dataset
from cnnlab.tracking.run import DatasetRecord, dataset_record


def code_tags() -> dict[str, str]:
    """The git commit, whether the checkout had changes, cnnlab's and torch's versions."""
    commit, dirty = git_state(Path(__file__).parent)
    return {
        "mlflow.source.git.commit": commit,
        "cnnlab.git_dirty": dirty,
        "cnnlab.version": __version__,
        "cnnlab.torch_version": torch.__version__,
    }


def run_tags(cfg: DictConfig, device: torch.device, data_checksum: str) -> dict[str, str]:
    """Tags that say what ran: code version, libraries, device, data and overrides."""
    return {
        **code_tags(),
        "cnnlab.device": str(device),
        "cnnlab.threads": str(torch.get_num_threads()),  # what hardware.threads=0 came to
        "cnnlab.dataset": cfg.data.name,
        "cnnlab.dataset_md5": data_checksum,
        "cnnlab.overrides": " ".join(command_line_overrides()),
        **recipe_tags(),
        # What the UI shows as the run's Source, User and Description.
        "mlflow.source.name": "cnnlab-train",
        "mlflow.source.type": "LOCAL",
        "mlflow.user": _user(),
        "mlflow.note.content": description(cfg),
    }


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry
        return "unknown"


def description(cfg: DictConfig, data: Dataset | None = None, accuracy: float | None = None) -> str:
    """The run page's description (markdown): model, data, optimizer, epochs; the data's size
    and the final test accuracy once known."""
    model = cfg.model.get("name") or str(cfg.model.get("_target_", "model")).rpartition(".")[2]
    optimizer = str(cfg.optimizer._target_).rpartition(".")[2]
    if (lr := cfg.optimizer.get("lr")) is not None:
        optimizer += f" lr {lr:g}"
    lines = [
        f"**{model}** on **{cfg.data.name}**, {optimizer}, batch {cfg.train.batch_size}, "
        f"{cfg.train.epochs} epoch(s), seed {cfg.train.seed}"
    ]
    if data is not None:
        shape = "x".join(map(str, data.in_shape))
        lines.append(f"{len(data.train)} training / {len(data.test)} test images of {shape}, "
                     f"{data.num_classes} classes")  # fmt: skip
    if accuracy is not None:  # what train() returns: the selection split's
        split = "Validation" if cfg.data.get("val_size") else "Test"
        lines.append(f"{split} accuracy: **{accuracy:.2%}**")
    return "\n\n".join(lines)


def dataset_inputs(name: str, data: Dataset, val_size: int = 0) -> list[DatasetRecord]:
    """The run's splits as MLflow dataset inputs, `<name>-train`, `<name>-val` (data.val_size
    held out of the training files) and `<name>-test`, each with a digest derived from the
    files' md5s (and the held-out size: it changes what train and val hold)."""
    held_out = f":{val_size}" if val_size else ""
    splits = [("train", data.train, "training"), ("val", data.val, "validation"),
              ("test", data.test, "evaluation")]  # fmt: skip
    return [
        dataset_record(
            f"{name}-{split}",
            hashlib.md5(f"{data.checksum}:{split}{held_out}".encode()).hexdigest()[:10],
            data.source,
            context,
            tuple(part.images.shape),
            data.num_classes,
        )  # fmt: skip
        for split, part, context in splits
        if part is not None
    ]


def recipe_tags() -> dict[str, str]:
    """cnnlab.experiment and cnnlab.debug: the named recipe and debug preset this job was
    composed with, where it was composed by cnnlab-train and one was chosen."""
    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    return {f"cnnlab.{group}": choices[group] for group in ("experiment", "debug")
            if choices.get(group)}  # fmt: skip


def git_state(path: Path) -> tuple[str, str]:
    """(commit, "true"/"false" dirty) of the checkout holding `path`, or ("unknown", "unknown")."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        status = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    return commit, str(bool(status.strip())).lower()


def command_line_overrides() -> list[str]:
    """The overrides this job was launched with ([] outside a Hydra app, e.g. in tests)."""
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay whole values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def log_config(run: Any, cfg: DictConfig) -> None:
    """Params (the flattened resolved config), the config itself, the overrides and Hydra's own
    config: what a reproduction reads back."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run.log_params(flatten(resolved))
    run.log_dict(resolved, "config/config.yaml")
    run.log_dict(command_line_overrides(), "config/overrides.yaml")
    if HydraConfig.initialized() and HydraConfig.get().output_subdir is not None:
        hydra_dir = Path(HydraConfig.get().runtime.output_dir) / HydraConfig.get().output_subdir
        if hydra_dir.is_dir():
            run.log_artifacts(hydra_dir, "hydra")


def requirements() -> list[str]:
    """What a logged model needs to load: the torch it was saved with."""
    return [f"torch=={torch.__version__.split('+')[0]}"]
