"""Debug presets and experiments as a user runs them: debug=fast into a throwaway store,
debug=overfit's verdict, train.limit_batches' metric steps, the experiment tag."""

from __future__ import annotations

import getpass
import signal

import pytest

from helpers import Running, Store, cli_env, cnnlab, one_error_line, train_in_process


def preset_runs(overrides: list[str], *keys: str) -> list[str]:
    """tiny_overrides without train.epochs and train.log_every (the command line would win over
    the debug preset's), nor `keys`."""
    dropped = ("train.epochs=", "train.log_every=", *(f"{key}=" for key in keys))
    return [o for o in overrides if not o.startswith(dropped)]


def test_fast_runs_end_to_end_into_a_throwaway_store(tiny_overrides, tmp_path):
    # A user's own store (the launch directory's mlflow.db, $MLFLOW_TRACKING_URI) stays untouched.
    temp, user_db = tmp_path / "temp", tmp_path / "user.db"
    temp.mkdir()
    env = cli_env(TMPDIR=str(temp), MLFLOW_TRACKING_URI=f"sqlite:///{user_db}")
    done = cnnlab(
        "train", *preset_runs(tiny_overrides, "tracking.uri"), "debug=fast", cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("Loss after mini-batch") == 1  # one mini-batch, its loss logged

    throwaway = temp / f"cnnlab-debug-{getpass.getuser()}" / "mlflow.db"
    assert f"sqlite:///{throwaway}" in done.stdout  # the run says where it went
    assert not (tmp_path / "mlflow.db").exists() and not user_db.exists()
    store = Store(f"sqlite:///{throwaway}")
    run = store.only_run()
    assert run.info.status == "FINISHED"
    assert store.history(run.info.run_id, "train_loss")[0][0] == 1
    assert [step for step, _ in store.history(run.info.run_id, "test_accuracy")] == [1]
    assert run.data.tags["cnnlab.model_uri"]  # the model is logged too
    assert run.data.tags["cnnlab.debug"] == "fast" and "cnnlab.experiment" not in run.data.tags
    assert run.data.params["train.limit_batches"] == "1"


def test_fast_honours_an_explicit_store_and_tags_the_experiment(tiny_overrides, tmp_path, store):
    temp = tmp_path / "temp"
    temp.mkdir()
    done = cnnlab(
        "train",
        *preset_runs(tiny_overrides),
        "experiment=mnist_fast",
        "debug=fast",
        "tracking.log_model=false",
        cwd=tmp_path,
        env=cli_env(TMPDIR=str(temp)),
    )
    assert done.returncode == 0, done.stderr
    assert not list(temp.glob("cnnlab-debug-*"))  # no throwaway store
    run = store.only_run()
    tags, params = run.data.tags, run.data.params
    assert tags["cnnlab.experiment"] == "mnist_fast" and tags["cnnlab.debug"] == "fast"
    # The recipe set the model and batch size; the debug preset, composed last, the rest.
    assert params["model.conv_channels"] == "[32, 32]" and params["train.batch_size"] == "32"
    assert params["train.limit_batches"] == "1" and params["train.epochs"] == "1"


@pytest.mark.integration  # 300 epochs
def test_overfit_passes_for_a_model_that_learns(tiny_overrides, tmp_path, store):
    # The default config's own optimizer, the article's Adam 1e-4, over the preset's epochs.
    done = cnnlab("train", *preset_runs(tiny_overrides), "debug=overfit", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [verdict] = [line for line in done.stdout.splitlines() if line.startswith("Overfit check")]
    assert verdict.startswith("Overfit check passed: loss ")
    assert "the 20 samples of train.overfit_batches=2 after 300 epochs" in verdict

    run = store.only_run()
    assert run.info.status == "FINISHED" and run.data.tags["cnnlab.overfit"] == "passed"
    [(step, loss)] = store.history(run.info.run_id, "overfit_loss")
    assert step == 600 and loss < 0.05  # 300 epochs of 2 mini-batches
    losses = store.history(run.info.run_id, "train_loss")
    assert [s for s, _ in losses] == list(range(2, 601, 2))  # one mean loss per epoch
    assert losses[-1][1] < 0.05 < losses[0][1]


def test_overfit_fails_the_run_for_a_model_that_cannot_learn(tiny_overrides, tmp_path, store):
    done = cnnlab("train", *tiny_overrides, "debug=overfit", "optimizer.lr=1e-9",
                  "train.epochs=3", cwd=tmp_path)  # fmt: skip
    line = one_error_line(done)
    assert line.startswith("cnnlab-train: error: overfit check failed: loss ")
    assert "a model that cannot overfit 2 batches is wired wrong" in line
    assert "Overfit check passed" not in done.stdout

    run = store.only_run()
    assert run.info.status == "FAILED"
    assert run.data.tags["cnnlab.overfit"] == "failed"
    assert run.data.tags["cnnlab.error"].startswith("OverfitError: overfit check failed")
    [(step, loss)] = store.history(run.info.run_id, "overfit_loss")
    assert step == 6 and loss > 1  # ~ln(10): the model still guesses


LIMITED = [
    "train.epochs=2",
    "train.limit_batches=7",
    "train.log_every=3",
    "train.limit_eval_batches=1",
    "train.eval_batch_size=7",
    "tracking.log_model=false",
]


def test_limit_batches_sets_the_step_numbers_of_every_metric(tiny_data, tmp_path):
    store, run_id = train_in_process(tmp_path, tiny_data, *LIMITED)
    # 7 mini-batches an epoch (of 60): losses after batches 3 and 6 of each, and the 7th's
    # own (the epoch's last, partial window) at the epoch's end; test metrics at 7.
    assert [step for step, _ in store.history(run_id, "train_loss")] == [3, 6, 7, 10, 13, 14]
    for key in ("test_loss", "test_accuracy", "epoch"):
        assert [step for step, _ in store.history(run_id, key)] == [7, 14], key
    for _, accuracy in store.history(run_id, "test_accuracy"):
        assert abs(accuracy * 7 - round(accuracy * 7)) < 1e-9  # of the first 7 test images


@pytest.mark.integration  # a stopped run, resumed
def test_a_limited_run_resumes_mid_epoch_as_if_never_stopped(tiny_data, tiny_overrides, tmp_path,
                                                             store):  # fmt: skip
    extra = ["train.epochs=2", "train.limit_batches=40", "train.log_every=5",
             "tracking.log_model=false"]  # fmt: skip
    unbroken_store, unbroken_id = train_in_process(tmp_path / "unbroken", tiny_data, *extra)

    training = Running([*tiny_overrides, *extra], tmp_path)
    training.wait_for("Starting epoch 1")
    training.wait_for("Loss after mini-batch    15")
    training.proc.send_signal(signal.SIGINT)
    code, _ = training.finish(timeout=120)
    assert code == 130
    run_id = store.only_run().info.run_id

    done = cnnlab("train", f"train.resume={run_id}", f"tracking.uri={store.uri}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert store.only_run().info.status == "FINISHED"
    for key in ("train_loss", "test_accuracy"):
        assert store.history(run_id, key) == unbroken_store.history(unbroken_id, key), key
    assert store.history(run_id, "test_accuracy")[-1][0] == 80  # 2 epochs of 40 mini-batches
