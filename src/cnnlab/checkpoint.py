"""Checkpoints: everything a run needs to continue exactly where it stopped."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cnnlab import CnnlabError


@dataclass
class Progress:
    """Where training stands: the next mini-batch to train and what the loop carries over."""

    epoch: int = 0  # the epoch to (re)start, 0-based
    batch: int = 0  # the next mini-batch within that epoch
    running: float = 0.0  # loss sum of the unfinished log window
    # The global CPU RNG state when `epoch` began: restoring it re-draws the same sample order.
    rng: torch.Tensor = field(default_factory=torch.get_rng_state)


def save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, at: Progress) -> None:
    """Write model, optimizer, RNG and position to `path` (tensors and numbers only)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": at.epoch,
        "batch": at.batch,
        "running": at.running,
        "rng": at.rng,
    }
    try:
        torch.save(state, path)
    except (OSError, RuntimeError) as exc:  # a full disk: torch's writer raises RuntimeError
        raise CnnlabError(
            f"cannot write the checkpoint {path} ({str(exc).splitlines()[0]}); free disk space, "
            "then continue the run with train.resume=<its run id>"
        ) from exc


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> Progress:
    """Restore model and optimizer in place from `path`; return where to continue."""
    # weights_only: a checkpoint from a store is data, never code to run.
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])  # copies into the existing (flat-buffer) tensors
    optimizer.load_state_dict(state["optimizer"])
    return Progress(state["epoch"], state["batch"], state["running"], state["rng"])
