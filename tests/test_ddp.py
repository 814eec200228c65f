"""Data-parallel training under torchrun: one MLflow run for all ranks, the single process's
numbers, interrupts and resume, several "nodes" through one rendezvous (gloo, on loopback)."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import BIN, Running, Store, cli_env, cnnlab, free_port

pytestmark = pytest.mark.integration  # torchrun

TORCHRUN = BIN / "torchrun"


def standalone(nproc: int = 2) -> list[str | Path]:
    """torchrun on this machine with `nproc` ranks (its own rendezvous on a free port)."""
    return [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "--no-python"]


def torchrun(args: list[str], cwd: Path, launcher: list, timeout: float = 300):
    return subprocess.run(
        [*launcher, BIN / "cnnlab-train", *args], cwd=cwd, capture_output=True, text=True,
        env=cli_env(), timeout=timeout,
    )  # fmt: skip


def weights(store: Store, run_id: str, folder: Path) -> dict[str, torch.Tensor]:
    """The model weights in a run's last checkpoint."""
    local = store.client.download_artifacts(run_id, "checkpoints/last.pt", str(folder / run_id))
    return torch.load(local, weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= tol, f"weights differ by up to {worst}"


def run_id_of(done) -> str:
    return re.search(r"MLflow run \S+ \(([0-9a-f]{32})\)", done.stdout)[1]


def test_two_processes_log_one_run_equal_to_a_single_process(tiny_overrides, tmp_path, store):
    # 599 training samples (one held out): the last batch, 19, splits 10/9 over the ranks.
    args = [*tiny_overrides, "train.batch_size=20", "train.log_every=5", "hardware.threads=1",
            "data.val_size=1"]  # fmt: skip
    single = cnnlab("train", *args, "tracking.experiment=single", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    ddp = torchrun([*args, "tracking.experiment=ddp"], tmp_path, standalone(2))
    assert ddp.returncode == 0, ddp.stderr
    assert ddp.stdout.count("Training process has finished.") == 1  # rank 0 speaks for all

    [run] = store.runs("ddp")  # exactly one run, from rank 0
    [alone] = store.runs("single")
    assert run.info.status == "FINISHED"
    losses = store.history(run.info.run_id, "train_loss")
    assert [s for s, _ in losses] == [5, 10, 15, 20, 25, 30]  # 599 samples / 20 per batch
    expected = store.history(alone.info.run_id, "train_loss")
    assert [v for _, v in losses] == pytest.approx([v for _, v in expected], abs=1e-5)
    assert run.data.metrics["test_accuracy"] == alone.data.metrics["test_accuracy"]
    assert_same_weights(
        weights(store, run.info.run_id, tmp_path), weights(store, alone.info.run_id, tmp_path),
        tol=1e-5,
    )  # fmt: skip
    assert len(list((tmp_path / "outputs").glob("*/*"))) == 2  # one folder per run, not per rank


def test_a_batch_that_does_not_split_over_the_ranks_is_a_config_error(
    tiny_overrides, tmp_path, store
):
    done = torchrun([*tiny_overrides, "train.batch_size=15"], tmp_path, standalone(2))
    assert done.returncode != 0
    assert (
        "train.batch_size=15 is the global batch and must be divisible by the 2 processes"
        in done.stderr
    )
    # One line from each rank; the traceback torchrun prints is its own (a worker failed).
    assert "cnnlab/" not in done.stderr.split("Traceback", 1)[-1]
    assert not store.runs()  # no run was created


def test_two_nodes_through_one_rendezvous_train_one_run(tiny_overrides, tmp_path, store):
    port = free_port()
    node = [
        TORCHRUN, "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=cnnlab-test", "--no-python",
    ]  # fmt: skip
    args = [*tiny_overrides, "train.batch_size=20", "hardware.threads=1"]
    agents = [Running(args, tmp_path, launcher=node) for _ in range(2)]
    results = [agent.finish(timeout=300) for agent in agents]
    assert [code for code, _ in results] == [0, 0], results
    [run] = store.runs()
    assert run.info.status == "FINISHED"
    assert sum("".join(a.lines).count("Training process has finished.") for a in agents) == 1


def test_interrupted_under_torchrun_then_resumed_ends_as_if_never_stopped(
    tiny_overrides, tmp_path, store
):
    args = [*tiny_overrides, "train.epochs=6", "train.batch_size=2", "train.log_every=50",
            "hardware.threads=1", "tracking.log_model=false"]  # fmt: skip
    whole = torchrun([*args, "tracking.experiment=whole"], tmp_path, standalone(2))
    assert whole.returncode == 0, whole.stderr

    training = Running([*args, "tracking.experiment=cut"], tmp_path, launcher=standalone(2))
    training.wait_for("Starting epoch 2")
    training.wait_for("Loss after mini-batch   100")
    training.proc.send_signal(signal.SIGTERM)  # torchrun hands it to every rank
    code, _ = training.finish(timeout=120)
    assert code != 0
    [cut] = store.runs("cut")
    assert cut.info.status == "KILLED"

    resumed = torchrun([f"train.resume={cut.info.run_id}", f"tracking.uri={store.uri}"],
                       tmp_path, standalone(2))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    [cut] = store.runs("cut")
    [unbroken] = store.runs("whole")
    assert cut.info.status == "FINISHED"
    logged = sorted(store.history(cut.info.run_id, "train_loss"))
    expected = store.history(unbroken.info.run_id, "train_loss")
    assert [s for s, _ in logged] == [s for s, _ in expected]  # no step lost or repeated
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], abs=1e-6)
    assert_same_weights(
        weights(store, cut.info.run_id, tmp_path), weights(store, unbroken.info.run_id, tmp_path),
        tol=1e-6,
    )  # fmt: skip


def test_a_rank_killed_outright_fails_the_run_resumably(tiny_overrides, tmp_path, store):
    args = [*tiny_overrides, "train.epochs=50", "train.batch_size=2", "train.log_every=50",
            "hardware.threads=1", "tracking.log_model=false"]  # fmt: skip
    training = Running(args, tmp_path, launcher=standalone(2))
    training.wait_for("Starting epoch 2")  # epoch 1's checkpoint is in the store
    ranks = subprocess.run(["pgrep", "-P", str(training.proc.pid)], capture_output=True,
                           text=True).stdout.split()  # fmt: skip
    assert len(ranks) == 2
    # The rank that logs nothing: rank 0's is the first the agent started.
    subprocess.run(["kill", "-KILL", max(ranks, key=int)], check=True)
    code, stderr = training.finish(timeout=180)
    assert code != 0
    assert "another rank of the torchrun job stopped" in stderr
    [run] = store.runs()
    assert run.info.status == "FAILED"  # never left RUNNING
    assert "another rank" in run.data.tags["cnnlab.error"]
    # Resumable: the last epoch's checkpoint is there for train.resume.
    assert store.client.list_artifacts(run.info.run_id, "checkpoints")


def test_a_sweep_under_torchrun_is_refused_before_any_rank_starts_it(
    tiny_overrides, tmp_path, store
):
    done = torchrun(["-m", *tiny_overrides, "optimizer.lr=1e-3,1e-4"], tmp_path, standalone(2))
    assert done.returncode != 0
    assert "a sweep (-m) can't run under torchrun" in done.stderr
    assert not store.runs()  # no parent run per rank, no run at all
    assert not (tmp_path / "multirun").exists()
