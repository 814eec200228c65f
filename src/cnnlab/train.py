"""What cnnlab-train runs once its config is composed and checked (cnnlab.train_cli): load the
data, build the model, open the run, fit, log the results."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cnnlab import (
    CnnlabError,
    TrialPruned,
    checkpoint,
    distributed,
    interrupts,
    one_line,
    schema,
    sweep,
)
from cnnlab.catalog import IDX_SETS
from cnnlab.checkpoint import Progress
from cnnlab.cli import launch_dir, launch_path, store_uri
from cnnlab.data import Dataset, Split, data_arguments, load_dataset
from cnnlab.distributed import World, world_from_env
from cnnlab.hardware import setup_hardware
from cnnlab.loop import TrainingInterrupted, evaluate, predicted, train_one_epoch
from cnnlab.models import configured_network
from cnnlab.preprocess import Augment, on_device, to_float
from cnnlab.provenance import (
    command_line_overrides,
    dataset_inputs,
    description,
    log_config,
    requirements,
    run_tags,
)
from cnnlab.step import TrainStep, flat_parameters
from cnnlab.store import (
    check_reachable,
    move_credentials_to_env,
    say_where_it_went,
    set_request_timeout,
)
from cnnlab.sweep import in_sweep, job_tags, remember_job_run, requeued_run
from cnnlab.tracking import (
    NullTracker,
    Tracker,
    attach_run,
    closing_run,
    create_run,
    run_config,
    system_metrics,
)

if TYPE_CHECKING:
    from cnnlab.search import TrialReport


def train(cfg: DictConfig, extra_tags: dict[str, str] | None = None) -> float:
    """Train the configured model and log the run; return the final accuracy sweeps select on:
    validation accuracy with a validation split (data.val_size), else test accuracy.

    Under torchrun, every rank calls this: rank 0 logs the one run, the others train their
    share of each batch in step with it (cnnlab.distributed) and return NaN.
    """
    world = world_from_env()
    distributed.start(world)
    try:
        with contextlib.ExitStack() as stack:
            if not world.main:  # the article's output once, from rank 0
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(
                    open(os.devnull, "w"))))  # fmt: skip
            return _train(cfg, world, extra_tags)
    finally:
        distributed.stop()


def _train(cfg: DictConfig, world: World, extra_tags: dict[str, str] | None) -> float:
    # Relative paths are the launch directory's, should hydra.job.chdir=true have moved away.
    if cfg.tracking.uri:  # a password in the URI goes to the environment, never into the logs
        cfg.tracking.uri = move_credentials_to_env(cfg.tracking.uri)
    uri = store_uri(cfg)
    set_request_timeout(cfg.tracking.request_timeout)
    if world.main:  # the only rank that opens the store
        if cfg.tracking.enabled or cfg.train.resume:
            check_reachable(uri)  # seconds, not a whole epoch, to learn the server is down
        if cfg.train.resume:  # the run's own config, not today's conf/
            cfg = resumed_config(cfg.train.resume, uri, command_line_overrides())
        elif cfg.tracking.enabled and in_sweep():
            # A sweep job SLURM runs again (requeued) continues its run, from its last
            # checkpoint; the job's overrides configured that run, so there are none to check.
            if run_id := requeued_run(uri, launch_path(cfg.tracking.pending_dir)):
                cfg = resumed_config(run_id, uri, overrides=[])
    if world.distributed and cfg.train.resume:  # the others take the run's config from rank 0
        cfg = schema.typed_config(distributed.broadcast(OmegaConf.to_container(cfg)), [])
    schema.validate(cfg)
    distributed.check_job(cfg, world, in_sweep())
    # hardware.threads=0: the CPUs a Ray task or SLURM job was given, else torch's default (in
    # a joblib worker cores // parallel jobs: loky starts workers with OMP_NUM_THREADS so).
    device = distributed.rank_device(setup_hardware(cfg.hardware), world)

    with distributed.in_turn(world):  # no two ranks fetch into one folder at once
        data = load_dataset(**data_arguments(cfg.data, launch_path(cfg.data.root)))
    train_split, test_split = on_device(data.train, device), on_device(data.test, device)
    val_split = on_device(data.val, device) if data.val is not None else None
    if cfg.train.overfit_batches:  # a few fixed batches: can the model fit them at all?
        train_split = first(train_split, cfg.train.overfit_batches * cfg.train.batch_size)
    if cfg.train.limit_eval_batches:
        test_split = first(test_split, cfg.train.limit_eval_batches * cfg.train.eval_batch_size)

    model, optimizer = build_model(cfg, data, device)

    trial = search_trial(cfg)
    if trial is not None:
        extra_tags = {**(extra_tags or {}), **trial.tags}
    spool = launch_path(cfg.tracking.pending_dir)
    with open_run(cfg, uri, spool, device, data.checksum, extra_tags, model, optimizer, world) as (
        run,
        progress,
    ):
        progress = distributed.same_start(world, model, optimizer, progress)  # rank 0's
        if not cfg.train.resume:
            run.log_dict(data.classes, "data/classes.yaml")  # names by label, e.g. ImageFolder's
            # The UI's Dataset column.
            run.log_inputs(dataset_inputs(cfg.data.name, data, cfg.data.val_size))
        if trial is not None and run.run_id:
            trial.note_run(run.run_id)
        accuracy = fit(
            cfg, model, optimizer, train_split, test_split, run, progress, world, val_split, trial
        )
        if cfg.train.overfit_batches:
            per_epoch = batches_per_epoch(len(train_split), cfg.train.batch_size,
                                          cfg.train.limit_batches)  # fmt: skip
            check_overfit(model, train_split, cfg.train, run, step=cfg.train.epochs * per_epoch)
        log_results(cfg, run, model, data, test_split, accuracy)
        print("Training process has finished.")
    return accuracy


def log_results(
    cfg: DictConfig,
    run: Tracker | NullTracker,
    model: torch.nn.Module,
    data: Dataset,
    test_split: Split,
    accuracy: float,
) -> None:
    """What a trained run logs: its description with the result, figures of its mistakes on
    the test split, the model, and the model's registered version."""
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
        if cfg.tracking.register_as and not in_sweep():  # a sweep registers its best run's
            run.register_model(cfg.tracking.register_as, cfg.tracking.register_alias)
    if cfg.tracking.log_figures:  # last, and never at the cost of the run: pictures only
        from cnnlab.figures import prediction_figures  # matplotlib: only once there is a result

        guesses = predicted(model, test_split, cfg.train.eval_batch_size)
        try:
            drawn = prediction_figures(test_split.images, test_split.labels, guesses, data.classes)
            for name, figure in drawn.items():
                run.log_figure(figure, name)
        except (ValueError, RuntimeError, OSError) as exc:  # e.g. a class name matplotlib can't
            print(f"warning: no figures for this run: {one_line(exc)}", file=sys.stderr)


