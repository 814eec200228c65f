"""hydra/sweeper=cnnlab_optuna: an Optuna search whose trials are pruned (hparams_search=...).

hydra-optuna-sweeper can't prune: its trial object never reaches the job. Here the sweeper asks
the study for a trial, hands the trial's id to the job (`hydra.job.env_set.CNNLAB_TRIAL`) and
the study's storage in the sweep folder (cnnlab-study.json), the way each job finds its parent
run. The job rebuilds the trial from the storage, reports the selection metric at each logged
step, and stops when the pruner says so (`TrialPruned`: its run ends KILLED, tagged); the
sweeper then tells the study PRUNED. The storage is an RDB one (SQLite in the sweep folder
unless `storage` names another, e.g. PostgreSQL), so jobs in other processes or on other
machines (joblib, SLURM, Ray) report to the same study.

Trials never wait on each other: with the joblib launcher each slot starts its next trial as
soon as its last one ends, where Hydra's Optuna sweeper launched blocking batches of n_jobs.
Other launchers (basic, SLURM, Ray), and `batched: true`, run `n_jobs` trials per launch and
wait for all of them, as it did.

Rerunning a search with the same `storage` and `study_name` (or in the same hydra.sweep.dir)
resumes it: its ended trials count towards `n_trials`, trials a stopped sweep left running are
marked failed (user attr cnnlab.interrupted) and don't.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig
from optuna.trial import TrialState

from cnnlab import CnnlabError, TrialPruned, finite_float, one_line
from cnnlab.sweeps.callback import selection_metric
from cnnlab.sweeps.jobs import SEARCH_FILE, TRIAL_ENV
from cnnlab.sweeps.space import search_space
from cnnlab.sweeps.study import (
    INTERRUPTED,
    STUDY_FILE,
    build_pruner,
    history_rows,
    rdb,
    storage_url,
)

log = logging.getLogger(__name__)


class Search:
    """The search behind CnnlabOptunaSweeper (hydra_plugins/cnnlab_search_sweeper.py); its
    arguments are hydra.sweeper's keys (cnnlab.schema.SearchSweeperConf)."""

    def __init__(
        self,
        direction: str,
        study_name: str | None,
        storage: str | None,
        n_trials: int,
        n_jobs: int | None,
        batched: bool,
        max_failure_rate: float,
        sampler: DictConfig,
        pruner: str,
        pruners: DictConfig,
        params: Mapping[str, str],
    ) -> None:
        self.direction, self.study_name, self.storage = direction, study_name, storage
        self.n_trials, self.n_jobs, self.max_failure_rate = n_trials, n_jobs, max_failure_rate
        self.batched = batched
        self.sampler_cfg, self.pruner, self.pruners = sampler, pruner, pruners
        self.params = dict(params or {})
        self.running: dict[int, optuna.Trial] = {}  # by trial number

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        """Check every setting, open (or create) the study, instantiate the launcher."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # cnnlab prints what happens
        self.config = config
        self.metric = selection_metric(config)
        _check_settings(self.direction, self.n_trials, self.n_jobs, self.max_failure_rate)
        pruner = build_pruner(self.pruner, self.pruners, config.train.log_every)
        self.space, self.fixed = search_space(
            [f"{k}={v}" for k, v in self.params.items()], "hydra.sweeper.params"
        )
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self.url = storage_url(self.storage, sweep_dir)
        try:
            self.study = optuna.create_study(
                study_name=self.study_name, storage=rdb(self.url), sampler=self._sampler(),
                pruner=pruner, direction=self.direction, load_if_exists=True,
            )  # fmt: skip
        except (ValueError, optuna.exceptions.OptunaError, ImportError, OSError) as exc:
            raise CnnlabError(
                f"hydra.sweeper.storage={_masked(self.url)}: can't open the study there "
                f"({one_line(exc)}); give a reachable sqlite:///PATH or postgresql://... URL"
            ) from None
        if self.study.direction.name.lower() != self.direction:
            raise CnnlabError(
                f"study {self.study.study_name} in {_masked(self.url)} was created to "
                f"{self.study.direction.name.lower()}; set hydra.sweeper.direction to match it "
                "or choose another hydra.sweeper.study_name"
            )
        record = {"study_name": self.study.study_name, "storage": self.url}
        (sweep_dir / STUDY_FILE).write_text(json.dumps(record))
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.slots = self.n_jobs or _launcher_slots(config.hydra.launcher)
        # Launchers that run a job in a process of its own can take one job per call from
        # several threads; only joblib's is known to be safe so (the basic launcher runs jobs
        # in this process; cnnlab's Ray launcher shuts Ray down after each call).
        self.no_wait = self.slots > 1 and _is_joblib(config.hydra.launcher) and not self.batched

    def _sampler(self) -> optuna.samplers.BaseSampler:
        target = self.sampler_cfg.get("_target_", "")
        if target.endswith("GridSampler"):
            raise CnnlabError(
                "hydra.sweeper.sampler._target_=optuna.samplers.GridSampler is not supported: "
                "for a grid use the basic sweeper (cnnlab-train -m key=a,b ...)"
            )
        try:
            return instantiate(self.sampler_cfg)
        except (HydraException, TypeError, ValueError) as exc:
            raise CnnlabError(
                f"hydra.sweeper.sampler: can't create {target} ({one_line(exc)}); give an "
                "optuna.samplers class, e.g. optuna.samplers.TPESampler"
            ) from None

    def sweep(self, arguments: list[str]) -> None:
        """Run trials until the study has n_trials ended ones; leave its history for the
        sweep's summary (sweep.SEARCH_FILE)."""
        space, fixed = search_space(arguments, "the command line")
        space, fixed = {**self.space, **space}, {**self.fixed, **fixed}
        for name in fixed:
            space.pop(name, None)
        if not space:
            raise CnnlabError(
                "the search has no parameter to vary: set hydra.sweeper.params (e.g. "
                "optimizer.lr: tag(log, interval(1e-4, 1e-1))) or use hparams_search=..."
            )
        study = self.study
        ended = self._mark_interrupted(study)
        to_go = self.n_trials - ended
        how = "each starting as soon as a slot frees" if self.no_wait else "per launch"
        resumed = f", {ended} done already (resumed)" if ended else ""
        log.info(
            "Search: study %s in %s, %d trials%s; %d at a time (%s); pruner %s; selecting on %s",
            study.study_name, _masked(self.url), self.n_trials, resumed, self.slots, how,
            self.pruner, self.metric,
        )  # fmt: skip
        try:
            if self.no_wait:
                self._run_without_waiting(study, space, fixed, to_go)
            else:
                self._run_in_batches(study, space, fixed, to_go)
        except BaseException:  # Ctrl-C, a launcher's failure: running trials won't report
            for trial in self.running.values():
                study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
                study.tell(trial, state=TrialState.FAIL)
            raise
        history = {"metric": self.metric, "study": study.study_name,
                   "trials": history_rows(study)}  # fmt: skip
        (Path(self.config.hydra.sweep.dir) / SEARCH_FILE).write_text(json.dumps(history))

    def _run_in_batches(
        self, study: optuna.Study, space: dict, fixed: dict, to_go: int
    ) -> None:  # fmt: skip
        while to_go > 0 and not self._too_many_failures(study):
            trials = [self._start(study, space, fixed) for _ in range(min(self.slots, to_go))]
            returns = self.launcher.launch([o for _, o in trials], trials[0][0].number)
            for (trial, _), ret in zip(trials, returns, strict=True):
                self._tell(study, trial, ret)
            to_go -= len(trials)

    def _run_without_waiting(
        self, study: optuna.Study, space: dict, fixed: dict, to_go: int
    ) -> None:  # fmt: skip
        # The study is asked and told in this thread only; a slot's thread just waits for its
        # job (joblib runs it in a worker process).
        pool = ThreadPoolExecutor(self.slots, thread_name_prefix="cnnlab-trial")
        launched: dict[Future, optuna.Trial] = {}
        try:
            while True:
                while to_go > 0 and len(launched) < self.slots:
                    if self._too_many_failures(study):
                        to_go = 0
                        break
                    trial, overrides = self._start(study, space, fixed)
                    launched[pool.submit(self.launcher.launch, [overrides], trial.number)] = trial
                    to_go -= 1
                if not launched:
                    break
                done, _ = wait(launched, return_when=FIRST_COMPLETED)
                for future in done:
                    self._tell(study, launched.pop(future), future.result()[0])
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _start(
        self, study: optuna.Study, space: dict, fixed: dict
    ) -> tuple[optuna.Trial, list[str]]:  # fmt: skip
        """A new trial and its job's overrides (its job number is the trial's number)."""
        trial = study.ask(space)
        self.running[trial.number] = trial
        values = {**trial.params, **fixed}
        # `++`: env_set is a dict Hydra's schema types; the job reads its trial id from it.
        hand_off = f"++hydra.job.env_set.{TRIAL_ENV}={trial._trial_id}"
        return trial, [*(f"{k}={v}" for k, v in values.items()), hand_off]

    def _tell(self, study: optuna.Study, trial: optuna.Trial, ret: JobReturn) -> None:
        """Tell the study how the trial's job ended: COMPLETE with its value, PRUNED, FAIL."""
        self.running.pop(trial.number, None)
        if ret.status == JobStatus.COMPLETED:
            value = finite_float(ret._return_value)
            if value is not None:
                study.tell(trial, value)
                return
            why = f"returned {ret._return_value!r}, not a number"
        elif isinstance(ret._return_value, TrialPruned):
            study.tell(trial, state=TrialState.PRUNED)  # its value: the last one it reported
            return
        else:
            why = one_line(ret._return_value)
        log.warning(f"Trial {trial.number} failed: {why}")
        study.tell(trial, state=TrialState.FAIL)

    def _too_many_failures(self, study: optuna.Study) -> bool:
        trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        trials = [t for t in trials if not t.user_attrs.get(INTERRUPTED)]
        failed = sum(t.state == TrialState.FAIL for t in trials)
        if not failed or failed / len(trials) <= self.max_failure_rate:
            return False
        log.warning(
            "Search: %d of %d trials failed, more than hydra.sweeper.max_failure_rate=%s; "
            "starting no more trials", failed, len(trials), self.max_failure_rate,
        )  # fmt: skip
        return True

    def _mark_interrupted(self, study: optuna.Study) -> int:
        """Fail the trials an earlier, stopped sweep left running; how many trials ended."""
        ended = 0
        for trial in study.get_trials(deepcopy=False):
            if trial.state in (TrialState.RUNNING, TrialState.WAITING):
                study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
                study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                log.info(
                    "Search: trial %d was left running by a stopped sweep: failed", trial.number
                )
            elif not trial.user_attrs.get(INTERRUPTED):
                ended += 1
        return ended


