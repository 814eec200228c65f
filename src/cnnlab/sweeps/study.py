"""A search's Optuna study as both sides share it: its storage, the pruners, the history of its
trials, and the job side's trial (TrialReport), which reports and asks the pruner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from cnnlab import CnnlabError, TrialPruned, one_line
from cnnlab.config.schema import PRUNERS
from cnnlab.sweeps.jobs import job_sweep_dir

STUDY_FILE = "cnnlab-study.json"  # in hydra.sweep.dir: the study and storage jobs report to


INTERRUPTED = "cnnlab.interrupted"  # user attr of a trial a stopped sweep left running


RUN_ID = "cnnlab.run_id"  # user attr: the trial's MLflow run


SQLITE_TIMEOUT = 60  # s a SQLite storage waits for another process's write (joblib workers)


_PRUNER_CLASSES = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
}


# ----------------------------------------------------------------------------------- job side
class TrialReport:
    """A search's trial as its job sees it: `check` reports a value and asks the pruner."""

    def __init__(self, trial: optuna.Trial, pruner: str) -> None:
        self.trial = trial
        self.pruner = pruner
        self.pruning = pruner != "none"  # else only epoch ends are reported, for the history

    @property
    def tags(self) -> dict[str, str]:
        """What the trial's run is tagged with: its number in its study."""
        return {"cnnlab.trial": str(self.trial.number), "cnnlab.study": self.trial.study.study_name}

    def note_run(self, run_id: str) -> None:
        """Record the trial's MLflow run in the study (the sweep's search history links it)."""
        self.trial.set_user_attr(RUN_ID, run_id)

    def check(self, step: int, value: float, final: bool = False) -> TrialPruned | None:
        """Report `value` at mini-batch `step`; a TrialPruned to raise if the pruner stops the
        trial here. The `final` report prunes nothing: the trial has trained to its end."""
        self.trial.report(value, step)
        if self.pruning and not final and self.trial.should_prune():
            return TrialPruned(step, self.pruner, value)
        return None


def job_trial(trial_id: str, log_every: int) -> TrialReport:
    """The trial with `trial_id` of this sweep job's study (cnnlab-study.json), pruned by
    hydra.sweeper.pruner."""
    hc = HydraConfig.get()
    record = json.loads((job_sweep_dir() / STUDY_FILE).read_text())
    pruner = build_pruner(hc.sweeper.pruner, hc.sweeper.pruners, log_every)
    study = optuna.load_study(
        study_name=record["study_name"],
        storage=rdb(record["storage"]),
        pruner=pruner,
        sampler=optuna.samplers.RandomSampler(),  # never asked: the sweeper samples
    )
    return TrialReport(optuna.trial.Trial(study, int(trial_id)), hc.sweeper.pruner)


# ------------------------------------------------------------------------------------- shared
def build_pruner(name: str, pruners: DictConfig, log_every: int) -> optuna.pruners.BasePruner:
    """The Optuna pruner `name` with its settings hydra.sweeper.pruners.<name>."""
    if name == "none":
        return optuna.pruners.NopPruner()
    if name not in _PRUNER_CLASSES:
        raise CnnlabError(
            f"hydra.sweeper.pruner={name} is not a pruner; choose one of {', '.join(PRUNERS)}"
        )
    args = OmegaConf.to_container(pruners[name], resolve=True)
    if name == "hyperband" and args["min_resource"] is None:
        args["min_resource"] = log_every  # the first step a trial reports
    if args.get("reduction_factor", 2) < 2:  # Optuna would only fail at the first report
        raise CnnlabError(
            f"hydra.sweeper.pruners.{name}.reduction_factor={args['reduction_factor']} is "
            "invalid: expected an integer >= 2 (each rung keeps 1/reduction_factor of trials)"
        )
    try:
        return _PRUNER_CLASSES[name](**args)
    except (ValueError, TypeError) as exc:
        raise CnnlabError(
            f"hydra.sweeper.pruners.{name}: {one_line(exc)}; fix that setting"
        ) from None


def storage_url(storage: str | None, sweep_dir: Path) -> str:
    """The study's storage: `storage`, a relative SQLite path made absolute (jobs may run
    elsewhere), or optuna.db in the sweep folder."""
    if not storage:
        return f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
    prefix = "sqlite:///"
    if storage.startswith(prefix) and not storage.startswith(prefix + "/"):
        return prefix + str(Path(storage[len(prefix) :]).resolve())
    return storage


def rdb(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at `url`; SQLite waits for other processes' writes."""
    kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def history_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """Each trial in order: state, value (a pruned one's: its last report), best so far among
    completed ones, mini-batches trained (its last reported step), params, its run."""
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    best = None
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state == TrialState.COMPLETE and (best is None or (t.value > best) == maximize):
            best = t.value
        state = "INTERRUPTED" if t.user_attrs.get(INTERRUPTED) else t.state.name
        rows.append({
            "trial": t.number, "state": state, "value": t.value, "best_so_far": best,
            "minibatches": t.last_step or 0, "params": t.params,
            "run_id": t.user_attrs.get(RUN_ID, ""),
        })  # fmt: skip
    return rows
