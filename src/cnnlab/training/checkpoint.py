"""Checkpoints: everything a run needs to continue exactly where it stopped."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cnnlab import CnnlabError


class CheckpointError(CnnlabError):
    """A checkpoint that cannot be continued from: not one cnnlab wrote for this model."""


@dataclass
class Progress:
    """Where training stands: the next mini-batch to train and what the loop carries over."""

    epoch: int = 0  # the epoch to (re)start, 0-based
    batch: int = 0  # the next mini-batch within that epoch
    running: float = 0.0  # loss sum of the unfinished log window
    # The global CPU RNG state when `epoch` began: restoring it re-draws the same sample order.
    rng: torch.Tensor = field(default_factory=torch.get_rng_state)


def save(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress
) -> None:
    """Write model, optimizer, RNG and position to `path` (tensors and numbers only)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": progress.epoch,
        "batch": progress.batch,
        "running": progress.running,
        "rng": progress.rng,
    }
    try:
        torch.save(state, path)
    except (OSError, RuntimeError) as exc:  # a full disk: torch's writer raises RuntimeError
        raise CnnlabError(
            f"cannot write the checkpoint {path} ({str(exc).splitlines()[0]}); free disk space, "
            "then continue the run with train.resume=<its run id>"
        ) from exc


_KEYS = {"model", "optimizer", "epoch", "batch", "running", "rng"}  # what save() writes


def load(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, name: str | None = None
) -> Progress:
    """Restore model and optimizer in place from `path`; return where to continue.

    A file that is not such a checkpoint raises CheckpointError: one line naming it (`name`,
    e.g. the run's artifact, else the path) and saying that none of it was run or used.
    """
    where = name or f"checkpoint {path}"
    fix = "Resume another run, or start this one afresh with cnnlab-reproduce <run id>"
    try:
        # weights_only: a checkpoint from a store is data, never code to run. Its warnings (an
        # unusual pickle protocol) would only add lines to the refusal below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a crafted or damaged file fails in many ways, all of them here
        text = str(exc)
        if "WeightsUnpickler error:" in text:  # torch's cause follows a paragraph of advice
            cause = _first_line(text.split("WeightsUnpickler error:", 1)[1]).split(". ")[0]
            reason = f"it holds more than tensors and numbers ({cause})"
        else:
            reason = (
                f"it is truncated or not a torch file ({type(exc).__name__}: {_first_line(text)})"
            )
        raise CheckpointError(
            f"{where} was refused: {reason}; nothing in it was executed. {fix}"
        ) from exc
    try:
        if not isinstance(state, dict) or not _KEYS <= state.keys():
            found = set(state) if isinstance(state, dict) else set()
            raise ValueError(f"it lacks {', '.join(sorted(_KEYS - found))}")
        rng = state["rng"]
        if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
            raise ValueError("its rng is not a random-number generator state")
        progress = Progress(int(state["epoch"]), int(state["batch"]), float(state["running"]), rng)
        model.load_state_dict(state["model"])  # copies into the existing (flat-buffer) tensors
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, TypeError, KeyError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(
            f"{where} does not fit this model and optimizer ({_first_line(str(exc))}); nothing "
            f"in it was executed. {fix}"
        ) from exc
    return progress


def _first_line(text: str) -> str:
    # load_state_dict says "Error(s) in loading state_dict for ConvNet:" first, the cause next.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Error(s) in loading")] or ["?"]
    return lines[0][:300]
