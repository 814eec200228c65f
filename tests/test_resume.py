"""Resume: a run stopped by Ctrl-C, SIGTERM or SIGKILL ends as if never stopped."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from cnnlab import CnnlabError
from cnnlab.tracking.lifecycle import resumed_config
from helpers import Running, Store, cnnlab, one_error_line, train_in_process

EXTRA = ["train.epochs=2", "train.log_every=5", "tracking.log_model=false"]


def interrupted(args: list[str], cwd: Path, after: str, sig: int, epoch: int = 1) -> int:
    """Start a run, send `sig` at a stdout line starting with `after` in `epoch`; its exit code."""
    return interrupted_run(args, cwd, after, sig, epoch).finish(timeout=120)[0]


def interrupted_run(args: list[str], cwd: Path, after: str, sig: int, epoch: int = 1) -> Running:
    """The run `interrupted` starts and stops (finish() it for its exit status and output)."""
    training = Running(args, cwd)
    training.wait_for(f"Starting epoch {epoch}")
    training.wait_for(after)
    training.proc.send_signal(sig)
    return training


def resume(store: Store, run_id: str, cwd: Path, *extra: str):
    return cnnlab("train", f"train.resume={run_id}", f"tracking.uri={store.uri}", *extra, cwd=cwd)


@pytest.fixture(scope="module")
def unbroken(tiny_data, tmp_path_factory):
    """train_loss and test_accuracy histories of the same run, never interrupted."""
    folder = tmp_path_factory.mktemp("unbroken")
    store, run_id = train_in_process(folder, tiny_data, *EXTRA)
    return store.history(run_id, "train_loss"), store.history(run_id, "test_accuracy")


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.integration)]
)
def test_stopped_mid_epoch_then_resumed_logs_the_unbroken_losses(
    tiny_overrides, tmp_path, store, unbroken, sig
):
    stopped = interrupted_run(
        [*tiny_overrides, *EXTRA], tmp_path, "Loss after mini-batch    25", sig
    )
    code, _ = stopped.finish(timeout=120)
    assert code == 128 + sig  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM
    run = store.only_run()
    assert run.info.status == "KILLED"
    assert len(store.history(run.info.run_id, "train_loss")) < len(unbroken[0])

    # The stopped run says how to continue it (its store is the launch folder's mlflow.db, which
    # every command opens by default); that command, as printed, continues it.
    hint = next(line for line in stopped.lines if "continue it:" in line)
    command = hint.split("continue it:", 1)[1].split()
    assert command == ["cnnlab-train", f"train.resume={run.info.run_id}"]
    done = cnnlab("train", *command[1:], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # It stopped at the first mini-batch boundary after the signal, and goes on from there.
    assert int(re.search(r"resuming at mini-batch (\d+)", done.stdout)[1]) > 25
    resumed = store.only_run()  # the same run, continued: still one run in the store
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert store.history(run.info.run_id, "train_loss") == unbroken[0]
    assert store.history(run.info.run_id, "test_accuracy") == unbroken[1]


@pytest.mark.integration  # a real failure mid-run, then recovery
def test_a_sigkilled_run_left_running_resumes_from_its_last_epoch(
    tiny_overrides, tmp_path, store, unbroken
):
    # Killed outright in epoch 2: no handler runs, the run stays RUNNING in the store.
    code = interrupted(
        [*tiny_overrides, *EXTRA], tmp_path, "Loss after mini-batch    10", signal.SIGKILL, epoch=2
    )
    assert code == -signal.SIGKILL
    run = store.only_run()
    assert run.info.status == "RUNNING"

    done = resume(store, run.info.run_id, tmp_path)
    assert done.returncode == 0, done.stderr
    assert store.only_run().info.status == "FINISHED"
    # Epoch 2 is retrained from the epoch-1 checkpoint; the losses it had already logged are
    # not logged twice.
    assert store.history(run.info.run_id, "train_loss") == unbroken[0]


def test_resume_errors_are_one_line(tiny_data, tmp_path):
    store, run_id = train_in_process(tmp_path, tiny_data, *EXTRA)
    line = one_error_line(resume(store, run_id, tmp_path))
    assert line == f"cnnlab-train: error: run {run_id} already trained all 2 epochs"
    assert store.only_run().info.status == "FINISHED"  # a refused resume leaves the run as it was
    # The other refusals in-process: the command line's one-line form is the same.
    with pytest.raises(CnnlabError, match="train.epochs=5 can't change it.*cnnlab-reproduce"):
        resumed_config(run_id, store.uri, ["train.epochs=5"])
    with pytest.raises(CnnlabError, match=f"no run {'0' * 32} in {re.escape(store.uri)}"):
        resumed_config("0" * 32, store.uri, [])


# SIGKILL at each moment of a run: (the line the kill follows, the epoch it is in). Before the
# first checkpoint (start-up, mid-epoch 1, epoch 1's evaluation) the run is trained again from
# its start; after it, from the last checkpoint; after training, only what is left is done.
MOMENTS = {
    "start-up": ("MLflow run ", None),
    "mid-epoch 1": ("Loss after mini-batch    10", 1),
    "epoch 1's evaluation": ("Epoch 1: test loss", 1),  # printed before its checkpoint
    "mid-epoch 2": ("Loss after mini-batch    10", 2),
    "model logging": ("Epoch 2: test loss", 2),  # the model is logged right after
    "the end": ("Training process has finished.", 2),
}


@pytest.mark.integration  # six real SIGKILLs, each followed by a resume
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_run_sigkilled_at_any_moment_resumes_to_the_unbroken_run(
    tiny_overrides, tmp_path, store, unbroken, moment
):
    after, epoch = MOMENTS[moment]
    training = Running([*tiny_overrides, *EXTRA], tmp_path)
    if epoch is not None:
        training.wait_for(f"Starting epoch {epoch}")
    training.wait_for(after)
    training.proc.kill()
    assert training.proc.wait(timeout=60) == -signal.SIGKILL
    run = store.only_run()
    if run.info.status == "FINISHED":  # the end: it had closed the run before the kill
        assert moment == "the end"
        assert "already trained all 2 epochs" in one_error_line(
            resume(store, run.info.run_id, tmp_path)
        )
    else:
        done = resume(store, run.info.run_id, tmp_path)
        assert done.returncode == 0, done.stderr
    resumed = store.only_run()  # the same run, finished: no second run
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    # No step missing, none twice, every value the unbroken run's.
    assert store.history(run.info.run_id, "train_loss") == unbroken[0]
    assert store.history(run.info.run_id, "test_accuracy") == unbroken[1]


@pytest.mark.integration  # a real SIGKILL, then recovery
def test_checkpoints_within_an_epoch_let_a_sigkill_lose_only_the_last_minutes(
    tiny_overrides, tmp_path, store, unbroken
):
    # train.checkpoint_every in minutes: here every log window gets one.
    training = Running([*tiny_overrides, *EXTRA, "train.checkpoint_every=0.0001"], tmp_path)
    training.wait_for("Starting epoch 1")
    training.wait_for("Loss after mini-batch    20")
    training.proc.kill()
    training.proc.wait(timeout=60)
    run = store.only_run()
    done = resume(store, run.info.run_id, tmp_path)
    assert done.returncode == 0, done.stderr
    # It went on from a checkpoint within epoch 1, not from the run's start.
    assert int(re.search(r"resuming at mini-batch (\d+)", done.stdout)[1]) > 1
    assert store.history(run.info.run_id, "train_loss") == unbroken[0]
    assert store.history(run.info.run_id, "test_accuracy") == unbroken[1]
