"""cnnlab-train end to end, as a user runs it: a subprocess on tiny data into a temporary store."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from cnnlab.data.load import data_arguments, load_dataset
from cnnlab.inference.loaded import load_model
from cnnlab.tracking.run import closing_run, create_run
from cnnlab.training import interrupts
from cnnlab.training.loop import evaluate
from helpers import BIN, Store, cli_env, cnnlab


def test_a_run_logs_params_metrics_artifacts_and_a_loadable_model(tiny_overrides, tmp_path, store):
    done = cnnlab("train", *tiny_overrides, "train.epochs=2", "tracking.run_name=e2e", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("Loss after mini-batch") == 2 * 3  # 60 batches/epoch, every 20
    assert "Starting epoch 2" in done.stdout

    client, run = store.client, store.only_run()
    assert run.info.status == "FINISHED" and run.info.run_name == "e2e"

    # Params: the whole resolved config, flattened to dotted keys.
    params = run.data.params
    assert params["train.batch_size"] == "10" and params["optimizer.lr"] == "0.0001"
    assert params["model._target_"] == "cnnlab.models.ConvNet"
    assert params["data.root"] == next(o.split("=", 1)[1] for o in tiny_overrides if "root" in o)

    # Metrics: train_loss at global batch numbers, test metrics once per epoch.
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert steps == [20, 40, 60, 80, 100, 120]
    accuracy = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert [m.step for m in accuracy] == [60, 120]

    # Tags: what ran, on what, with which data and overrides.
    tags = run.data.tags
    assert tags["cnnlab.device"] == "cpu" and tags["cnnlab.dataset"] == "mnist"
    assert tags["cnnlab.torch_version"] == torch.__version__
    assert len(tags["cnnlab.dataset_md5"]) == 32
    assert "train.epochs=2" in tags["cnnlab.overrides"]
    assert tags["mlflow.source.git.commit"]

    # Artifacts: resolved config (what a reproduction reads), overrides, Hydra's config.
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert artifacts == {"config/config.yaml", "config/overrides.yaml"}
    hydra_files = {a.path for a in client.list_artifacts(run.info.run_id, "hydra")}
    assert {"hydra/config.yaml", "hydra/hydra.yaml", "hydra/overrides.yaml"} <= hydra_files
    local = client.download_artifacts(run.info.run_id, "config/config.yaml", str(tmp_path))
    logged_cfg = yaml.safe_load(Path(local).read_text())
    assert logged_cfg["train"]["epochs"] == 2 and "${" not in Path(local).read_text()

    # The model loads back through MLflow and scores the logged test accuracy.
    model = load_model(tags["cnnlab.model_uri"], store.uri)
    data = load_dataset(**data_arguments(logged_cfg["data"], Path(logged_cfg["data"]["root"])))
    _, reloaded_accuracy = evaluate(model, data.test, batch_size=1000)
    assert reloaded_accuracy == pytest.approx(accuracy[-1].value, abs=1e-9)


def test_nan_loss_fails_the_run_and_keeps_what_was_logged(tiny_overrides, tmp_path, store):
    done = cnnlab(
        "train",
        *tiny_overrides,
        "optimizer=sgd",
        "optimizer.lr=1e30",
        "train.log_every=1",
        cwd=tmp_path,
    )
    assert done.returncode != 0
    assert "training loss became" in done.stderr and "lower optimizer.lr" in done.stderr
    assert "Traceback" not in done.stderr
    run = store.only_run()
    assert run.info.status == "FAILED"
    assert "NonFiniteLossError" in run.data.tags["cnnlab.error"]
    assert run.data.params["optimizer.lr"] == "1e+30"  # params logged before the failure stay


def test_ctrl_c_marks_the_run_killed(tiny_overrides, tmp_path, store):
    proc = subprocess.Popen(
        [BIN / "cnnlab-train", *tiny_overrides, "train.epochs=1000", "train.log_every=1"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
    )  # fmt: skip
    for line in proc.stdout:  # wait until a few losses are logged (the 3rd is printed after 2)
        if line.startswith("Loss after mini-batch     3"):
            break
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    client, run = store.client, store.only_run()
    assert run.info.status == "KILLED"
    assert client.get_metric_history(run.info.run_id, "train_loss")  # the losses so far are kept


class SignalledWhileFinalized:
    """Sends this process SIGTERM while Python finalizes it: the handler's Terminated is raised
    inside __del__, where Python prints "Exception ignored" and goes on, as it did while a
    model or a figure was being written."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGTERM)


# Python reports the ignored exception; that it is ignored is the case under test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_stop_signal_python_swallowed_still_ends_the_run_killed(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = create_run(store.uri, "swallowed", None, {}, tmp_path / "pending")
    with pytest.raises(interrupts.Terminated) as stopped:  # the CLI: exit status 143
        with interrupts.handled(), closing_run(run):
            finalized = SignalledWhileFinalized()
            del finalized  # the signal's Terminated is ignored here...
    assert stopped.value.signum == signal.SIGTERM  # ...and raised again when the run closes
    assert store.only_run("swallowed").info.status == "KILLED"  # not FINISHED


def test_unreachable_server_fails_fast_before_training(tiny_overrides, tmp_path):
    start = time.monotonic()
    done = cnnlab("train", *tiny_overrides, "tracking.uri=http://127.0.0.1:9", cwd=tmp_path)
    assert done.returncode != 0
    assert time.monotonic() - start < 60
    assert "tracking server http://127.0.0.1:9 is unreachable" in done.stderr
    assert "Starting epoch" not in done.stdout


def test_missing_data_lists_the_sources_tried_and_the_manual_fix(tmp_path):
    done = cnnlab(
        "train", f"data.root={tmp_path / 'none'}", "data.mirrors=[http://127.0.0.1:9/]",
        "data.npm_package=null", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode != 0
    line = done.stderr.strip()
    assert "\n" not in line
    assert "mirror http://127.0.0.1:9/" in line
    assert f"in {tmp_path / 'none' / 'MNIST' / 'raw'}" in line
    assert not (tmp_path / "m.db").exists()  # no run is opened for data that isn't there


def test_default_store_is_sqlite_in_the_launch_directory(tiny_overrides, tmp_path):
    overrides = [o for o in tiny_overrides if not o.startswith("tracking.uri=")]
    done = cnnlab("train", *overrides, "tracking.log_model=false", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "mlflow.db").is_file()
    run = Store(f"sqlite:///{tmp_path / 'mlflow.db'}").only_run()
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert f"sqlite:///{tmp_path / 'mlflow.db'}" in done.stdout


def test_tracking_off_trains_without_touching_a_store(tiny_overrides, tmp_path):
    overrides = [o for o in tiny_overrides if not o.startswith("tracking.uri=")]
    done = cnnlab("train", *overrides, "tracking.enabled=false", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Epoch 1: test loss" in done.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()
