"""Resume: a run stopped by Ctrl-C, SIGTERM or SIGKILL ends as if never stopped."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import BIN, cli_env

EXTRA = ["train.epochs=2", "train.log_every=5", "tracking.log_model=false"]


def cnnlab_train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BIN / "cnnlab-train", *args], cwd=cwd, capture_output=True, text=True, env=cli_env(),
        timeout=300,
    )  # fmt: skip


def interrupted(args: list[str], cwd: Path, after: str, sig: int, epoch: int = 1) -> int:
    """Start a run, send `sig` at a stdout line starting with `after` in `epoch`; its exit code."""
    proc = subprocess.Popen(
        [BIN / "cnnlab-train", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=cli_env(),
    )  # fmt: skip
    seen_epoch = 0
    for line in proc.stdout:
        seen_epoch += line.startswith("Starting epoch")
        if seen_epoch == epoch and line.startswith(after):
            proc.send_signal(sig)
            break
    proc.communicate(timeout=120)
    return proc.returncode


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def the_run(uri: str):
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    return run


@pytest.fixture
def unbroken(tiny_overrides, tmp_path_factory):
    """train_loss and test_accuracy histories of the same run, never interrupted."""
    folder = tmp_path_factory.mktemp("unbroken")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    args = [o for o in tiny_overrides if not o.startswith("tracking.uri=")]
    done = cnnlab_train([*args, *EXTRA, f"tracking.uri={uri}"], cwd=folder)
    assert done.returncode == 0, done.stderr
    run_id = the_run(uri).info.run_id
    return history(uri, run_id, "train_loss"), history(uri, run_id, "test_accuracy")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stopped_mid_epoch_then_resumed_logs_the_unbroken_losses(
    tiny_overrides, tmp_path, unbroken, sig
):
    uri = next(o.split("=", 1)[1] for o in tiny_overrides if o.startswith("tracking.uri="))
    code = interrupted([*tiny_overrides, *EXTRA], tmp_path, "Loss after mini-batch    25", sig)
    assert code == 128 + sig  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM
    run = the_run(uri)
    assert run.info.status == "KILLED"
    assert len(history(uri, run.info.run_id, "train_loss")) < len(unbroken[0])

    done = cnnlab_train([f"train.resume={run.info.run_id}", f"tracking.uri={uri}"], tmp_path)
    assert done.returncode == 0, done.stderr
    resumed = the_run(uri)  # the same run, continued: still one run in the store
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert history(uri, run.info.run_id, "train_loss") == unbroken[0]
    assert history(uri, run.info.run_id, "test_accuracy") == unbroken[1]


def test_a_sigkilled_run_left_running_resumes_from_its_last_epoch(
    tiny_overrides, tmp_path, unbroken
):
    uri = next(o.split("=", 1)[1] for o in tiny_overrides if o.startswith("tracking.uri="))
    # Killed outright in epoch 2: no handler runs, the run stays RUNNING in the store.
    code = interrupted(
        [*tiny_overrides, *EXTRA], tmp_path, "Loss after mini-batch    10", signal.SIGKILL, epoch=2
    )
    assert code == -signal.SIGKILL
    run = the_run(uri)
    assert run.info.status == "RUNNING"

    done = cnnlab_train([f"train.resume={run.info.run_id}", f"tracking.uri={uri}"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert the_run(uri).info.status == "FINISHED"
    # Epoch 2 is retrained from the epoch-1 checkpoint; the losses it had already logged are
    # not logged twice.
    assert history(uri, run.info.run_id, "train_loss") == unbroken[0]


def test_resume_errors_are_one_line(tiny_overrides, tmp_path):
    uri = next(o.split("=", 1)[1] for o in tiny_overrides if o.startswith("tracking.uri="))
    done = cnnlab_train([*tiny_overrides, *EXTRA], tmp_path)
    run_id = the_run(uri).info.run_id
    again = cnnlab_train([f"train.resume={run_id}", f"tracking.uri={uri}"], tmp_path)
    assert again.returncode != 0 and "already trained all 2 epochs" in again.stderr
    assert the_run(uri).info.status == "FINISHED"  # a refused resume leaves the run as it was
    changed = cnnlab_train(
        [f"train.resume={run_id}", f"tracking.uri={uri}", "train.epochs=5"], tmp_path
    )
    assert changed.returncode != 0
    assert (
        "train.epochs=5 can't change it" in changed.stderr and "cnnlab-reproduce" in changed.stderr
    )
    missing = cnnlab_train([f"train.resume={'0' * 32}", f"tracking.uri={uri}"], tmp_path)
    assert missing.returncode != 0 and f"no run {'0' * 32}" in missing.stderr
    assert done.returncode == 0
