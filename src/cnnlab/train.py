"""The recipe cnnlab-train runs once its config is composed and checked (cnnlab.commands.train):
settle the config, load the data, build the model, open the run, fit, log the results."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf

from cnnlab.config.compose import launch_path, store_uri
from cnnlab.config.validate import typed_config, validate
from cnnlab.data.load import data_arguments, load_dataset
from cnnlab.data.preprocess import on_device
from cnnlab.data.splits import Dataset, Split
from cnnlab.sweeps.jobs import handed_trial, in_sweep, job_tags, remember_job_run, requeued_run
from cnnlab.tracking.lifecycle import AnyTracker, log_results, open_run, resumed_config
from cnnlab.tracking.provenance import command_line_overrides, dataset_inputs, run_tags
from cnnlab.tracking.run import deliver_left
from cnnlab.tracking.store import check_reachable, move_credentials_to_env, set_request_timeout
from cnnlab.training import distributed
from cnnlab.training.distributed import World, world_from_env
from cnnlab.training.fit import batches_per_epoch, build_model, check_overfit, first, fit
from cnnlab.training.hardware import setup_hardware

if TYPE_CHECKING:
    from cnnlab.sweeps.study import TrialReport


def train(
    cfg: DictConfig,
    extra_tags: dict[str, str] | None = None,
    wrap_run: Callable[[AnyTracker], AnyTracker] | None = None,
) -> float:
    """Train the configured model and log the run; return the final accuracy sweeps select on:
    validation accuracy with a validation split (data.val_size), else test accuracy.

    Under torchrun, every rank calls this: rank 0 logs the one run, the others train their
    share of each batch in step with it (cnnlab.training.distributed) and return NaN.
    `wrap_run` may wrap the run's writer (cnnlab-bench times its calls so).
    """
    world = world_from_env()
    distributed.start(world)
    try:
        with contextlib.ExitStack() as stack:
            if not world.main:  # the article's output and the notices once, from rank 0
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(
                    open(os.devnull, "w"))))  # fmt: skip
                logging.getLogger("cnnlab").setLevel(logging.WARNING)
            return _train(cfg, world, extra_tags, wrap_run)
    finally:
        distributed.stop()


def _train(
    cfg: DictConfig,
    world: World,
    extra_tags: dict[str, str] | None,
    wrap_run: Callable[[AnyTracker], AnyTracker] | None,
) -> float:
    cfg, uri = settled_config(cfg, world)
    # hardware.threads=0: the CPUs a Ray task or SLURM job was given, else torch's default (in
    # a joblib worker cores // parallel jobs: loky starts workers with OMP_NUM_THREADS so).
    device = distributed.rank_device(setup_hardware(cfg.hardware), world)
    with distributed.in_turn(world):  # no two ranks fetch into one folder at once
        data = load_dataset(**data_arguments(cfg.data, launch_path(cfg.data.root)))
    train_split, test_split, val_split = splits_on(device, data, cfg)
    model, optimizer = build_model(cfg, data, device)
    trial = search_trial(cfg)
    creates = world.main and cfg.tracking.enabled and not cfg.train.resume  # a new run
    tags, run_name = new_run_tags(cfg, device, data, extra_tags, trial) if creates else ({}, None)
    with open_run(cfg, uri, tags, run_name, model, optimizer, world, wrap_run) as (run, progress):
        if run.run_id is not None:
            if not cfg.train.resume:
                remember_job_run(run.run_id)  # a sweep job run again continues this run
            # Again on a resume (both are idempotent): a process killed at start-up may not
            # have logged them.
            run.log_dict(data.classes, "data/classes.yaml")  # names by label, e.g. ImageFolder's
            run.log_inputs(dataset_inputs(cfg.data.name, data, cfg.data.val_size))  # UI's column
        if trial is not None and run.run_id:
            trial.note_run(run.run_id)
        progress = distributed.same_start(world, model, optimizer, progress)  # rank 0's
        accuracy = fit(
            cfg, model, optimizer, train_split, test_split, run, progress, world, val_split, trial
        )
        if cfg.train.overfit_batches:
            per_epoch = batches_per_epoch(
                len(train_split), cfg.train.batch_size, cfg.train.limit_batches
            )
            check_overfit(model, train_split, cfg.train, run, step=cfg.train.epochs * per_epoch)
        log_results(cfg, run, model, data, test_split, accuracy, register=not in_sweep())
        print("Training process has finished.")
    return accuracy


def settled_config(cfg: DictConfig, world: World) -> tuple[DictConfig, str]:
    """The config to train with, validated, and the store's URI: a resumed run's own logged
    config (train.resume, or a sweep job SLURM requeued) where there is one."""
    # Relative paths are the launch directory's, should hydra.job.chdir=true have moved away.
    if cfg.tracking.uri:  # a password in the URI goes to the environment, never into the logs
        cfg.tracking.uri = move_credentials_to_env(cfg.tracking.uri)
    uri = store_uri(cfg)
    set_request_timeout(cfg.tracking.request_timeout)
    if world.main:  # the only rank that opens the store
        if cfg.tracking.enabled or cfg.train.resume:
            check_reachable(uri)  # seconds, not a whole epoch, to learn the server is down
        if cfg.train.resume:  # the run's own config, not today's conf/
            # What a killed process left undelivered first: its config may be among it.
            deliver_left(cfg.train.resume, launch_path(cfg.tracking.pending_dir))
            cfg = resumed_config(cfg.train.resume, uri, command_line_overrides())
        elif cfg.tracking.enabled and in_sweep():
            # A sweep job SLURM runs again (requeued) continues its run, from its last
            # checkpoint; the job's overrides configured that run, so there are none to check.
            if run_id := requeued_run(uri, launch_path(cfg.tracking.pending_dir)):
                cfg = resumed_config(run_id, uri, overrides=[])
    if world.distributed and cfg.train.resume:  # the others take the run's config from rank 0
        cfg = typed_config(distributed.broadcast(OmegaConf.to_container(cfg)), [])
    validate(cfg)
    distributed.check_job(cfg, world, in_sweep())
    return cfg, uri


def new_run_tags(
    cfg: DictConfig,
    device: torch.device,
    data: Dataset,
    extra_tags: dict[str, str] | None,
    trial: TrialReport | None,
) -> tuple[dict[str, str], str | None]:
    """A new run's tags (provenance, the caller's, the search trial's, the sweep job's) and
    name: tracking.run_name, else the sweep job's."""
    tags = {**run_tags(cfg, device, data.checksum), **(extra_tags or {})}
    tags.update(trial.tags if trial is not None else {})
    sweep_tags, job_name = job_tags()
    return tags | sweep_tags, cfg.tracking.run_name or job_name


def splits_on(
    device: torch.device, data: Dataset, cfg: DictConfig
) -> tuple[Split, Split, Split | None]:
    """(train, test, validation or None) on `device`, cut to what debug options train on."""
    train_split, test_split = on_device(data.train, device), on_device(data.test, device)
    val_split = on_device(data.val, device) if data.val is not None else None
    if cfg.train.overfit_batches:  # a few fixed batches: can the model fit them at all?
        train_split = first(train_split, cfg.train.overfit_batches * cfg.train.batch_size)
    if cfg.train.limit_eval_batches:
        test_split = first(test_split, cfg.train.limit_eval_batches * cfg.train.eval_batch_size)
    return train_split, test_split, val_split


def search_trial(cfg: DictConfig) -> TrialReport | None:
    """The search trial this sweep job runs (reports, pruning), or None outside a search."""
    trial_id = handed_trial()
    if trial_id is None:
        return None
    from cnnlab.sweeps.study import job_trial

    return job_trial(trial_id, cfg.train.log_every)
