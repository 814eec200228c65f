"""The launcher classes of hydra/launcher=slurm and hydra/launcher=submitit_local.

hydra-submitit-launcher's own, with one change: the sweep waits for every job. The plugin
collects results in order and raises at the first job that ended without one (cancelled,
killed, out of memory, its node lost), so the launching command stopped waiting for the others,
which ran on unattended, and no summary was written. Here such a job is a failed job
(`cnnlab.sweep.lost_job`: its run closed FAILED, a failure mark) and the sweep goes on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from omegaconf import OmegaConf

from cnnlab import CnnlabError, needs_cluster_extra

try:
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher
except ImportError:  # without the cluster extra: no submitit launchers, nothing to extend
    submitit_launcher = None


if submitit_launcher is not None:

    class _WaitForEveryJob:
        """Mixin over the plugin's launcher: a job without a result is a failed job."""

        def launch(
            self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
        ) -> Sequence[JobReturn]:
            """The plugin's launch, with each job's result collected by `_result`."""
            # The plugin builds the executor, submits and waits in this one method, so it is
            # redone here: its executor and submission as they are, only the waiting replaced.
            assert len(job_overrides) > 0  # as the plugin's: a sweeper never sends no jobs
            executor = self._executor()
            job_params = self._job_params(job_overrides, initial_job_idx)
            jobs = executor.map_array(self, *zip(*job_params, strict=True))
            return [
                self._result(job, list(overrides), num)
                for num, (job, overrides) in enumerate(
                    zip(jobs, job_overrides, strict=True), start=initial_job_idx
                )
            ]

        def _executor(self) -> Any:
            """The plugin's AutoExecutor, with its parameters, once its sweep folder exists."""
            import submitit
            from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

            name = self._EXECUTOR  # type: ignore[attr-defined]
            params: dict[str, Any] = self.params  # type: ignore[attr-defined]
            config = self.config  # type: ignore[attr-defined]
            init_keys = {"max_num_timeout"}
            executor = submitit.AutoExecutor(
                cluster=name,
                folder=params["submitit_folder"],
                **{f"{name}_{k}": v for k, v in params.items() if k in init_keys},
            )
            shared = set(OmegaConf.structured(BaseQueueConf).keys())
            executor.update_parameters(
                **{
                    k if k in shared else f"{name}_{k}": v
                    for k, v in params.items()
                    if k not in init_keys | {"submitit_folder"}
                }
            )
            # The plugin's logger: whoever filters the plugin's lines filters these too.
            submitit_launcher.log.info(
                f"Submitit '{name}' sweep output dir : {config.hydra.sweep.dir}"
            )
            sweep_dir = Path(str(config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            if "mode" in config.hydra.sweep:
                os.chmod(sweep_dir, mode=int(str(config.hydra.sweep.mode), 8))
            return executor

        def _job_params(
            self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
        ) -> list[tuple[Any, ...]]:
            """The arguments of each job's call of the launcher (the plugin's __call__)."""
            job_params = []
            for num, overrides in enumerate(job_overrides, start=initial_job_idx):
                submitit_launcher.log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
                job_params.append(
                    (list(overrides), "hydra.sweep.dir", num, f"job_id_for_{num}",
                     Singleton.get_state())
                )  # fmt: skip
            return job_params

        def _result(self, job: Any, overrides: list[str], num: int) -> JobReturn:
            from submitit.core.utils import FailedJobError, UncompletedJobError

            from cnnlab import one_line
            from cnnlab.sweeps.jobs import lost_job

            try:
                return job.results()[0]
            except (UncompletedJobError, FailedJobError) as exc:
                config = self.hydra_context.config_loader.load_sweep_config(  # type: ignore
                    self.config, overrides
                )
                config.hydra.job.num = num
                error = f"{type(exc).__name__}: SLURM job {job.job_id} ended without a result "
                return lost_job(config, overrides, error + f"({one_line(exc)[:300]})")

    class CnnlabSlurmLauncher(_WaitForEveryJob, submitit_launcher.SlurmLauncher):
        """hydra/launcher=slurm."""

    class CnnlabLocalLauncher(_WaitForEveryJob, submitit_launcher.LocalLauncher):
        """hydra/launcher=submitit_local."""

else:
    from hydra.plugins.launcher import Launcher

    class _NotInstalled(Launcher):
        """Stands for a launcher whose plugin is missing: one line that names the extra.

        A Launcher, so that Hydra's plugin registry knows the class and creates it."""

        def __init__(self, **_: Any) -> None:
            name = "slurm" if isinstance(self, CnnlabSlurmLauncher) else "submitit_local"
            raise CnnlabError(
                needs_cluster_extra(f"hydra/launcher={name}", "hydra-submitit-launcher")
            )

        def setup(self, **_: Any) -> None:
            """Never reached: __init__ refuses."""

        def launch(self, *_: Any) -> Sequence[JobReturn]:
            """Never reached: __init__ refuses."""
            return []

    class CnnlabSlurmLauncher(_NotInstalled):
        """hydra/launcher=slurm, without the cluster extra."""

    class CnnlabLocalLauncher(_NotInstalled):
        """hydra/launcher=submitit_local, without the cluster extra."""
