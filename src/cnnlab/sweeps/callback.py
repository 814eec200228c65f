"""The sweep's parent run: opened before the first job, closed with the summary of its children
(best run, CSV, figures, the search's history)."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cnnlab.config.compose import resolve_uri
from cnnlab.sweeps.jobs import FAILED_MARK, SEARCH_FILE, SWEEP_FILE, failed_jobs, launched
from cnnlab.tracking.store import check_reachable, say_where_it_went

# MLflow (cnnlab.tracking) and matplotlib (cnnlab.figures) are imported where a sweep uses them:
# Hydra creates the callback below for every run, a single one and `--help` too.
if TYPE_CHECKING:
    from cnnlab.tracking.run import Tracker

log = logging.getLogger(__name__)


# The parent run this process opened, for the CLI: Hydra swallows errors in callbacks and skips
# on_multirun_end when a sweep aborts, so the CLI closes a parent left open itself.
_open_parent: Tracker | None = None


def selection_metric(config: DictConfig) -> str:
    """What the entrypoint returns and sweeps select on: validation accuracy where data.val_size
    holds a validation split out, else test accuracy (as before data.val_size existed)."""
    held_out = OmegaConf.select(config, "data.val_size", default=0)
    return "val_accuracy" if held_out else "test_accuracy"


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
        global _open_parent
        sweep_dir = launched(Path(config.hydra.sweep.dir))
        # A search resumed in its folder: the jobs that failed before are not this sweep's.
        for mark in sweep_dir.glob(FAILED_MARK.format(num="*")):
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
        from cnnlab.tracking.run import create_run

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
        said = f"Sweep: {len(children)} runs, {len(failed_jobs())} jobs failed"
        if best is not None:
            parent.set_tags({"cnnlab.best_run_id": best["run_id"]})
            parent.set_tags({"cnnlab.best_run_name": best["run_name"]})
            parent.set_tags({"cnnlab.best_selected_by": metric})
            parent.client.set_tag(best["run_id"], "cnnlab.selected_by", metric)
            parent.log_params({f"best.{k}": v for k, v in best["values"].items()})
            # Test accuracy goes along for the record: it selected nothing when metric is val.
            shown = {m: v for m, v in best["metrics"].items() if m in (metric, "test_accuracy")}
            parent.log_metrics({f"best_{m}": v for m, v in shown.items()}, step=0)
            said += f"; best {best['run_name']} ({metric} {best['metrics'][metric]:.4f})"
            if self.register_as:  # the jobs left it to the sweep: only the best is registered
                parent.register_model(self.register_as, "best", run_id=best["run_id"])
        log.info("%s; summary in parent run %s", said, parent.run_id)
        if (self.sweep_dir / SEARCH_FILE).exists():
            log_search_history(parent, json.loads((self.sweep_dir / SEARCH_FILE).read_text()))
        if self.log_figures:
            from cnnlab.tracking.figures import sweep_figures

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
    log.info(
        "Search %s: %d trials, %d completed, %d pruned, %d failed; %d mini-batches trained",
        history["study"], len(trials), counts["search_completed"], counts["search_pruned"],
        counts["search_failed"], counts["search_minibatches"],
    )  # fmt: skip
