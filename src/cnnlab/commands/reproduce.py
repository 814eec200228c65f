"""cnnlab-reproduce: re-run a logged run from its logged config and compare the numbers.

cnnlab-reproduce <run_id>                    # the same run again, then a comparison
cnnlab-reproduce <run_id> train.epochs=10    # key=value overrides on top of the logged config
cnnlab-reproduce <run_id> tracking.uri=http://127.0.0.1:5000   # where the run is stored
"""

from __future__ import annotations

import argparse
import logging

from cnnlab import CnnlabError
from cnnlab.commands.cli import command
from cnnlab.config.compose import compose_config, store_uri
from cnnlab.config.validate import typed_config
from cnnlab.tracking.store import check_reachable

log = logging.getLogger(__name__)


def reproduce(run_id: str, overrides: list[str]) -> bool:
    """Run `run_id`'s logged config again (plus overrides); print the comparison; True if equal."""
    # Imported here, not above: `cnnlab-reproduce --help` answers without torch and MLflow.
    from cnnlab.tracking.queries import find_runs, run_config, run_record
    from cnnlab.train import train

    # The store is found like cnnlab-train finds it: tracking.uri=..., $MLFLOW_TRACKING_URI, ...
    uri = store_uri(compose_config([o for o in overrides if o.startswith("tracking.uri=")]))
    check_reachable(uri)
    source = run_record(uri, run_id)
    cfg = typed_config(run_config(uri, run_id), overrides)
    cfg.tracking.uri, cfg.train.resume, cfg.tracking.enabled = uri, None, True
    cfg.tracking.run_name = f"reproduce {source['run_name']}"
    warn_about_differences(source["tags"])

    train(cfg, extra_tags={"cnnlab.reproduces": run_id})
    copy = run_record(uri, find_runs(uri, cfg.tracking.experiment, "cnnlab.reproduces", run_id)[0])
    return compare(
        source,
        copy,
        strict=not [o for o in overrides if "=" in o and not o.startswith("tracking.uri=")],
    )


def warn_about_differences(tags: dict[str, str]) -> None:
    """Say when the code or libraries differ from those the source run used."""
    from cnnlab.tracking.provenance import code_tags

    for key, value in code_tags().items():
        if tags.get(key, value) != value:
            log.warning("warning: %s was %s, is %s now", key, tags[key], value)


def compare(source: dict, copy: dict, strict: bool) -> bool:
    """Print the two runs' losses and accuracy side by side; whether they agree."""
    ours, theirs = dict(copy["train_loss"]), dict(source["train_loss"])
    shared = sorted(set(ours) & set(theirs))
    diffs = [abs(ours[s] - theirs[s]) for s in shared]
    same_losses = all(d == 0 for d in diffs) and (not strict or ours.keys() == theirs.keys())
    acc_source = source["metrics"].get("test_accuracy")
    acc_copy = copy["metrics"].get("test_accuracy")
    same_accuracy = not strict or acc_source == acc_copy
    print(f"source run        {source['run_id']} ({source['run_name']})")
    print(f"reproduction run  {copy['run_id']} ({copy['run_name']})")
    print(
        f"train_loss        {len(shared)} shared steps, "
        f"{sum(d == 0 for d in diffs)} identical, max |difference| {max(diffs, default=0):.3g}"
        + ("" if ours.keys() == theirs.keys() else f" ({len(theirs)} vs {len(ours)} points)")
    )
    print(f"test_accuracy     {acc_source} vs {acc_copy}")
    agree = same_losses and same_accuracy
    print("result            " + ("IDENTICAL" if agree else "DIFFERENT"))
    return agree


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", help="the run to reproduce")


def _reproduce(args: argparse.Namespace) -> None:
    if not reproduce(args.run_id, args.overrides):
        raise CnnlabError("the reproduction differs from the source run")


def main() -> None:
    """Console entry point of cnnlab-reproduce."""
    command("cnnlab-reproduce", __doc__, _arguments, _reproduce)
