"""The launcher class of hydra/launcher=ray (conf/hydra/launcher/ray.yaml).

Hydra instantiates launchers only from the hydra_plugins package, and imports every module in
it at each start; so this module holds only the class, and the work, which imports Ray, is in
cnnlab.ray_launcher.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from cnnlab import CnnlabError, needs_cluster_extra


class CnnlabRayLauncher(Launcher):
    """Runs each job of a sweep as a Ray task (ray.remote options: `ray.remote`) in the launch
    directory, on the Ray that `ray.init` starts or joins."""

    def __init__(self, ray: DictConfig) -> None:
        self.ray_cfg = ray
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        """Keep what `launch` needs (Hydra calls this once, before the first batch)."""
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        """Run a batch of jobs on Ray; their results once all have ended."""
        # Read when Ray is imported: every job's lines in full. Ray would fold lines that differ
        # only in numbers (losses, run ids, a second job's error) into "[repeated 3x]".
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        try:
            from cnnlab.sweeps.ray_launcher import launch
        except ImportError:
            raise CnnlabError(needs_cluster_extra("hydra/launcher=ray", "Ray")) from None

        return launch(self, job_overrides, initial_job_idx)
