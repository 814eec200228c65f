"""Sweeps from the command line: grouped runs, failures, parallel jobs on SQLite, Optuna."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from helpers import Store, cnnlab


def sweep(args: list[str], cwd: Path):
    return cnnlab("train", "-m", *args, cwd=cwd, timeout=900)


def runs_by_role(store: Store):
    return store.client, *store.sweep()


def test_a_sweep_is_one_parent_with_named_children_and_a_summary(tiny_overrides, tmp_path, store):
    done = sweep(
        [*tiny_overrides, "optimizer=adam,sgd", "optimizer.lr=1e-3,1e30", "train.log_every=5",
         "tracking.log_model=false"],
        cwd=tmp_path,
    )  # fmt: skip
    # The two lr=1e30 jobs blow up; the sweep goes on and says so in its exit status.
    assert done.returncode != 0
    assert "2 sweep job(s) failed" in done.stderr
    client, parent, children = runs_by_role(store)

    names = sorted(r.info.run_name for r in children)
    assert names == [
        "optimizer=adam,optimizer.lr=0.001", "optimizer=adam,optimizer.lr=1e+30",
        "optimizer=sgd,optimizer.lr=0.001", "optimizer=sgd,optimizer.lr=1e+30",
    ]  # fmt: skip
    status = {r.info.run_name: r.info.status for r in children}
    assert status["optimizer=adam,optimizer.lr=1e+30"] == "FAILED"
    assert status["optimizer=adam,optimizer.lr=0.001"] == "FINISHED"
    assert parent.info.status == "FAILED"
    assert "optimizer=adam,sgd" in parent.data.tags["cnnlab.overrides"]

    finished = [r for r in children if r.info.status == "FINISHED"]
    best = max(finished, key=lambda r: r.data.metrics["test_accuracy"])
    assert parent.data.tags["cnnlab.best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_test_accuracy"] == best.data.metrics["test_accuracy"]
    assert best.info.run_name == (
        f"optimizer={parent.data.params['best.optimizer']},"
        f"optimizer.lr={parent.data.params['best.optimizer.lr']}"
    )

    local = client.download_artifacts(parent.info.run_id, "sweep_summary.csv", str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(Path(local).read_text())))
    assert sorted(r["run_name"] for r in rows) == names
    failed = [r for r in rows if r["status"] == "FAILED"]
    assert len(failed) == 2 and all("NonFiniteLossError" in r["error"] for r in failed)
    assert all(r["optimizer.lr"] == "1e+30" for r in failed)

    # Hydra's outputs: multirun/<date>/<time>/<job>/ under the launch directory.
    jobs = sorted(p.name for p in tmp_path.glob("multirun/*/*/*") if p.is_dir())
    assert jobs == ["0", "1", "2", "3"]


@pytest.mark.integration
def test_jobs_failing_before_their_run_exists_still_fail_the_sweep(tiny_overrides, tmp_path, store):
    # batch_size=0 fails validation before any run is opened; tracking is off altogether.
    done = sweep([*tiny_overrides, "train.batch_size=0,10", "tracking.enabled=false"], tmp_path)
    assert done.returncode != 0
    assert "1 sweep job(s) failed: #0 " in done.stderr and "train.batch_size=0" in done.stderr
    assert "Epoch 1: test loss" in done.stdout  # the other job still ran


@pytest.mark.integration
def test_parallel_jobs_on_sqlite_lose_nothing(tiny_overrides, tmp_path, store):
    seeds = ",".join(str(s) for s in range(1, 9))
    done = sweep(
        [*tiny_overrides, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
         f"train.seed={seeds}", "train.log_every=10"],
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "database is locked" not in done.stderr
    client, parent, children = runs_by_role(store)
    assert len(children) == 8 and parent.info.status == "FINISHED"
    for run in children:
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 6
        assert "cnnlab.model_uri" in run.data.tags
        assert {a.path for a in client.list_artifacts(run.info.run_id, "config")} == {
            "config/config.yaml", "config/overrides.yaml",
        }  # fmt: skip
    assert sorted(r.data.params["train.seed"] for r in children) == sorted(seeds.split(","))


@pytest.mark.integration
def test_optuna_search_records_failed_trials_and_goes_on(tiny_overrides, tmp_path, store):
    # A preset on top of the shipped one whose lr choices include one that always diverges.
    preset = tmp_path / "conf" / "hparams_search"
    preset.mkdir(parents=True)
    (preset / "tiny.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - optuna_convnet\n"
        "data:\n  val_size: 100\n"  # of the tiny set's 600
        "hydra:\n  sweeper:\n    n_trials: 5\n    params:\n"
        "      optimizer: choice(adam, sgd)\n"
        "      optimizer.lr: choice(0.001, 1e30)\n"
        "      train.batch_size: choice(10, 20)\n"
    )
    done = sweep(
        [*tiny_overrides, f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
         "hparams_search=tiny", "train.log_every=2", "tracking.log_model=false"],
        cwd=tmp_path,
    )  # fmt: skip
    client, parent, children = runs_by_role(store)
    assert len(children) == 5  # every trial ran, failed ones included
    failed = [r for r in children if r.info.status == "FAILED"]
    # The sampler is seeded: these 5 trials include diverging ones and good ones.
    assert failed and len(failed) < 5
    assert all(r.data.params["optimizer.lr"] == "1e+30" for r in failed)
    assert done.returncode != 0 and f"{len(failed)} sweep job(s) failed" in done.stderr
    assert parent.info.run_name == "sweep optuna_convnet"
    assert {"optimizer", "optimizer.lr", "train.batch_size"} <= set(
        parent.data.tags["cnnlab.swept"].split(",")
    )
