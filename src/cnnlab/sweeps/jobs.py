"""Sweeps (`cnnlab-train -m ...`): one MLflow parent run per sweep, one child run per job.

A Hydra callback opens the parent before the first job, records its id in the sweep folder for
every job process (the joblib launcher's workers included), and at the end of the sweep gives the
parent a summary: the best child, and a CSV table of every child's params, metrics and status.

A job SLURM runs again (submitit requeues it on preemption or at its time limit, with the same
overrides) continues the run its first attempt opened, from that run's last checkpoint: each job
notes its run in its own output folder.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger(__name__)

SWEEP_FILE = "cnnlab-sweep.json"  # in hydra.sweep.dir: what each job needs to find its parent


RUN_FILE = "cnnlab-run.json"  # in a job's output folder: the run it opened, for a requeued job


SEARCH_FILE = "cnnlab-search.json"  # in hydra.sweep.dir: a search's history (cnnlab.search)


TRIAL_ENV = "CNNLAB_TRIAL"  # hydra.job.env_set key: the search trial a job runs (its id)


FAILED_MARK = "cnnlab-failed-{num}.txt"  # in hydra.sweep.dir, one per failed job, any process

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"

# The sweep this process launched (SweepCallback sets it), for the CLI: Hydra swallows errors in
# callbacks and skips on_multirun_end when a sweep aborts, so the CLI counts failures itself.
_sweep_dir: Path | None = None


def launched(sweep_dir: Path) -> Path:
    """Note `sweep_dir` as the sweep this process launched (failed_jobs looks there)."""
    global _sweep_dir
    _sweep_dir = sweep_dir
    return sweep_dir


def handed_trial() -> str | None:
    """The id of the search trial this sweep job runs (cnnlab.search hands it), or None."""
    if not in_sweep():
        return None
    return HydraConfig.get().job.env_set.get(TRIAL_ENV)


def record_failure(exc: BaseException) -> None:
    """Leave a mark in the sweep folder that this job failed, for the sweep's exit status."""
    hc = HydraConfig.get()
    mark = job_sweep_dir() / FAILED_MARK.format(num=hc.job.num)
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.write_text(f"#{hc.job.num} {' '.join(hc.overrides.task)}\n{type(exc).__name__}: {exc}\n")


def failed_jobs() -> list[str]:
    """The overrides of each failed job of this process's last sweep (any launcher)."""
    if _sweep_dir is None or not _sweep_dir.is_dir():
        return []
    marks = sorted(_sweep_dir.glob(FAILED_MARK.format(num="*")))
    return [m.read_text().splitlines()[0] for m in marks]


def in_sweep() -> bool:
    """Whether this process runs a job of a multirun."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_sweep_dir() -> Path:
    """This job's sweep folder, also from a job run with hydra.job.chdir=true (hydra.sweep.dir
    is relative to the launch folder, not to the job's)."""
    hc = HydraConfig.get()
    return Path(hc.runtime.cwd) / hc.sweep.dir


def _sweep_record() -> dict[str, Any] | None:
    """What the launching process wrote in the sweep folder (parent run, swept keys), if any."""
    if not in_sweep():
        return None
    record_file = job_sweep_dir() / SWEEP_FILE
    return json.loads(record_file.read_text()) if record_file.exists() else None


def job_tags() -> tuple[dict[str, str], str | None]:
    """(tags, run name) that place this job's run under its sweep's parent; ({}, None) if none."""
    record = _sweep_record()
    if record is None:
        return {}, None
    pairs = [o.split("=", 1) for o in HydraConfig.get().overrides.task if "=" in o]
    values = {key: value for key, value in pairs if key in record["swept"]}
    tags = {
        "mlflow.parentRunId": record["parent_run_id"],  # MLflow's UI nests the run under it
        "cnnlab.sweep_values": json.dumps(values),
    }
    # Named from what differs between jobs, e.g. "optimizer=sgd,optimizer.lr=0.001".
    return tags, ",".join(f"{k}={v}" for k, v in values.items()) or None