def _check_settings(direction: str, n_trials: int, n_jobs: int | None, rate: float) -> None:
    checks = [
        ("direction", direction, direction in ("maximize", "minimize"), "maximize or minimize"),
        ("n_trials", n_trials, n_trials >= 1, "an integer >= 1"),
        ("n_jobs", n_jobs, n_jobs is None or n_jobs >= 1, "an integer >= 1, or null"),
        ("max_failure_rate", rate, 0 <= rate <= 1, "a number in [0, 1]"),
    ]
    for key, value, ok, expected in checks:
        if not ok:
            raise CnnlabError(
                f"hydra.sweeper.{key}={value} is invalid: expected {expected}; "
                f"set hydra.sweeper.{key}=<value>"
            )


def _launcher_slots(launcher: DictConfig) -> int:
    """Trials at a time when n_jobs is null: the joblib launcher's workers, else 1."""
    if not _is_joblib(launcher):
        return 1
    n = int(launcher.get("n_jobs") or 1)
    return n if n > 0 else max(1, (os.cpu_count() or 1) + 1 + n)  # joblib: -1 = every core


def _is_joblib(launcher: DictConfig) -> bool:
    return str(launcher.get("_target_", "")).endswith("JoblibLauncher")


def _masked(url: str) -> str:
    """`url` without a password, for output."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)
