"""Sweeps (`cnnlab-train -m ...`): one MLflow parent run per sweep, one child run per job.

A Hydra callback opens the parent before the first job, records its id in the sweep folder for
every job process (the joblib launcher's workers included), and at the end of the sweep gives the
parent a summary: the best child, and a CSV table of every child's params, metrics and status.

A job SLURM runs again (submitit requeues it on preemption or at its time limit, with the same
overrides) continues the run its first attempt opened, from that run's last checkpoint: each job
notes its run in its own output folder.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cnnlab.store import check_reachable, resolve_uri, say_where_it_went

# MLflow (cnnlab.tracking) and matplotlib (cnnlab.figures) are imported where a sweep uses them:
# Hydra creates the callback below for every run, a single one and `--help` too.
if TYPE_CHECKING:
    from cnnlab.tracking import Tracker

SWEEP_FILE = "cnnlab-sweep.json"  # in hydra.sweep.dir: what each job needs to find its parent
RUN_FILE = "cnnlab-run.json"  # in a job's output folder: the run it opened, for a requeued job
SEARCH_FILE = "cnnlab-search.json"  # in hydra.sweep.dir: a search's history (cnnlab.search)
TRIAL_ENV = "CNNLAB_TRIAL"  # hydra.job.env_set key: the search trial a job runs (its id)
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"

FAILED_MARK = "cnnlab-failed-{num}.txt"  # in hydra.sweep.dir, one per failed job, any process

# The sweep this process launched and its parent run, for the CLI: Hydra swallows errors in
# callbacks and skips on_multirun_end when a sweep aborts, so the CLI counts failures and
# closes a parent left open itself.
_sweep_dir: Path | None = None
_open_parent: Tracker | None = None


def selection_metric(config: DictConfig) -> str:
    """What the entrypoint returns and sweeps select on: validation accuracy where data.val_size
    holds a validation split out, else test accuracy (as before data.val_size existed)."""
    held_out = OmegaConf.select(config, "data.val_size", default=0)
    return "val_accuracy" if held_out else "test_accuracy"


def handed_trial() -> str | None:
    """The id of the search trial this sweep job runs (cnnlab.search hands it), or None."""
    if not in_sweep():
        return None
    return HydraConfig.get().job.env_set.get(TRIAL_ENV)


def swept_keys(overrides: list[str], sweeper: DictConfig) -> list[str]:
    """The keys a sweep varies: `key=a,b` style overrides and a search sweeper's params."""
    keys = [
        o.get_key_element()
        for o in OverridesParser.create().parse_overrides(overrides)
        if o.is_sweep_override()
    ]
    return keys + [k for k in (sweeper.get("params") or {}) if k not in keys]


class SweepCallback(Callback):
    """Opens the sweep's parent run, and closes it with a summary of its children."""

    def __init__(self) -> None:
        self.parent: Tracker | None = None
        self.swept: list[str] = []
        self.metric = "test_accuracy"
        self.sweep_dir = Path()
        self.log_figures = False  # the sweep's tracking.log_figures and register_as
        self.register_as: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Create the parent run before any job starts (and the store, so jobs never race)."""
        global _sweep_dir, _open_parent
        _sweep_dir = Path(config.hydra.sweep.dir)
        # A search resumed in its folder: the jobs that failed before are not this sweep's.
        for mark in _sweep_dir.glob(FAILED_MARK.format(num="*")):
            mark.unlink(missing_ok=True)
        if not config.tracking.enabled:
            return
        launch_dir = Path.cwd()  # Hydra moves into a job's folder only when the job runs
        uri = resolve_uri(config.tracking.uri, launch_dir)
        check_reachable(uri)
        overrides = list(config.hydra.overrides.task)
        self.swept = swept_keys(overrides, config.hydra.sweeper)
        self.metric = selection_metric(config)
        self.sweep_dir = sweep_dir = Path(config.hydra.sweep.dir)
        label = " ".join(o for o in overrides if o.split("=", 1)[0] in self.swept)
        search = config.hydra.sweeper.get("study_name")
        name = f"sweep {search or label or sweep_dir.name}"[:250]
        tags = {
            "cnnlab.role": "sweep",
            "cnnlab.overrides": " ".join(overrides),
            "cnnlab.sweep_dir": str(sweep_dir.resolve()),
            "cnnlab.swept": ",".join(self.swept),
            "cnnlab.selection_metric": self.metric,
        }
        self.log_figures = config.tracking.log_figures
        self.register_as = config.tracking.register_as
        from cnnlab.tracking import create_run

        self.parent = _open_parent = create_run(
            uri,
            config.tracking.experiment,
            name,
            tags,
            launch_dir / config.tracking.pending_dir,
            config.tracking.flush_timeout,
        )
        sweep_dir.mkdir(parents=True, exist_ok=True)
        record = {"parent_run_id": self.parent.run_id, "uri": uri, "swept": self.swept}
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(record))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Log the summary on the parent and close it: FAILED if any job failed."""
        if self.parent is None:
            return
        parent = self.parent
        try:
            self._summarize(parent)
        finally:
            status = "FAILED" if failed_jobs() else "FINISHED"
            end_open_parent(status)
            self.parent = None
        # (This is the launching process: Hydra has not moved into a job's folder.)
        say_where_it_went(parent.run_id, status, parent.uri, Path.cwd(), "Sweep parent run")

    def _summarize(self, parent: Tracker) -> None:
        children = parent.children()
        metric = self.metric
        done = [
            c for c in children
            if c["status"] == "FINISHED" and math.isfinite(c["metrics"].get(metric, math.nan))
        ]  # fmt: skip
        best = max(done, key=lambda c: c["metrics"][metric]) if done else None
        parent.log_text(summary_csv(children, self.swept, best, metric), "sweep_summary.csv")
        print(f"Sweep: {len(children)} runs, {len(failed_jobs())} jobs failed", end="")
        if best is not None:
            parent.set_tags({"cnnlab.best_run_id": best["run_id"]})
            parent.set_tags({"cnnlab.best_run_name": best["run_name"]})
            parent.set_tags({"cnnlab.best_selected_by": metric})
            parent.client.set_tag(best["run_id"], "cnnlab.selected_by", metric)
            parent.log_params({f"best.{k}": v for k, v in best["values"].items()})
            # Test accuracy goes along for the record: it selected nothing when metric is val.
            shown = {m: v for m, v in best["metrics"].items() if m in (metric, "test_accuracy")}
            parent.log_metrics({f"best_{m}": v for m, v in shown.items()}, step=0)
            print(f"; best {best['run_name']} ({metric} {best['metrics'][metric]:.4f})", end="")
            if self.register_as:  # the jobs left it to the sweep: only the best is registered
                parent.register_model(self.register_as, "best", run_id=best["run_id"])
        print(f"; summary in parent run {parent.run_id}")
        if (self.sweep_dir / SEARCH_FILE).exists():
            log_search_history(parent, json.loads((self.sweep_dir / SEARCH_FILE).read_text()))
        if self.log_figures:
            from cnnlab.figures import sweep_figures

            for name, figure in sweep_figures(children, self.swept, metric).items():
                parent.log_figure(figure, name)


