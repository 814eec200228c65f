"""cnnlab-train's command line: Hydra composes and checks the config, then `cnnlab.train` runs.

cnnlab-train                                  # the article's run
cnnlab-train optimizer=sgd train.epochs=2     # any key can be overridden
cnnlab-train -m optimizer.lr=1e-3,1e-4        # a sweep, under multirun/

Nothing heavy is imported here: `--help`, `--cfg job` and a config error answer before torch,
torchvision or MLflow load (tests/test_startup.py checks which modules a `--help` imports).
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from cnnlab import CnnlabError, TrialPruned
from cnnlab.commands.cli import run_cli
from cnnlab.config.compose import CONF_DIR
from cnnlab.config.validate import validate
from cnnlab.sweeps.jobs import in_sweep, nan_for_a_failed_job, record_failure


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    """The Hydra task: one job of a run or a sweep."""
    try:
        validate(cfg)  # before torch is imported: a bad value is one line, at once
        from cnnlab.train import train

        return train(cfg)
    except TrialPruned:
        raise  # not a failure: the search tells its study PRUNED
    except Exception as exc:
        if isinstance(exc.__cause__, CnnlabError):  # e.g. an optimizer's inside instantiate()
            exc = exc.__cause__
        if in_sweep():  # the run is already marked FAILED with the reason; the sweep goes on
            record_failure(exc)
            print(f"cnnlab-train: job failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            if nan_for_a_failed_job():
                return float("nan")
            raise
        if isinstance(exc, CnnlabError):  # here, not in main(), so Hydra adds no report
            sys.exit(1 if exc.already_said else f"cnnlab-train: error: {exc}")
        raise


# What a torchrun rank other than 0 adds to its command line: Hydra resolves ${now:...} per
# process, so each rank would make an output folder of its own; rank 0's is the run's.
_QUIET_RANK = [
    "hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=disabled",
    "hydra/hydra_logging=disabled",
]  # fmt: skip


def main() -> None:
    """Console entry point of cnnlab-train."""
    if "RANK" in os.environ:  # torchrun sets it for every rank; torch is needed anyway then
        from cnnlab.training.distributed import world_from_env

        world = world_from_env()
        if world.distributed and {"-m", "--multirun"} & set(sys.argv):
            # Refused before Hydra starts: each rank would open a sweep of its own.
            sys.exit(
                "cnnlab-train: error: a sweep (-m) can't run under torchrun: each rank would "
                "run the whole sweep; sweep without torchrun, or run one torchrun per "
                "configuration"
            )
        if not world.main:
            sys.argv += _QUIET_RANK
    run_cli("cnnlab-train", hydra_main)


if __name__ == "__main__":
    main()
