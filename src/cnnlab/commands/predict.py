"""cnnlab-predict: the class of each image file, by a logged model.

    cnnlab-predict <run_id | models:/m-... | models:/NAME@ALIAS> digit.png ... [--trust-store]

It finds the store like cnnlab-train (tracking.uri=..., $MLFLOW_TRACKING_URI, or mlflow.db here)
and takes cnnlab-train's key=value overrides for it.

Nothing in the store runs as code: the network is rebuilt from its run's logged config and given
the weights in the model's pt2 archive, read as plain numbers. A model that cannot be loaded
that way (a pickle, a model cnnlab did not log) is refused unless you pass:

    --trust-store   load the model the way MLflow stores it (pickle, torch.export program),
                    which can run code from the store: only for a store you trust

cnnlab-predict reads regular files only (not FIFOs, devices or directories) of at most
64 megapixels; each file it cannot read gets one error line, and the others still get answers.
"""

from __future__ import annotations

import argparse

from cnnlab.commands.cli import add_trust_store, command
from cnnlab.inference.predict import predict


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="a run id, or a models:/ URI: models:/m-<id> or a registered models:/NAME@ALIAS",
    )
    parser.add_argument("images", nargs="*", help="image files (PNG, JPEG, ...)")
    add_trust_store(parser)


def main() -> None:
    """Console entry point of cnnlab-predict."""
    command(
        "cnnlab-predict",
        __doc__,
        _arguments,
        lambda args: predict(args.model, args.images, args.overrides, args.trust_store),
    )