def end_open_parent(status: str) -> bool:
    """Close the parent run of this process's sweep if it is still open (idempotent); whether
    there was one."""
    global _open_parent
    if _open_parent is None:
        return False
    parent, _open_parent = _open_parent, None
    parent.end(status)
    return True


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


def summary_csv(
    children: list[dict[str, Any]], swept: list[str], best: dict | None = None, metric: str = ""
) -> str:
    """One row per child: name, id, status (PRUNED for a pruned trial), swept params, final
    metrics, error; `selected_by` names the metric that made the best child best."""
    metric_names = sorted({m for c in children for m in c["metrics"]})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["run_name", "run_id", "status", *swept, *metric_names, "error", "selected_by"])
    for c in children:
        writer.writerow(
            [c["run_name"], c["run_id"], c["state"]]
            + [c["values"].get(k, "") for k in swept]
            + [c["metrics"].get(m, "") for m in metric_names]
            + [c["error"], metric if best is not None and c is best else ""]
        )
    return out.getvalue()


def log_search_history(parent: Tracker, history: dict[str, Any]) -> None:
    """A search's history on its parent run: search_history.csv (each trial in order: state,
    value, best so far, mini-batches, params), the value and best so far as metrics whose step
    is the trial number, and how many trials completed, were pruned or failed."""
    trials = history["trials"]
    params = sorted({k for t in trials for k in t["params"]})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", "state", history["metric"], "best_so_far", "minibatches", *params,
                     "run_id"])  # fmt: skip
    for t in trials:
        row = [t["trial"], t["state"], t["value"], t["best_so_far"], t["minibatches"]]
        writer.writerow([*("" if v is None else v for v in row),
                         *(t["params"].get(k, "") for k in params), t["run_id"]])  # fmt: skip
        if t["value"] is not None:
            parent.log_metrics({"search_value": t["value"]}, step=t["trial"])
        if t["best_so_far"] is not None:
            parent.log_metrics({"search_best_so_far": t["best_so_far"]}, step=t["trial"])
    parent.log_text(out.getvalue(), "search_history.csv")
    states = [t["state"] for t in trials]
    counts = {
        "search_completed": states.count("COMPLETE"),
        "search_pruned": states.count("PRUNED"),
        "search_failed": len(states) - states.count("COMPLETE") - states.count("PRUNED"),
        "search_minibatches": sum(t["minibatches"] for t in trials),
    }
    parent.log_metrics(counts, step=0)
    print(
        f"Search {history['study']}: {len(trials)} trials, {counts['search_completed']} "
        f"completed, {counts['search_pruned']} pruned, {counts['search_failed']} failed; "
        f"{counts['search_minibatches']} mini-batches trained"
    )


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


def requeued_run(uri: str, spool: Path) -> str | None:
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
    from cnnlab.tracking import attach_run, run_state

    # Attached first: a checkpoint the store could not take before the job stopped waits in
    # the spool, and attaching delivers it.
    run = attach_run(uri, record["run_id"], spool)
    # (What train.resumed_run continues from.)
    status, has_checkpoint = run_state(uri, record["run_id"], "checkpoints/last.pt")
    if status == "FINISHED":
        return None
    if not has_checkpoint:
        run.set_tags({"cnnlab.error": "stopped before its first checkpoint; requeued as a new run"})
        run.end("KILLED")
        return None
    print(f"Requeued job: continuing its run {record['run_id']}")
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
    print(f"cnnlab-train: job #{num} failed: {error}", file=sys.stderr)
    run_file = sweep_dir / str(config.hydra.sweep.subdir) / RUN_FILE
    sweep_file = sweep_dir / SWEEP_FILE
    if run_file.exists() and sweep_file.exists():
        uri = json.loads(sweep_file.read_text())["uri"]
        run_id = json.loads(run_file.read_text())["run_id"]
        from cnnlab.tracking import attach_run

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
