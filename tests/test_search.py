"""Searches (hydra/sweeper=cnnlab_optuna): pruned trials, RDB storage across joblib workers,
resuming a stopped study, the validation split they select on, and their bad settings."""

from __future__ import annotations

import csv
import io
import signal
from pathlib import Path

import optuna
import pytest
import torch

from cnnlab.data.load import load_dataset
from helpers import Running, Store, cnnlab, data_overrides, one_error_line

HOPELESS = "1e-09"  # Adam at this lr leaves the model where it started: chance accuracy


def tiny_search(tmp_path: Path) -> list[str]:
    """Overrides for a search preset on top of the shipped one: adam, batch size 10 (50
    mini-batches an epoch with 100 of the 600 samples held out), lr good or hopeless, each
    trial reporting every 5 mini-batches, pruned once one trial has completed."""
    preset = tmp_path / "conf" / "hparams_search"
    preset.mkdir(parents=True)
    (preset / "tiny.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - optuna_convnet\n"
        "data:\n  val_size: 100\n"
        "hydra:\n  sweeper:\n    n_trials: 6\n    params:\n"
        f"      optimizer.lr: choice(0.003, {HOPELESS})\n"
    )
    return [
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "hparams_search=tiny",
        "optimizer=adam", "train.batch_size=10", "train.log_every=5",
        "tracking.log_model=false", "hydra.sweeper.pruners.median.n_startup_trials=1",
        f"hydra.sweep.dir={tmp_path / 'search'}",
    ]  # fmt: skip


def search(args: list[str], cwd: Path):
    return cnnlab("train", "-m", *args, cwd=cwd, timeout=900)


def study(sweep_dir: Path, name: str = "optuna_convnet") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def csv_rows(store: Store, run_id: str, name: str, folder: Path) -> list[dict[str, str]]:
    local = store.client.download_artifacts(run_id, name, str(folder))
    return list(csv.DictReader(io.StringIO(Path(local).read_text())))


def assert_hopeless_trials_pruned(
    store: Store, sweep_dir: Path, tmp_path: Path, first_report: bool = True
) -> None:
    """Hopeless trials are pruned early: at their first report (mini-batch 5) if trials run one
    at a time, else before their epoch's end (trials that ran beside them may still have been
    hopeless ones, which weigh on the median); runs, Optuna and the parent's summary all say
    so. Trials that began before any ended have nothing to be compared with."""
    parent, children = store.sweep()
    trials = {t.number: t for t in study(sweep_dir).trials}
    assert len(trials) == 6 and len(children) == 6
    by_run = {t.user_attrs["cnnlab.run_id"]: t for t in trials.values()}
    good = {n for n, t in trials.items() if float(t.params["optimizer.lr"]) > 1e-6}
    first_done = min(trials[n].datetime_complete for n in good)
    pruned = []
    for run in children:
        trial = by_run[run.info.run_id]
        assert run.data.tags["cnnlab.trial"] == str(trial.number)
        if trial.number in good:
            assert trial.state.name == "COMPLETE" and run.info.status == "FINISHED"
        elif trial.state.name != "PRUNED":  # only one that began before a good one ended
            assert trial.state.name == "COMPLETE" and trial.datetime_start < first_done
        else:
            pruned.append(run)
            assert run.info.status == "KILLED"  # pruned: stopped early, resumable
            assert run.data.tags["cnnlab.trial_state"] == "PRUNED"
            assert run.data.tags["cnnlab.pruner"] == "median"
            step = int(run.data.tags["cnnlab.pruned_step"])
            assert step == 5 if first_report else step < 50
            assert trial.last_step == step
            # What it logged is kept: its losses and the value that pruned it.
            assert store.history(run.info.run_id, "val_accuracy")[-1][0] == step
            assert [s for s, _ in store.history(run.info.run_id, "train_loss")][-1] == step
            assert {a.path for a in store.client.list_artifacts(run.info.run_id, "checkpoints")}
    assert pruned, "the seeded sampler drew no hopeless lr after a good one"
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["cnnlab.best_selected_by"] == "val_accuracy"
    assert parent.data.metrics["search_pruned"] == len(pruned)
    assert parent.data.params["best.optimizer.lr"] == "0.003"
    rows = csv_rows(store, parent.info.run_id, "sweep_summary.csv", tmp_path)
    states = {r["run_id"]: r["status"] for r in rows}
    assert all(states[r.info.run_id] == "PRUNED" for r in pruned)
    best = [r for r in rows if r["selected_by"]]
    assert len(best) == 1 and best[0]["selected_by"] == "val_accuracy"
    history = csv_rows(store, parent.info.run_id, "search_history.csv", tmp_path)
    assert [int(r["trial"]) for r in history] == list(range(6))
    assert sum(int(r["minibatches"]) for r in history) == parent.data.metrics["search_minibatches"]


