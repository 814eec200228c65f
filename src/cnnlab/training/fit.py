"""Fit: the epochs of one run, from a checkpoint's progress on, evaluating, checkpointing and
logging as they go, and the overfit check of debug=overfit.

It writes through `RunLog` (a Tracker, or NullTracker when nothing is tracked) and asks a
search trial through `Pruning`, so training never imports tracking or sweeps."""

from __future__ import annotations

import logging
import math
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from cnnlab import CnnlabError, TrialPruned
from cnnlab.data.preprocess import Augment
from cnnlab.data.splits import Dataset, Split
from cnnlab.models.networks import configured_network
from cnnlab.training import checkpoint, distributed, interrupts
from cnnlab.training.checkpoint import Progress
from cnnlab.training.distributed import World
from cnnlab.training.loop import TrainingInterrupted, evaluate, train_one_epoch
from cnnlab.training.step import TrainStep, flat_parameters

log = logging.getLogger(__name__)


def build_model(
    cfg: DictConfig, data: Dataset, device: torch.device
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The seeded model on `device`, and its optimizer over one flat parameter buffer."""
    torch.manual_seed(cfg.train.seed)  # the article seeds right before the model initialises
    model = configured_network(cfg, data.in_shape, data.num_classes).to(device)
    optimizer = instantiate(cfg.optimizer, _convert_="all")([flat_parameters(model)])
    return model, optimizer


def training_step(
    cfg: DictConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_split: Split,
    world: World = distributed.SINGLE,
) -> TrainStep:
    """The step `fit` trains with: the batch size, CUDA graph and augmentation of `cfg`, this
    rank's share of each batch under torchrun."""
    pre = cfg.data.preprocess
    augment = Augment(len(train_split), pre.crop_padding, pre.flip, train_split.labels.device)
    return TrainStep(
        model, optimizer, train_split, cfg.train.batch_size, cfg.hardware.cuda_graphs,
        augment if augment.active else None, world,
    )  # fmt: skip


class RunLog(Protocol):
    """What fit writes a run through: cnnlab.tracking's Tracker, or NullTracker untracked."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_checkpoint(self, path: Path) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...


class Pruning(Protocol):
    """A search's trial as fit sees it (cnnlab.sweeps.search.TrialReport)."""

    pruning: bool  # whether mid-epoch steps are reported, else only epoch ends

    def check(self, step: int, value: float, final: bool = False) -> TrialPruned | None: ...


@dataclass
class _Fitting:
    """What every epoch of one fit shares."""

    cfg: DictConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    test_split: Split
    run: RunLog
    world: World
    val_split: Split | None
    trial: Pruning | None
    per_epoch: int  # metrics' step: mini-batches so far, as if each epoch had this many
    last: Path  # the checkpoint file each epoch's end writes
    checkpointed: float = field(default_factory=time.monotonic)  # when the last was written

    def checkpoint(self, progress: Progress) -> None:
        """Write and log the checkpoint a resume continues from at `progress`."""
        checkpoint.save(self.last, self.model, self.optimizer, progress)
        self.run.log_checkpoint(self.last)
        self.checkpointed = time.monotonic()

    def checkpoint_due(self) -> bool:
        return time.monotonic() - self.checkpointed >= self.cfg.train.checkpoint_every * 60

    @property
    def selection(self) -> Split:
        return self.val_split if self.val_split is not None else self.test_split


def fit(
    cfg: DictConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_split: Split,
    test_split: Split,
    run: RunLog,
    progress: Progress,
    world: World = distributed.SINGLE,
    val_split: Split | None = None,
    trial: Pruning | None = None,
) -> float:
    """Train the epochs from `progress` on, logging as it goes; checkpoint each epoch and on a
    stop. Returns the selection accuracy: on `val_split` if given, else on `test_split`. Under
    torchrun, rank 0 alone evaluates, logs and checkpoints (NaN elsewhere).

    A search's `trial` gets that accuracy at each epoch's end and, where it prunes, at each
    logged step; when its pruner says stop, the run is checkpointed as on Ctrl-C and
    TrialPruned raised.
    """
    per_epoch = batches_per_epoch(len(train_split), cfg.train.batch_size, cfg.train.limit_batches)
    accuracy = math.nan
    step = training_step(cfg, model, optimizer, train_split, world)
    with interrupts.stop_requests() as stop, tempfile.TemporaryDirectory() as tmp:
        fitting = _Fitting(
            cfg, model, optimizer, test_split, run, world, val_split, trial, per_epoch,
            Path(tmp) / "last.pt",
        )  # fmt: skip
        if progress.epoch >= cfg.train.epochs and world.main:  # resumed with no epoch left
            accuracy = evaluate(model, fitting.selection, cfg.train.eval_batch_size)[1]
        first_epoch = progress.epoch  # this process's first: always printed
        for epoch in range(first_epoch, cfg.train.epochs):
            # Every epoch's lines, as the article prints them; a long run every Nth epoch's.
            shown = epoch in (first_epoch, cfg.train.epochs - 1)
            shown = shown or (epoch + 1) % cfg.train.print_every_epochs == 0
            say = print if shown else _quiet
            _train_epoch(fitting, step, epoch, progress, stop, say)
            distributed.same_rng(world)  # a rank's dropout on its own slice moved its RNG
            progress = Progress(epoch + 1)  # from its first batch, RNG as it is
            if world.main:
                accuracy = _end_epoch(fitting, epoch, progress, say)
    return accuracy


def _train_epoch(
    fitting: _Fitting, step: TrainStep, epoch: int, progress: Progress,
    stop: Callable[[], int | None], say: Callable[[str], None],
) -> None:  # fmt: skip
    """One epoch's mini-batches from `progress`, each log window's loss printed and logged; on a
    stop request or a pruned trial, the checkpoint to continue from, then the exception."""
    cfg, run, trial, world = fitting.cfg, fitting.run, fitting.trial, fitting.world
    per_epoch = fitting.per_epoch
    pruned: TrialPruned | None = None
    # A pruned trial stops after the current mini-batch, the way a stop request does; under
    # torchrun the ranks agree on the mini-batch.
    halt = distributed.agreed(
        stop if trial is None else lambda: pruned is not None or stop(), world
    )
    resuming = f" (resuming at mini-batch {progress.batch + 1})" if progress.batch else ""
    say(f"Starting epoch {epoch + 1}{resuming}")
    torch.set_rng_state(progress.rng)  # an epoch cut short re-draws the same order
    # The loss of an unfinished log window: each rank's losses are summed at the window's end.
    running = progress.running if world.main else 0.0
    show_bar = sys.stderr.isatty() and world.main
    try:
        for batch, loss in train_one_epoch(
            step, cfg.train.log_every, show_bar, progress.batch, running, halt, batches=per_epoch
        ):
            say(f"Loss after mini-batch {batch:5d}: {loss:.3f}")
            run.log_metrics({"train_loss": loss}, step=epoch * per_epoch + batch)
            if trial is not None and trial.pruning and batch < per_epoch:
                at = epoch * per_epoch + batch  # (the epoch's end reports in _end_epoch)
                accuracy = evaluate_during_epoch(fitting, at)
                pruned = trial.check(at, accuracy)
            if world.main and batch < per_epoch and fitting.checkpoint_due():
                # At a log window's end: nothing of the next window trained yet.
                fitting.checkpoint(Progress(epoch, batch, 0.0, progress.rng))
    except TrainingInterrupted as stopped:
        if world.main:
            fitting.checkpoint(Progress(epoch, *stopped.args_for_resume()))
        if pruned is not None:
            log.info("Trial %s", pruned)
            raise pruned from None  # the run ends KILLED, tagged PRUNED; resumable
        # The run ends KILLED, resumable; another rank's signal stops this one too.
        raise interrupts.Terminated(stop() or signal.SIGTERM) from None


def _end_epoch(
    fitting: _Fitting, epoch: int, progress: Progress, say: Callable[[str], None]
) -> float:
    """Rank 0 at an epoch's end: evaluate, log, checkpoint, report to the search; the
    selection accuracy. Raises the trial's TrialPruned when its pruner stops it here."""
    cfg, run, trial = fitting.cfg, fitting.run, fitting.trial
    eval_batch = cfg.train.eval_batch_size
    test_loss, accuracy = evaluate(fitting.model, fitting.test_split, eval_batch)
    say(f"Epoch {epoch + 1}: test loss {test_loss:.4f}, test accuracy {accuracy:.2%}")
    metrics = {"test_loss": test_loss, "test_accuracy": accuracy, "epoch": epoch + 1}
    if fitting.val_split is not None:
        val_loss, accuracy = evaluate(fitting.model, fitting.val_split, eval_batch)
        say(f"Epoch {epoch + 1}: validation loss {val_loss:.4f}, "
            f"validation accuracy {accuracy:.2%}")  # fmt: skip
        metrics.update(val_loss=val_loss, val_accuracy=accuracy)
    at = (epoch + 1) * fitting.per_epoch
    run.log_metrics(metrics, step=at)
    fitting.checkpoint(progress)
    final = epoch + 1 == cfg.train.epochs  # reported, but too late to prune
    if trial is not None and (pruned := trial.check(at, accuracy, final)):
        log.info("Trial %s", pruned)
        raise pruned  # after the epoch's checkpoint: the run ends KILLED, tagged PRUNED
    return accuracy


def _quiet(*_: object) -> None:
    """An epoch's lines where train.print_every_epochs skips them (they are logged all the same)."""


def evaluate_during_epoch(fitting: _Fitting, step: int) -> float:
    """Accuracy on the selection split mid-epoch (a pruned search's logged step), logged as
    val_/test_loss and _accuracy; the model is left training."""
    prefix = "val" if fitting.val_split is not None else "test"
    loss, accuracy = evaluate(fitting.model, fitting.selection, fitting.cfg.train.eval_batch_size)
    fitting.model.train()
    fitting.run.log_metrics({f"{prefix}_loss": loss, f"{prefix}_accuracy": accuracy}, step=step)
    return accuracy


def batches_per_epoch(samples: int, batch_size: int, limit: int | None) -> int:
    """Mini-batches an epoch of `samples` trains: all of them, or at most `limit`."""
    batches = -(-samples // batch_size)
    return min(batches, limit or batches)


def first(split: Split, n: int) -> Split:
    """The first `n` samples of `split` (all of them if it has fewer)."""
    return Split(split.images[:n], split.labels[:n])


# Mean cross-entropy on the train.overfit_batches samples that counts as fitted: ~0 (every
# sample's true class at >= 95% probability or so), yet reached within debug=overfit's epochs by
# the article's ConvNet at its own Adam 1e-4 with a few times to spare, while lr 1e-9 stays at
# ~ln(10) = 2.3.
OVERFIT_LOSS = 0.05


class OverfitError(CnnlabError):
    """The model could not fit a few fixed batches (train.overfit_batches)."""


def check_overfit(
    model: torch.nn.Module, samples: Split, train_cfg: DictConfig, run: RunLog,
    step: int,
) -> float:  # fmt: skip
    """Say whether the model fitted the overfit batches `samples`; tag the run; their loss.

    Raises OverfitError (the run ends FAILED) when the loss is not ~0.
    """
    loss, accuracy = evaluate(model, samples, train_cfg.eval_batch_size)
    passed = loss < OVERFIT_LOSS
    run.log_metrics({"overfit_loss": loss}, step=step)
    run.set_tags({"cnnlab.overfit": "passed" if passed else "failed"})
    what = (
        f"loss {loss:.4f} (accuracy {accuracy:.0%}) on the {len(samples)} samples of "
        f"train.overfit_batches={train_cfg.overfit_batches} after {train_cfg.epochs} epochs"
    )
    if not passed:
        raise OverfitError(
            f"overfit check failed: {what}, not < {OVERFIT_LOSS}; a model that cannot overfit "
            f"{train_cfg.overfit_batches} batches is wired wrong: check its forward pass (one "
            "logit per class, no softmax before the loss) and optimizer.lr, or give a slow "
            "optimizer more train.epochs"
        )
    log.info("Overfit check passed: %s (< %s)", what, OVERFIT_LOSS)
    return loss
