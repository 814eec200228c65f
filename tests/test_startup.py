"""A new user's first minutes: commands answer before the heavy libraries load, a run says where
everything went, and a run shorter than one log window still has a train_loss."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest

from helpers import cli_env, cnnlab

# What a command must not import to print its help or refuse a config: together seconds of
# start-up on a 2-core machine (torch alone ~1.5 s, torch.optim's compiler stack ~1 s more).
HEAVY = ("torch", "torchvision", "mlflow", "matplotlib", "optuna", "pandas", "ray", "submitit")

SCRIPTS = sorted(
    e.name
    for e in importlib.metadata.distribution("cnnlab").entry_points
    if e.group == "console_scripts"
)

# Runs a console script's entry point in this interpreter, then names the heavy modules loaded.
_PROBE = """
import importlib.metadata, json, sys
name, heavy = sys.argv[1], sys.argv[2].split(",")
sys.argv = [name, *sys.argv[3:]]
[entry] = [e for e in importlib.metadata.distribution("cnnlab").entry_points if e.name == name]
try:
    entry.load()()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print(json.dumps({"code": code, "loaded": [m for m in heavy if m in sys.modules]}))
"""


def loaded_by(tmp_path, script: str, *args: str) -> tuple[object, list[str]]:
    """(exit code, heavy modules imported) of `script args` run as its console entry point."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, script, ",".join(HEAVY), *args],
        cwd=tmp_path, capture_output=True, text=True, env=cli_env(), timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["code"], result["loaded"]


def test_every_console_script_is_tested_here():
    assert set(SCRIPTS) == {
        "cnnlab-train", "cnnlab-eval", "cnnlab-predict", "cnnlab-reproduce", "cnnlab-sync",
        "cnnlab-ui", "cnnlab-bench",
    }  # fmt: skip


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_imports_no_heavy_library(tmp_path, script):
    code, loaded = loaded_by(tmp_path, script, "--help")
    assert code in (0, None) and loaded == []


@pytest.mark.parametrize(
    "args",
    [
        ["train.batch_size=-1"],  # a value the schema refuses
        ["train.bacth_size=64"],  # a key that does not exist
        ["model=resnet"],  # an option that does not exist
        ["--cfg", "job"],  # the composed config, printed
    ],
)
def test_config_errors_and_cfg_job_import_no_heavy_library(tmp_path, args):
    code, loaded = loaded_by(tmp_path, "cnnlab-train", *args)
    assert loaded == []
    assert (code in (0, None)) == (args[0] == "--cfg")


def test_cnnlab_train_config_has_no_bench_block(tmp_path):
    done = cnnlab("train", "--cfg", "job", cwd=tmp_path)
    assert done.returncode == 0 and "bench" not in done.stdout
    done = cnnlab("bench", "--cfg", "job", cwd=tmp_path)
    assert done.returncode == 0 and "\nbench:\n" in done.stdout


def test_a_run_ends_saying_where_it_went(tiny_overrides, tmp_path, store):
    launch = tmp_path / "elsewhere"  # so that the store is not the launch folder's mlflow.db
    launch.mkdir()
    done = cnnlab("train", *tiny_overrides, cwd=launch)
    assert done.returncode == 0, done.stderr
    run_id = store.only_run().info.run_id
    lines = [line.split("] - ", 1)[-1].strip() for line in done.stdout.splitlines()]
    end = lines[lines.index(f"Run {run_id} FINISHED in {store.uri}") :]
    # The store is not the launch folder's mlflow.db, so each command names it.
    assert end[1] == f"browse it:    cnnlab-ui tracking.uri={store.uri}"
    assert end[2] == f"reproduce it: cnnlab-reproduce {run_id} tracking.uri={store.uri}"


def test_a_run_into_the_default_store_gives_commands_without_tracking_uri(tiny_overrides, tmp_path):
    args = [o for o in tiny_overrides if not o.startswith("tracking.uri=")]
    done = cnnlab("train", *args, "tracking.log_model=false", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"reproduce it: cnnlab-reproduce {_run_id(done)}\n" in done.stdout
    assert "browse it:    cnnlab-ui\n" in done.stdout


def _run_id(done: subprocess.CompletedProcess) -> str:
    [line] = [line for line in done.stdout.splitlines() if " FINISHED in sqlite:" in line]
    return line.split("] - ", 1)[-1].split()[1]


def test_debug_overfit_prints_about_ten_of_its_epochs(compose_cfg):
    train = compose_cfg(["debug=overfit"]).train
    assert 8 <= train.epochs / train.print_every_epochs <= 12


def test_short_epochs_log_their_partial_window_and_print_every_nth_epoch(
    tiny_overrides, tmp_path, store
):
    # 7 mini-batches an epoch, a loss every 20: each epoch's only loss is its 7-batch mean; and
    # of the 7 epochs the first, every 3rd and the last are printed, every one logged.
    args = ["train.epochs=7", "train.limit_batches=7", "train.print_every_epochs=3"]
    done = cnnlab("train", *tiny_overrides, *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    printed = [line.split(":")[0] for line in done.stdout.splitlines()
               if line.startswith(("Starting epoch", "Loss after", "Epoch "))]  # fmt: skip
    assert printed == [
        "Starting epoch 1", "Loss after mini-batch     7", "Epoch 1",
        "Starting epoch 3", "Loss after mini-batch     7", "Epoch 3",
        "Starting epoch 6", "Loss after mini-batch     7", "Epoch 6",
        "Starting epoch 7", "Loss after mini-batch     7", "Epoch 7",
    ]  # fmt: skip
    history = store.history(store.only_run().info.run_id, "train_loss")
    assert [step for step, _ in history] == [7, 14, 21, 28, 35, 42, 49]
    losses = [float(line.rsplit(":", 1)[1]) for line in done.stdout.splitlines()
              if line.startswith("Loss after mini-batch")]  # fmt: skip
    assert losses == [round(history[i][1], 3) for i in (0, 2, 5, 6)]
