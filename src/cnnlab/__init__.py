"""cnnlab: Hydra + MLflow experiments for image classifiers in PyTorch."""

import math
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cnnlab")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


class CnnlabError(Exception):
    """A problem the user can fix (bad config, missing data, unreachable store): one line."""

    already_said = False  # True: reported where it happened; the command exits 1 without a line


# What installs the optional features (SLURM and Ray launchers, a PostgreSQL store).
CLUSTER_EXTRA = "pip install -e '.[cluster]'"


def needs_cluster_extra(feature: str, package: str) -> str:
    """The one line for a feature of the cluster extra asked for without it."""
    return f"{feature} needs {package}, which is not installed: {CLUSTER_EXTRA}"


def one_line(exc: BaseException) -> str:
    """Any exception as one line for an error message: its class and its message's first line."""
    # MLflow's exceptions keep their own words in .message; str() may prefix an error code.
    text = str(getattr(exc, "message", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def finite_float(value: object) -> float | None:
    """`value` as a finite float (a metric, a job's result, a swept value), else None."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class TrialPruned(Exception):  # noqa: N818 - Optuna's name for the same event
    """A search's pruner stopped this trial at mini-batch `step` (not an error: its run ends
    KILLED, resumable, tagged cnnlab.trial_state=PRUNED; the sweeper tells Optuna PRUNED)."""

    def __init__(self, step: int, pruner: str, value: float) -> None:
        super().__init__(step, pruner, value)  # all in args: it crosses processes pickled
        self.step, self.pruner, self.value = step, pruner, value

    def __str__(self) -> str:
        return f"pruned by the {self.pruner} pruner at mini-batch {self.step} ({self.value:.4f})"

    @property
    def tags(self) -> dict[str, str]:
        """The tags a pruned trial's run ends with."""
        return {
            "cnnlab.trial_state": "PRUNED",
            "cnnlab.pruned_step": str(self.step),
            "cnnlab.pruner": self.pruner,
        }
