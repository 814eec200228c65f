"""The launcher classes of hydra/launcher=slurm and hydra/launcher=submitit_local.

hydra-submitit-launcher's own, with one change: the sweep waits for every job. The plugin
collects results in order and raises at the first job that ended without one (cancelled,
killed, out of memory, its node lost), so the launching command stopped waiting for the others,
which ran on unattended, and no summary was written. Here such a job is a failed job
(`cnnlab.sweep.lost_job`: its run closed FAILED, a failure mark) and the sweep goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn

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
            import submitit

            jobs: list[Any] = []
            map_array = submitit.AutoExecutor.map_array

            def keep_jobs(executor: Any, fn: Any, *iterables: Any) -> list[Any]:
                jobs.extend(map_array(executor, fn, *iterables))
                return [_Deferred() for _ in jobs]

            # The plugin builds the executor and submits in one method; its submission is kept
            # as is, only the waiting is replaced.
            submitit.AutoExecutor.map_array = keep_jobs
            try:
                super().launch(job_overrides, initial_job_idx)  # type: ignore[misc]
            finally:
                submitit.AutoExecutor.map_array = map_array
            return [
                self._result(job, list(overrides), num)
                for num, (job, overrides) in enumerate(
                    zip(jobs, job_overrides, strict=True), start=initial_job_idx
                )
            ]

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

    class _Deferred:
        """What the plugin's launch collects before this class collects the real results."""

        def results(self) -> list[None]:
            return [None]

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
