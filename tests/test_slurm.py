"""Sweeps on a real SLURM cluster (hydra/launcher=slurm) logging to the team server (PostgreSQL):
jobs as child runs, failures, models loaded back, and a preempted job that SLURM requeues
continuing its own run to the unbroken losses; and the same launcher's local flavour
(hydra/launcher=submitit_local), with a job killed outright."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import (
    BIN,
    Store,
    assert_complete,
    cli_env,
    cnnlab,
    data_overrides,
    train_in_process,
    unavailable,
)
from slurm import SlurmCluster, SlurmError

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.xdist_group("slurm")]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """One private SLURM cluster (munged, slurmctld, slurmd on loopback) for the module."""
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmError as exc:
        unavailable("SLURM", str(exc))
    yield cluster
    cluster.stop()


def test_a_slurm_sweep_on_the_team_server_is_one_parent_with_children_failures_and_a_summary(
    slurm, team_server, tiny_data, tiny_overrides, tmp_path
):
    # The set-up of a team: jobs on the cluster, runs on the PostgreSQL-backed server.
    on_server = [o for o in tiny_overrides if not o.startswith("tracking.uri=")]
    done = cnnlab(
        "train", "-m", *on_server, f"tracking.uri={team_server.url}", "tracking.experiment=slurm",
        "hydra/launcher=slurm", "optimizer=adam,sgd", "optimizer.lr=1e-3,3e-3,1e30",
        cwd=tmp_path, env=cli_env(SLURM_CONF=str(slurm.conf)), timeout=600,
    )  # fmt: skip
    # The two lr=1e30 jobs diverge; the other four go on, and the exit status says so.
    assert done.returncode != 0, done.stdout[-3000:]
    assert "2 sweep job(s) failed" in done.stderr, done.stderr[-3000:]

    store = Store(team_server.url)
    parent, children = store.sweep("slurm")
    status = {r.info.run_name: r.info.status for r in children}
    assert status == {
        "optimizer=adam,optimizer.lr=0.001": "FINISHED",
        "optimizer=adam,optimizer.lr=0.003": "FINISHED",
        "optimizer=sgd,optimizer.lr=0.001": "FINISHED",
        "optimizer=sgd,optimizer.lr=0.003": "FINISHED",
        "optimizer=adam,optimizer.lr=1e+30": "FAILED",
        "optimizer=sgd,optimizer.lr=1e+30": "FAILED",
    }
    assert parent.info.status == "FAILED"
    # Nothing lost on the way from the nodes: every loss, the test metrics, the checkpoint and a
    # READY model for each finished job (600 images in batches of 10, a loss every 20th).
    finished = [r for r in children if r.info.status == "FINISHED"]
    for child in finished:
        assert_complete(store, child, steps=[20, 40, 60], epochs=1)
    # Each job ran as a SLURM job with the preset's cpus_per_task=1 (this machine has 2 cores),
    # and torch followed it (hardware.threads=0).
    assert {r.data.tags["cnnlab.threads"] for r in children} == {"1"}

    local = store.client.download_artifacts(parent.info.run_id, "sweep_summary.csv", str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(Path(local).read_text())))
    assert {r["run_name"]: r["status"] for r in rows} == status
    assert all("NonFiniteLossError" in r["error"] for r in rows if r["status"] == "FAILED")

    # Submitit's per-job logs sit in the sweep folder, one per SLURM array task.
    [sweep_dir] = tmp_path.glob("multirun/*/*")
    assert len(list(sweep_dir.glob(".submitit/*_*/*_log.out"))) == 6

    # A model trained on the cluster loads through the server in another process.
    best = parent.data.tags["cnnlab.best_run_id"]
    evaluated = cnnlab(
        "eval", best, f"tracking.uri={team_server.url}", *data_overrides(*tiny_data), cwd=tmp_path
    )
    assert evaluated.returncode == 0, evaluated.stderr
    accuracy = store.client.get_run(best).data.metrics["test_accuracy"]
    assert f"test accuracy {accuracy:.4%}" in evaluated.stdout


def test_submitit_local_runs_a_sweep_as_child_runs_without_a_cluster(
    tiny_overrides, tmp_path, store
):
    # The plugin's own preset: jobs as local processes, through the same pickled launcher.
    done = cnnlab(
        "train", "-m", *tiny_overrides, "tracking.log_model=false", "hydra/launcher=submitit_local",
        "train.seed=1,2", cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    parent, children = store.sweep()
    assert sorted(r.info.run_name for r in children) == ["train.seed=1", "train.seed=2"]
    assert {r.info.status for r in [parent, *children]} == {"FINISHED"}


def test_a_job_killed_outright_is_a_failed_job_and_the_sweep_goes_on(
    tiny_overrides, tmp_path, store
):
    # SIGKILL (the OOM killer, a node lost): the job leaves no result. The plugin's launcher
    # raised at the first such job and stopped waiting for the others; cnnlab's waits for all.
    args = [*tiny_overrides, "tracking.log_model=false", "hydra/launcher=submitit_local",
            "train.epochs=50", "train.seed=1,2"]  # fmt: skip
    with sweep_in_background(args, tmp_path, cli_env()) as sweep:
        wait_for_line(tmp_path, "Loss after mini-batch", sweep)
        # The launcher's child is submitit's controller; the jobs are the controller's children.
        jobs = [p for c in _children(sweep.pid) for p in _children(c)]
        assert all("submitit.core._submit" in _cmdline(p) for p in jobs) and jobs
        os.kill(jobs[0], signal.SIGKILL)
        out, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 1, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("cnnlab-train: error: 1 sweep job(s) failed")
    parent, children = store.sweep()
    assert parent.info.status == "FAILED"
    # The killed job's run is closed FAILED with the reason; the other one went on.
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED"]
    [lost] = [r for r in children if r.info.status == "FAILED"]
    assert "ended without a result" in lost.data.tags["cnnlab.error"]


def _children(pid: int) -> list[int]:
    """The PIDs of `pid`'s child processes."""
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


