"""Test loss and accuracy of a logged model on a dataset's test split (cnnlab-eval's work)."""

from __future__ import annotations

from cnnlab.config.compose import compose_config, launch_path, store_uri
from cnnlab.config.validate import typed_config, validate


def evaluate_logged(
    model_ref: str, overrides: list[str], trust_store: bool = False
) -> tuple[float, float]:
    """Test loss and accuracy of a logged model on the configured dataset's test split."""
    # Imported here, not above: `cnnlab-eval --help` and a bad argument answer without them.
    from cnnlab.data.load import data_arguments, load_dataset
    from cnnlab.inference.loaded import load_model
    from cnnlab.tracking.queries import run_config
    from cnnlab.training.loop import evaluate

    # Without data=..., the data is the run's own: data.* overrides apply to it, not to the
    # default MNIST (data.split=letters means something for an EMNIST run only).
    switched = any(o.startswith("data=") for o in overrides)
    cfg = compose_config([o for o in overrides if switched or not o.startswith("data.")])
    uri = store_uri(cfg)
    model = load_model(model_ref, uri, trust_store)
    data_cfg = cfg.data
    logged = None
    if not switched and model.run_id:  # a rebuilt model's loading read the config already
        logged = (
            model.config
            if model.config is not None
            else run_config(uri, model.run_id, missing_ok=True)
        )
    if logged is not None:
        # The run's own test set: a CIFAR model is scored on CIFAR without saying so. Where
        # the files are missing nothing is fetched: the sources a store names (mirrors, npm
        # packages) are not run on its say-so; data=<option> fetches as cnnlab-train does.
        local = [
            "data.mirrors=[]", "data.download=false", "data.npm_package=null",
            "data.debian_dir=null", *(o for o in overrides if o.startswith("data.")),
        ]  # fmt: skip
        typed = typed_config(logged, local)
        validate(typed)
        data_cfg = typed.data
    data = load_dataset(**data_arguments(data_cfg, launch_path(data_cfg.root)))
    loss, accuracy = evaluate(model, data.test, cfg.train.eval_batch_size)
    print(
        f"{model_ref} on {data_cfg.name} test ({len(data.test)} images): "
        f"test loss {loss:.4f}, test accuracy {accuracy:.4%}"
    )
    return loss, accuracy
