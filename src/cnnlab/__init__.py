"""cnnlab: Hydra + MLflow experiments for image classifiers in PyTorch."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cnnlab")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


class CnnlabError(Exception):
    """A problem the user can fix (bad config, missing data, unreachable store): one line."""
