"""The sweeper class of hydra/sweeper=cnnlab_optuna (hparams_search=optuna_convnet).

Hydra instantiates sweepers only from the hydra_plugins package, and imports every module in it
at each start; so this module holds only the class (its config: cnnlab.schema.SearchSweeperConf),
and the work, which imports Optuna, is in cnnlab.search.
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class CnnlabOptunaSweeper(Sweeper):
    """An Optuna search whose trials are pruned, report through the study's RDB storage, and
    start as soon as a slot frees (cnnlab.search)."""

    def __init__(self, **settings: Any) -> None:
        from cnnlab.sweeps.search import Search

        self.search = Search(**settings)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        """Check the settings, open the study and the launcher (before the parent run exists)."""
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        """Run the trials; `arguments`: the command line's overrides (sweeps join the params)."""
        self.search.sweep(arguments)
