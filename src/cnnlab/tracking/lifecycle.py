"""A run's life around fit: opened with its params and config (or resumed at its checkpoint),
closed FINISHED, FAILED or KILLED, and its results logged."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig

from cnnlab import CnnlabError, TrialPruned, one_line
from cnnlab.config.compose import launch_dir, launch_path
from cnnlab.config.validate import typed_config
from cnnlab.data.catalog import IDX_SETS
from cnnlab.data.preprocess import to_float
from cnnlab.data.splits import Dataset, Split
from cnnlab.tracking.provenance import (
    description,
    log_config,
    requirements,
)
from cnnlab.tracking.queries import run_config
from cnnlab.tracking.run import NullTracker, Tracker, attach_run, closing_run, create_run
from cnnlab.tracking.store import (
    say_where_it_went,
)
from cnnlab.tracking.system_metrics import system_metrics
from cnnlab.training import checkpoint, distributed, interrupts
from cnnlab.training.checkpoint import Progress
from cnnlab.training.distributed import World
from cnnlab.training.loop import predicted

log = logging.getLogger(__name__)

AnyTracker = Tracker | NullTracker


def log_results(
    cfg: DictConfig,
    run: AnyTracker,
    model: torch.nn.Module,
    data: Dataset,
    test_split: Split,
    accuracy: float,
    register: bool = True,
) -> None:
    """What a trained run logs: its description with the result, figures of its mistakes on
    the test split, the model, and (if `register`: a sweep registers only its best run's) the
    model's registered version."""
    if run.run_id is None:  # tracking.enabled=false
        return
    run.set_tags({"mlflow.note.content": description(cfg, data, accuracy)})
    if cfg.tracking.log_model:
        example = to_float(data.test.images[:2]).numpy()  # (2, C, H, W) in [0, 1]
        # For cnnlab-predict: class names, and whether dark-on-light images need inverting.
        about = {
            "cnnlab.classes": data.classes,
            "cnnlab.light_on_dark": cfg.data.dataset in IDX_SETS,
        }
        run.log_model(model, example, requirements(), about)  # tags cnnlab.model_uri
        if cfg.tracking.register_as and register:
            run.register_model(cfg.tracking.register_as, cfg.tracking.register_alias)
    if cfg.tracking.log_figures:  # last, and never at the cost of the run: pictures only
        from cnnlab.tracking.figures import prediction_figures

        guesses = predicted(model, test_split, cfg.train.eval_batch_size)
        try:
            drawn = prediction_figures(test_split.images, test_split.labels, guesses, data.classes)
            for name, figure in drawn.items():
                run.log_figure(figure, name)
        except (ValueError, RuntimeError, OSError) as exc:  # e.g. a class name matplotlib can't
            log.warning("warning: no figures for this run: %s", one_line(exc))


@contextmanager
def open_run(
    cfg: DictConfig,
    uri: str,
    tags: dict[str, str],
    run_name: str | None,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    world: World = distributed.SINGLE,
    wrap: Callable[[AnyTracker], AnyTracker] | None = None,
) -> Iterator[tuple[AnyTracker, Progress]]:
    """A new run named `run_name` with `tags`, its params and config logged, or the resumed run
    at its checkpoint (a torchrun rank other than 0: no run). `wrap` may wrap the run's writer
    (cnnlab-bench times its calls so).

    While it is open, Ctrl-C, SIGTERM and SIGHUP end it KILLED wherever the code is.
    """
    pending_dir = launch_path(cfg.tracking.pending_dir)
    with interrupts.handled():
        if not world.main:
            run, progress = NullTracker(), Progress()
        elif cfg.train.resume:
            run, progress = resumed_run(cfg, uri, pending_dir, model, optimizer)
        elif cfg.tracking.enabled:
            flush = cfg.tracking.flush_timeout
            # The config first: a run killed as soon as it exists can be resumed from it.
            run = create_run(
                uri, cfg.tracking.experiment, run_name, tags, pending_dir, flush,
                first=lambda new: log_config(new, cfg),
            )  # fmt: skip
            progress = Progress()  # RNG state now: right after the model's initialisation
        else:
            run, progress = NullTracker(), Progress()
        if wrap is not None:
            run = wrap(run)
        interval = cfg.tracking.system_metrics_interval if cfg.tracking.system_metrics else None
        pruned = False  # a search's pruned trial: the search reports it, nothing to continue
        try:
            with closing_run(run), system_metrics(run, interval, resumed=bool(cfg.train.resume)):
                yield run, progress
        except TrialPruned:
            pruned = True
            raise
        finally:
            # Once the store has it (else the error says where its logs wait).
            if run.run_id is not None and run.ended is not None and not pruned:
                say_where_it_went(run.run_id, run.ended, uri, launch_dir())


def resumed_run(
    cfg: DictConfig,
    uri: str,
    pending_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> tuple[Tracker, Progress]:
    """The run `train.resume` names, RUNNING again, with model and optimizer at its checkpoint
    (at their initial state where it has none yet)."""
    run = attach_run(uri, cfg.train.resume, pending_dir, cfg.tracking.flush_timeout)
    with tempfile.TemporaryDirectory() as tmp:
        path = run.download("checkpoints/last.pt", Path(tmp))
        if path is None:  # killed before its first checkpoint: trained again from its start
            # The model and the RNG are as the run began (the recipe seeded and built it), so it
            # retrains to the same numbers; skip_logged_steps keeps each step logged once.
            log.info("Run %s has no checkpoint yet: training it from its start", run.run_id)
            progress = Progress()
        else:
            progress = checkpoint.load(
                path, model, optimizer, f"run {run.run_id}'s checkpoints/last.pt"
            )
    if progress.epoch >= cfg.train.epochs and run.status() == "FINISHED":
        raise CnnlabError(f"run {run.run_id} already trained all {cfg.train.epochs} epochs")
    # (Killed after its last epoch, e.g. while logging the model: fit has nothing left to
    # train, and the run is finished with its model.)
    run.skip_logged_steps()
    if run.tags().get("cnnlab.trial_state") == "PRUNED":  # trained on now: no longer pruned
        run.set_tags({"cnnlab.trial_state": "RESUMED"})
    run.fail_unfinished_models()  # a model a killed process left PENDING will never be READY
    run.set_running()  # also after a SIGKILL left it RUNNING
    return run, progress


# What a resume may change of the logged config: where it runs and where the data is.
_RESUME_MAY_CHANGE = (
    "hardware.",
    "data.root=",
    "tracking.uri=",
    "tracking.request_timeout=",
    "tracking.flush_timeout=",
    "tracking.pending_dir=",
    "train.resume=",
)


def resumed_config(run_id: str, uri: str, overrides: list[str]) -> DictConfig:
    """The config run `run_id` logged, with `overrides` (those a resume may change), set to
    continue that run in the store at `uri`."""
    # hardware=cpu (a group) means hardware.device=cpu: the options are named after devices.
    overrides = [
        o.replace("hardware=", "hardware.device=", 1) if o.startswith("hardware=") else o
        for o in overrides
    ]
    other = [o for o in overrides if not o.startswith(_RESUME_MAY_CHANGE)]
    if other:
        raise CnnlabError(
            f"train.resume continues the logged config; {other[0]} can't change it (only "
            "hardware.*, data.root and where/how runs are logged, tracking.uri, "
            "tracking.request_timeout, tracking.flush_timeout, tracking.pending_dir, can); "
            "use cnnlab-reproduce for a new run"
        )
    kept = [o for o in overrides if not o.startswith(("tracking.uri=", "train.resume="))]
    cfg = typed_config(run_config(uri, run_id), kept)
    cfg.train.resume = run_id
    cfg.tracking.uri = uri
    return cfg
