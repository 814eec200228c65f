"""cnnlab: Hydra + MLflow experiments for image classifiers in PyTorch."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cnnlab")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


class CnnlabError(Exception):
    """A problem the user can fix (bad config, missing data, unreachable store): one line."""


def one_line(exc: BaseException) -> str:
    """Any exception as one line for an error message: its class and its message's first line."""
    # MLflow's exceptions keep their own words in .message; str() may prefix an error code.
    text = str(getattr(exc, "message", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__
