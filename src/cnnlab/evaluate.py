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

from cnnlab import schema
from cnnlab.cli import add_trust_store, command, compose_config, launch_path, store_uri


def evaluate_logged(
    model_ref: str, overrides: list[str], trust_store: bool = False
) -> tuple[float, float]:
    """Test loss and accuracy of a logged model on the configured dataset's test split."""
    # Imported here, not above: `cnnlab-eval --help` and a bad argument answer without them.
    from cnnlab.data import data_arguments, load_dataset
    from cnnlab.loop import evaluate
    from cnnlab.tracking import load_model, run_config

    # Without data=..., the data is the run's own: data.* overrides apply to it, not to the
    # default MNIST (data.split=letters means something for an EMNIST run only).
    switched = any(o.startswith("data=") for o in overrides)
    cfg = compose_config([o for o in overrides if switched or not o.startswith("data.")])
    uri = store_uri(cfg)
    model = load_model(model_ref, uri, trust_store)
    data_cfg = cfg.data
    logged = None
    if not switched and model.run_id:  # a rebuilt model's loading read the config already
        logged = model.config if model.config is not None else run_config(uri, model.run_id, True)
    if logged is not None:
        # The run's own test set: a CIFAR model is scored on CIFAR without saying so. Where
        # the files are missing nothing is fetched: the sources a store names (mirrors, npm
        # packages) are not run on its say-so; data=<option> fetches as cnnlab-train does.
        local = [
            "data.mirrors=[]", "data.download=false", "data.npm_package=null",
            "data.debian_dir=null", *(o for o in overrides if o.startswith("data.")),
        ]  # fmt: skip
        typed = schema.typed_config(logged, local)
        schema.validate(typed)
        data_cfg = typed.data
    data = load_dataset(**data_arguments(data_cfg, launch_path(data_cfg.root)))
    loss, accuracy = evaluate(model, data.test, cfg.train.eval_batch_size)
    print(
        f"{model_ref} on {data_cfg.name} test ({len(data.test)} images): "
        f"test loss {loss:.4f}, test accuracy {accuracy:.4%}"
    )
    return loss, accuracy


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