def remember_job_run(run_id: str) -> None:
    """Note in the job's output folder that it opened run `run_id` (no-op outside a sweep)."""
    record = _sweep_record()
    if record is None:
        return
    folder = Path(HydraConfig.get().runtime.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_FILE).write_text(
        json.dumps({"run_id": run_id, "parent_run_id": record["parent_run_id"]})
    )


def requeued_run(uri: str, pending_dir: Path) -> str | None:
    """The run this job continues if SLURM is running it again (requeued), else None.

    That is the run an earlier attempt of this job, in this sweep, opened and did not finish. If
    it stopped before its first checkpoint there is nothing to continue: it is closed KILLED and
    the job starts a new run.
    """
    sweep_record = _sweep_record()
    run_file = Path(HydraConfig.get().runtime.output_dir) / RUN_FILE if sweep_record else None
    if run_file is None or not run_file.exists():
        return None
    record = json.loads(run_file.read_text())
    if record["parent_run_id"] != sweep_record["parent_run_id"]:
        return None  # left by another sweep into the same folder: not this job's
    from cnnlab.tracking.queries import run_state
    from cnnlab.tracking.run import attach_run

    # Attached first: a checkpoint the store could not take before the job stopped waits in
    # the pending_dir, and attaching delivers it.
    run = attach_run(uri, record["run_id"], pending_dir)
    # (What train.resumed_run continues from.)
    status, has_checkpoint = run_state(uri, record["run_id"], "checkpoints/last.pt")
    if status == "FINISHED":
        return None
    if not has_checkpoint:
        run.set_tags({"cnnlab.error": "stopped before its first checkpoint; requeued as a new run"})
        run.end("KILLED")
        return None
    log.info("Requeued job: continuing its run %s", record["run_id"])
    return record["run_id"]


def lost_job(config: DictConfig, overrides: Sequence[str], error: str) -> JobReturn:
    """The result of a job whose process died without one (SIGKILL, out of memory, its node
    lost), as a launcher reports it: a failure mark, the job's run (if it opened one) closed
    FAILED with `error`, and a failed result: NaN under the basic sweeper, which would abort
    the sweep on a raised error, else the error (a search sweeper records a failed trial)."""
    sweep_dir = Path(config.hydra.sweep.dir)
    num = config.hydra.job.num
    mark = sweep_dir / FAILED_MARK.format(num=num)
    mark.write_text(f"#{num} {' '.join(overrides)}\n{error}\n")
    log.error("cnnlab-train: job #%s failed: %s", num, error)
    run_file = sweep_dir / str(config.hydra.sweep.subdir) / RUN_FILE
    sweep_file = sweep_dir / SWEEP_FILE
    if run_file.exists() and sweep_file.exists():
        uri = json.loads(sweep_file.read_text())["uri"]
        run_id = json.loads(run_file.read_text())["run_id"]
        from cnnlab.tracking.run import attach_run

        run = attach_run(uri, run_id, Path.cwd() / config.tracking.pending_dir)
        if run.status() == "RUNNING":  # nobody is left to end it
            run.set_tags({"cnnlab.error": error[:5000]})
            run.end("FAILED")
    if config.hydra.sweeper._target_ == BASIC_SWEEPER:
        return JobReturn(list(overrides), status=JobStatus.COMPLETED, _return_value=math.nan)
    return JobReturn(list(overrides), status=JobStatus.FAILED, _return_value=RuntimeError(error))


def nan_for_a_failed_job() -> bool:
    """Whether a failed job should return NaN rather than raise.

    Hydra's basic sweeper aborts the sweep when a job raises; returning NaN lets the other jobs
    and the summary go on. Search sweepers (Optuna) record a raised job as a failed trial.
    """
    return in_sweep() and HydraConfig.get().sweeper._target_ == BASIC_SWEEPER