PREEMPTED = [
    "train.epochs=2",
    "train.batch_size=2",
    "train.log_every=5",
    "tracking.log_model=false",
]


def test_a_preempted_job_is_requeued_and_continues_its_run_to_the_unbroken_losses(
    slurm, tiny_data, tiny_overrides, tmp_path, store
):
    # The same run never interrupted, trained here: 2 epochs of 300 mini-batches, on one thread
    # as the SLURM job (cpus_per_task=1): the losses drift apart in the 7th digit with two.
    reference, reference_id = train_in_process(
        tmp_path / "reference", tiny_data, *PREEMPTED, "hardware.threads=1"
    )
    unbroken = reference.history(reference_id, "train_loss")
    assert len(unbroken) == 120

    args = [*tiny_overrides, *PREEMPTED, "hydra/launcher=slurm"]
    with sweep_in_background(args, tmp_path, cli_env(SLURM_CONF=str(slurm.conf))) as sweep:
        log = wait_for_line(tmp_path, "Loss after mini-batch", sweep)
        [job_id] = slurm.running_jobs()
        # What SLURM sends before a job's time limit, and a preempting scheduler may send:
        # submitit's requeue signal.
        subprocess.run(["scancel", "--signal=USR2", job_id], env=slurm.env, check=True, timeout=30)
        out, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, err[-3000:]
    assert slurm.job_field(job_id, "Restarts") == "1"  # SLURM ran the job a second time

    text = log.read_text()
    assert text.count("Starting with JobEnvironment") == 2  # the log kept both attempts
    assert "this job is preempted" in text and "Requeued job" in text
    assert "resuming at mini-batch" in text  # stopped mid-epoch, continued from there

    parent, [child] = store.sweep()  # the same run, continued: not a second one
    assert f"continuing its run {child.info.run_id}" in text
    assert child.info.status == "FINISHED" and parent.info.status == "FINISHED"
    assert store.history(child.info.run_id, "train_loss") == unbroken
    assert store.history(child.info.run_id, "test_accuracy") == reference.history(
        reference_id, "test_accuracy"
    )


@contextmanager
def sweep_in_background(args: list[str], cwd: Path, env: dict[str, str]):
    """`cnnlab-train -m *args` running in its own session; on the way out, if it still runs,
    it and every process it started (submitit's controller and jobs) are killed."""
    sweep = subprocess.Popen(
        [BIN / "cnnlab-train", "-m", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        yield sweep
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()


def wait_for_line(folder: Path, text: str, sweep: subprocess.Popen, timeout: float = 180) -> Path:
    """The submitit log under `folder` once it holds `text` (fails if the sweep ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert sweep.poll() is None, sweep.communicate()[1][-3000:]
        for log in folder.glob("multirun/*/*/.submitit/*/*_log.out"):
            if text in log.read_text(errors="replace"):
                return log
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} in a job's log after {timeout} s")