def search_trial(cfg: DictConfig) -> TrialReport | None:
    """The search trial this sweep job runs (reports, pruning), or None outside a search."""
    trial_id = sweep.handed_trial()
    if trial_id is None:
        return None
    from cnnlab.search import job_trial  # Optuna: imported by a search's jobs only

    return job_trial(trial_id, cfg.train.log_every)


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


def fit(
    cfg: DictConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_split: Split,
    test_split: Split,
    run: Tracker | NullTracker,
    progress: Progress,
    world: World = distributed.SINGLE,
    val_split: Split | None = None,
    trial: TrialReport | None = None,
) -> float:
    """Train the epochs from `progress` on, logging as it goes; checkpoint each epoch and on a
    stop. Returns the selection accuracy: on `val_split` if given, else on `test_split`. Under
    torchrun, rank 0 alone evaluates, logs and checkpoints (NaN elsewhere).

    A search's `trial` gets that accuracy at each epoch's end and, where it prunes, at each
    logged step; when its pruner says stop, the run is checkpointed as on Ctrl-C and
    TrialPruned raised.
    """
    # Metrics' step: mini-batches trained so far, as if each epoch had `per_epoch` of them.
    per_epoch = batches_per_epoch(len(train_split), cfg.train.batch_size, cfg.train.limit_batches)
    selection = val_split if val_split is not None else test_split
    prefix = "val" if val_split is not None else "test"  # its metrics' names
    accuracy = math.nan
    if progress.epoch >= cfg.train.epochs and world.main:  # a resumed run with no epoch left
        accuracy = evaluate(model, selection, cfg.train.eval_batch_size)[1]
    show_bar = sys.stderr.isatty() and world.main
    step = training_step(cfg, model, optimizer, train_split, world)
    # The loss of an unfinished log window: each rank's losses are summed at the window's end.
    running = progress.running if world.main else 0.0
    pruned: TrialPruned | None = None
    with interrupts.stop_requests() as stop, tempfile.TemporaryDirectory() as tmp:
        # A pruned trial stops after the current mini-batch, the way a stop request does; under
        # torchrun the ranks agree on the mini-batch.
        halt = distributed.agreed(
            stop if trial is None else lambda: pruned is not None or stop(), world
        )
        last = Path(tmp) / "last.pt"
        first_epoch = progress.epoch  # this process's first: always printed
        for epoch in range(first_epoch, cfg.train.epochs):
            resuming = f" (resuming at mini-batch {progress.batch + 1})" if progress.batch else ""
            # Every epoch's lines, as the article prints them; a long run every Nth epoch's.
            shown = epoch == first_epoch or (epoch + 1) % cfg.train.print_every_epochs == 0
            say = print if shown or epoch + 1 == cfg.train.epochs else _quiet
            say(f"Starting epoch {epoch + 1}{resuming}")
            torch.set_rng_state(progress.rng)  # an epoch cut short re-draws the same order
            try:
                for batch, loss in train_one_epoch(
                    step, cfg.train.log_every, show_bar, progress.batch, running, halt,
                    batches=per_epoch,
                ):  # fmt: skip
                    say(f"Loss after mini-batch {batch:5d}: {loss:.3f}")
                    run.log_metrics({"train_loss": loss}, step=epoch * per_epoch + batch)
                    if trial is not None and trial.pruning and batch < per_epoch:
                        at = epoch * per_epoch + batch  # (the epoch's end reports below)
                        accuracy = evaluate_during_epoch(cfg, model, selection, prefix, run, at)
                        pruned = trial.check(at, accuracy)
            except TrainingInterrupted as stopped:
                if world.main:
                    progress = Progress(epoch, *stopped.args_for_resume())
                    checkpoint.save(last, model, optimizer, progress)
                    run.log_checkpoint(last)
                if pruned is not None:
                    print(f"Trial {pruned}")
                    raise pruned from None  # the run ends KILLED, tagged PRUNED; resumable
                # The run ends KILLED, resumable; another rank's signal stops this one too.
                raise interrupts.Terminated(stop() or signal.SIGTERM) from None
            distributed.same_rng(world)  # a rank's dropout on its own slice moved its RNG
            progress, running = Progress(epoch + 1), 0.0  # from its first batch, RNG as it is
            if not world.main:
                continue
            test_loss, accuracy = evaluate(model, test_split, cfg.train.eval_batch_size)
            say(f"Epoch {epoch + 1}: test loss {test_loss:.4f}, test accuracy {accuracy:.2%}")
            metrics = {"test_loss": test_loss, "test_accuracy": accuracy, "epoch": epoch + 1}
            if val_split is not None:
                val_loss, accuracy = evaluate(model, val_split, cfg.train.eval_batch_size)
                say(f"Epoch {epoch + 1}: validation loss {val_loss:.4f}, "
                      f"validation accuracy {accuracy:.2%}")  # fmt: skip
                metrics.update(val_loss=val_loss, val_accuracy=accuracy)
            at = (epoch + 1) * per_epoch
            run.log_metrics(metrics, step=at)
            checkpoint.save(last, model, optimizer, progress)
            run.log_checkpoint(last)
            final = epoch + 1 == cfg.train.epochs  # reported, but too late to prune
            if trial is not None and (pruned := trial.check(at, accuracy, final)):
                print(f"Trial {pruned}")
                raise pruned  # after the epoch's checkpoint: the run ends KILLED, tagged PRUNED
    return accuracy


