"""cnnlab-eval: test loss and accuracy of a logged model on a dataset's test split.

    cnnlab-eval <run_id | models:/m-...> [data=fashion_mnist] [data.root=...] [--trust-store]

It finds the store like cnnlab-train (tracking.uri=..., $MLFLOW_TRACKING_URI, or mlflow.db here)
and takes cnnlab-train's key=value overrides for it and for the data.

Nothing in the store runs as code: the network is rebuilt from its run's logged config and given
the weights in the model's pt2 archive, read as plain numbers. A model that cannot be loaded
that way (a pickle, a model cnnlab did not log) is refused unless you pass --trust-store.
"""

from __future__ import annotations

import argparse

from cnnlab.cli import command, compose_config, launch_path, store_uri
from cnnlab.data import data_arguments, load_dataset
from cnnlab.loop import evaluate
from cnnlab.predict import add_trust_store
from cnnlab.tracking import load_model


def evaluate_logged(
    model_ref: str, overrides: list[str], trust_store: bool = False
) -> tuple[float, float]:
    """Test loss and accuracy of a logged model on the configured dataset's test split."""
    cfg = compose_config(overrides)
    model = load_model(model_ref, store_uri(cfg), trust_store)
    data = load_dataset(**data_arguments(cfg.data, launch_path(cfg.data.root)))
    loss, accuracy = evaluate(model, data.test, cfg.train.eval_batch_size)
    print(
        f"{model_ref} on {cfg.data.name} test ({len(data.test)} images): "
        f"test loss {loss:.4f}, test accuracy {accuracy:.4%}"
    )
    return loss, accuracy


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a run id or a models:/ URI")
    add_trust_store(parser)


def _evaluate(args: argparse.Namespace) -> None:
    evaluate_logged(args.model, args.overrides, args.trust_store)


def main() -> None:
    """Console entry point of cnnlab-eval."""
    command("cnnlab-eval", __doc__, _arguments, _evaluate)
