"""cnnlab-eval: test loss and accuracy of a logged model on a dataset's test split.

    cnnlab-eval <run_id | models:/m-... | models:/NAME@ALIAS> [data.root=...] [data=...]
                [--trust-store]

It finds the store like cnnlab-train (tracking.uri=..., $MLFLOW_TRACKING_URI, or mlflow.db here)
and takes cnnlab-train's key=value overrides for it and for the data. The data is the run's own
(as it logged it, with data.* overrides on top, e.g. data.root where the files are now), unless
data=... picks another dataset.

Nothing in the store runs as code: the network is rebuilt from its run's logged config and given
the weights in the model's pt2 archive, read as plain numbers. A model that cannot be loaded
that way (a pickle, a model cnnlab did not log) is refused unless you pass --trust-store.
"""

from __future__ import annotations

import argparse

from cnnlab.commands.cli import add_trust_store, command
from cnnlab.inference.evaluate import evaluate_logged


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="a run id, or a models:/ URI: models:/m-<id> or a registered models:/NAME@ALIAS",
    )
    add_trust_store(parser)


def _evaluate(args: argparse.Namespace) -> None:
    evaluate_logged(args.model, args.overrides, args.trust_store)


def main() -> None:
    """Console entry point of cnnlab-eval."""
    command("cnnlab-eval", __doc__, _arguments, _evaluate)