def _quiet(*_: object) -> None:
    """An epoch's lines where train.print_every_epochs skips them (they are logged all the same)."""


def evaluate_during_epoch(
    cfg: DictConfig, model: torch.nn.Module, selection: Split, prefix: str,
    run: Tracker | NullTracker, step: int,
) -> float:  # fmt: skip
    """Accuracy on the selection split mid-epoch (a pruned search's logged step), logged as
    `prefix`_loss and _accuracy; the model is left training."""
    loss, accuracy = evaluate(model, selection, cfg.train.eval_batch_size)
    model.train()
    run.log_metrics({f"{prefix}_loss": loss, f"{prefix}_accuracy": accuracy}, step=step)
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
    model: torch.nn.Module, samples: Split, train_cfg: DictConfig, run: Tracker | NullTracker,
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
    print(f"Overfit check passed: {what} (< {OVERFIT_LOSS})")
    return loss


@contextmanager
def open_run(
    cfg: DictConfig,
    uri: str,
    spool: Path,
    device: torch.device,
    data_checksum: str,
    extra_tags: dict[str, str] | None,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    world: World = distributed.SINGLE,
) -> Iterator[tuple[Tracker | NullTracker, Progress]]:
    """A new run with its params and config logged, or the resumed run at its checkpoint (a
    torchrun rank other than 0: no run).

    While it is open, Ctrl-C, SIGTERM and SIGHUP end it KILLED wherever the code is.
    """
    with interrupts.handled():
        if not world.main:
            run, progress = NullTracker(), Progress()
        elif cfg.train.resume:
            run, progress = resumed_run(cfg, uri, spool, model, optimizer)
        elif cfg.tracking.enabled:
            tags = {**run_tags(cfg, device, data_checksum), **(extra_tags or {})}
            sweep_tags, job_name = job_tags()
            tags.update(sweep_tags)
            run_name = cfg.tracking.run_name or job_name
            run = create_run(
                uri, cfg.tracking.experiment, run_name, tags, spool, cfg.tracking.flush_timeout
            )
            remember_job_run(run.run_id)  # a sweep job run again continues this run
            progress = Progress()  # RNG state now: right after the model's initialisation
        else:
            run, progress = NullTracker(), Progress()
        interval = cfg.tracking.system_metrics_interval if cfg.tracking.system_metrics else None
        pruned = False  # a search's pruned trial: the search reports it, nothing to continue
        try:
            with closing_run(run), system_metrics(run, interval, resumed=bool(cfg.train.resume)):
                if not cfg.train.resume:
                    log_config(run, cfg)
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
    spool: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> tuple[Tracker, Progress]:
    """The run `train.resume` names, RUNNING again, with model and optimizer at its checkpoint."""
    run = attach_run(uri, cfg.train.resume, spool, cfg.tracking.flush_timeout)
    with tempfile.TemporaryDirectory() as tmp:
        path = run.download("checkpoints/last.pt", Path(tmp))
        if path is None:
            raise CnnlabError(f"run {run.run_id} has no checkpoint to resume from")
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
    cfg = schema.typed_config(run_config(uri, run_id), kept)
    cfg.train.resume = run_id
    cfg.tracking.uri = uri
    return cfg