@pytest.mark.integration
def test_hopeless_learning_rates_are_pruned_early(tiny_overrides, tmp_path, store):
    done = search([*tiny_overrides, *tiny_search(tmp_path)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]  # pruning is not failure
    assert "pruned by the median pruner at mini-batch 5" in done.stdout
    assert_hopeless_trials_pruned(store, tmp_path / "search", tmp_path)


@pytest.mark.integration
def test_joblib_workers_are_pruned_through_the_storage(tiny_overrides, tmp_path, store):
    done = search(
        [*tiny_overrides, *tiny_search(tmp_path), "hydra/launcher=joblib",
         "hydra.launcher.n_jobs=2"],
        tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 at a time (each starting as soon as a slot frees)" in done.stdout
    assert "database is locked" not in done.stderr
    assert_hopeless_trials_pruned(store, tmp_path / "search", tmp_path, first_report=False)
    # Jobs are numbered as their trials: multirun folders 0..5, one per trial.
    assert sorted(int(p.name) for p in (tmp_path / "search").iterdir() if p.is_dir()) == [*range(6)]


@pytest.mark.integration
def test_a_stopped_search_resumes_to_its_trial_count(tiny_overrides, tmp_path, store):
    args = ["-m", *tiny_overrides, *tiny_search(tmp_path), "train.epochs=3"]
    first = Running(args, tmp_path)
    first.wait_for("Starting epoch 2")
    first.wait_for("Starting epoch 1")  # the second trial has begun
    first.proc.send_signal(signal.SIGINT)
    status, _ = first.finish()
    assert status != 0
    stopped = study(tmp_path / "search").trials
    assert [t.state.name for t in stopped] == ["COMPLETE", "FAIL"]
    assert stopped[1].user_attrs["cnnlab.interrupted"] is True

    again = search(args[1:], tmp_path)  # the same command: same sweep folder, storage, study
    assert again.returncode == 0, again.stderr[-3000:]
    assert "6 trials, 1 done already (resumed)" in again.stdout
    trials = study(tmp_path / "search").trials
    ended = [t for t in trials if not t.user_attrs.get("cnnlab.interrupted")]
    assert len(ended) == 6 and [t.number for t in trials] == list(range(7))
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in ended)


def test_the_validation_split_is_seeded_and_disjoint(tiny_data):
    root, md5 = tiny_data
    args = dict(name="mnist", dataset="MNIST", root=str(root), md5=md5, download=False)
    whole = load_dataset(**args)
    data = load_dataset(**args, val_size=100, split_seed=0)
    again = load_dataset(**args, val_size=100, split_seed=0)
    other = load_dataset(**args, val_size=100, split_seed=1)
    assert (len(data.train), len(data.val)) == (500, 100)
    assert torch.equal(data.val.images, again.val.images)  # seeded
    assert not torch.equal(data.val.images, other.val.images)
    rows = {bytes(img.flatten().tolist()) for img in whole.train.images}
    held = {bytes(img.flatten().tolist()) for img in data.val.images}
    kept = {bytes(img.flatten().tolist()) for img in data.train.images}
    assert not held & kept and held | kept == rows  # disjoint, and nothing lost
    # val_size=0 (the default): the very tensors the article's run has always trained on.
    assert load_dataset(**args, val_size=0).train is whole.train and whole.val is None


def test_val_size_zero_leaves_the_losses_unchanged(tiny_data, tmp_path):
    from helpers import train_in_process

    store, run_id = train_in_process(tmp_path / "a", tiny_data)
    again, zero_id = train_in_process(tmp_path / "b", tiny_data, "data.val_size=0")
    assert store.history(run_id, "train_loss") == again.history(zero_id, "train_loss")
    assert "val_accuracy" not in again.client.get_run(zero_id).data.metrics
    held, held_id = train_in_process(tmp_path / "c", tiny_data, "data.val_size=100")
    metrics = held.client.get_run(held_id).data.metrics
    assert "val_accuracy" in metrics and "test_accuracy" in metrics


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "hydra.sweeper.pruner=hyperbnd",
            "hydra.sweeper.pruner=hyperbnd is not a pruner; "
            "choose one of median, percentile, successive_halving, hyperband, none",
        ),
        ("hydra.sweeper.pruners.median.n_warmup_steps=-1", "hydra.sweeper.pruners.median: "),
        (
            "hydra.sweeper.pruner=hyperband hydra.sweeper.pruners.hyperband.reduction_factor=1",
            "hydra.sweeper.pruners.hyperband.reduction_factor=1 is invalid",
        ),
        ("data.val_size=-1", "data.val_size=-1 is invalid: expected an integer >= 0"),
        ("data.val_size=600", "data.val_size=600 leaves no training samples"),
        ("hydra.sweeper.n_trials=0", "hydra.sweeper.n_trials=0 is invalid"),
        ("optimizer.lr=interval(0.1,0.001)", "is an empty or reversed search space"),
        ("train.batch_size=range(64,16)", "is an empty or reversed search space"),
    ],
)
def test_bad_search_settings_are_one_line_errors(tiny_data, tmp_path, override, message):
    overrides = [*data_overrides(*tiny_data), "hardware=cpu", "tracking.enabled=false",
                 *override.split()]  # fmt: skip
    if override.startswith("hydra.sweeper.") or "(" in override:  # a search's setting
        overrides = ["-m", "hparams_search=optuna_convnet", "data.val_size=100", *overrides]
    done = cnnlab("train", *overrides, cwd=tmp_path)
    assert done.returncode == 1
    assert message in one_error_line(done)
