"""Sweeps on Ray (hydra/launcher=ray): against a real Ray head on loopback, and on a Ray the
sweep starts for itself.

Sweeps are launched from the test's folder, which is neither the repository nor the folder the
head runs in, as on a cluster whose nodes share a filesystem: jobs must run in the launch
directory to find their sweep's parent run and data, and to leave their outputs there.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from helpers import Running, Store, cli_env, cnnlab, free_port, one_error_line, unavailable
from ray_head import RayHead

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.xdist_group("ray")]


@pytest.fixture(scope="module", autouse=True)
def _own_ray_home(tmp_path_factory):
    """A home of the module's own for the head and every driver: Ray 2.60 turns token
    authentication on wherever it finds ~/.ray/auth_token, which a developer's earlier Ray
    (a sweep that started its own) leaves behind, and the head and drivers must agree."""
    saved = os.environ.get("HOME")
    os.environ["HOME"] = str(tmp_path_factory.mktemp("ray-home"))
    yield
    os.environ["HOME"] = saved or ""


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, _own_ray_home):
    """A 2-CPU Ray head for the module; its workers start in a folder of their own.

    With OMP_NUM_THREADS=2 its workers' torch would take 2 threads by default (Ray sets the
    variable only where it is unset): a job given 1 CPU must still train on 1.
    """
    env = cli_env(OMP_NUM_THREADS="2")
    try:
        head = RayHead(tmp_path_factory.mktemp("ray-head"), num_cpus=2, env=env).start()
    except (RuntimeError, OSError) as exc:
        unavailable("Ray", str(exc))
    yield head
    head.stop()


@pytest.fixture
def launch_dir(tmp_path, tiny_data) -> tuple[Path, list[str]]:
    """The test's folder with the tiny data set at ./data: (folder, overrides for a short run
    that reads data and stores runs at paths relative to it)."""
    root, md5 = tiny_data
    (tmp_path / "data").symlink_to(root)
    return tmp_path, [
        "data.root=data", *(f"data.md5.{k}={v}" for k, v in md5.items()), "data.mirrors=[]",
        "data.npm_package=null", "train.epochs=1", "train.log_every=20", "hardware=cpu",
        "tracking.log_model=false", "hydra/launcher=ray",
    ]  # fmt: skip


def summary_rows(store: Store, parent, folder: Path) -> list[dict[str, str]]:
    local = store.client.download_artifacts(parent.info.run_id, "sweep_summary.csv", str(folder))
    return list(csv.DictReader(io.StringIO(Path(local).read_text())))


def test_a_sweep_on_a_ray_cluster_is_one_parent_with_its_children(ray_head, launch_dir):
    folder, overrides = launch_dir
    # No tracking.uri: the default store, ./mlflow.db, is the launch directory's.
    done = cnnlab(
        "train", "-m", *overrides, f"hydra.launcher.ray.init.address={ray_head.address}",
        "optimizer=adam,sgd", "train.seed=1,2", cwd=folder, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    store = Store(f"sqlite:///{folder / 'mlflow.db'}")
    parent, children = store.sweep()
    names = sorted(r.info.run_name for r in children)
    assert names == [
        "optimizer=adam,train.seed=1", "optimizer=adam,train.seed=2",
        "optimizer=sgd,train.seed=1", "optimizer=sgd,train.seed=2",
    ]  # fmt: skip
    assert parent.info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" for r in children)
    # One CPU per job by default (Ray's num_cpus), and torch used that many threads.
    assert {r.data.tags["cnnlab.threads"] for r in children} == {"1"}

    best = max(children, key=lambda r: r.data.metrics["test_accuracy"])
    assert parent.data.tags["cnnlab.best_run_id"] == best.info.run_id
    rows = summary_rows(store, parent, folder)
    assert sorted(r["run_name"] for r in rows) == names
    assert {r["status"] for r in rows} == {"FINISHED"}

    # Hydra's outputs are in the launch directory, none where the workers started.
    sweep_dir = next(folder.glob("multirun/*/*"))
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    assert (sweep_dir / "0" / ".hydra" / "config.yaml").is_file()
    assert not list(ray_head.folder.glob("multirun"))


def test_a_failed_ray_job_is_a_failed_child_and_the_sweep_goes_on(ray_head, launch_dir):
    folder, overrides = launch_dir
    # The store comes from the launching shell's environment, which Ray's workers don't have;
    # without it they would log to ./mlflow.db.
    store = Store(f"sqlite:///{folder / 'team.db'}")
    done = cnnlab(
        "train", "-m", *overrides, f"hydra.launcher.ray.init.address={ray_head.address}",
        "hydra.launcher.ray.remote.num_cpus=2", "optimizer.lr=1e-3,1e30",
        cwd=folder, timeout=600, env=cli_env(MLFLOW_TRACKING_URI=store.uri),
    )  # fmt: skip
    assert done.returncode != 0
    # The job's own line comes through Ray; cnnlab's one-line verdict is the last line.
    assert "cnnlab-train: job failed: NonFiniteLossError" in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("cnnlab-train: error: 1 sweep job(s) failed: #1 "), done.stderr[-3000:]
    assert "optimizer.lr=1e+30" in last

    parent, children = store.sweep()
    status = {r.info.run_name: r.info.status for r in children}
    assert status == {"optimizer.lr=0.001": "FINISHED", "optimizer.lr=1e+30": "FAILED"}
    assert parent.info.status == "FAILED"
    assert parent.data.tags["cnnlab.best_run_name"] == "optimizer.lr=0.001"
    assert {r.data.tags["cnnlab.threads"] for r in children} == {"2"}
    [failed] = [r for r in summary_rows(store, parent, folder) if r["status"] == "FAILED"]
    assert failed["optimizer.lr"] == "1e+30" and "NonFiniteLossError" in failed["error"]
    assert list(folder.glob("multirun/*/*/cnnlab-failed-1.txt"))


def test_a_job_whose_ray_worker_dies_fails_and_the_sweep_goes_on(ray_head, launch_dir):
    folder, overrides = launch_dir
    sweep = Running(
        ["-m", *overrides, f"hydra.launcher.ray.init.address={ray_head.address}",
         "hydra.launcher.ray.remote.num_cpus=2", "train.epochs=3", "train.seed=1,2"],
        cwd=folder, env=cli_env(PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    # Ray prefixes a job's lines with its worker's pid; the jobs run one after the other. The
    # first is killed once its run exists.
    while "Starting epoch" not in (first := sweep.wait_for("(cnnlab_job pid=")):
        pass
    os.kill(int(first.split("pid=", 1)[1].split(")", 1)[0]), signal.SIGKILL)
    code, stderr = sweep.finish(timeout=300)

    assert code != 0
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("cnnlab-train: error: 1 sweep job(s) failed: #"), stderr[-3000:]
    assert "its Ray worker died" in stderr
    parent, children = Store(f"sqlite:///{folder / 'mlflow.db'}").sweep()
    # The other job ran after it; the killed job's run, which nobody was left to end, is
    # closed FAILED with the reason, not left RUNNING.
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED"]
    [lost] = [r for r in children if r.info.status == "FAILED"]
    assert "its Ray worker died" in lost.data.tags["cnnlab.error"]
    assert parent.info.status == "FAILED" and "cnnlab.best_run_id" in parent.data.tags


def test_a_sweep_given_no_ray_head_fails_at_once_in_one_line(launch_dir):
    folder, overrides = launch_dir
    address = f"127.0.0.1:{free_port()}"  # nothing listens: ray.init would retry for ever
    done = cnnlab(
        "train", "-m", *overrides, f"hydra.launcher.ray.init.address={address}",
        "train.seed=1,2", cwd=folder, timeout=120,
    )  # fmt: skip
    line = one_error_line(done)
    assert f"hydra.launcher.ray.init.address={address}" in line and "ray start --head" in line
    parent, children = Store(f"sqlite:///{folder / 'mlflow.db'}").sweep()
    assert parent.info.status == "FAILED" and children == []


def test_with_no_address_a_sweep_runs_on_a_ray_of_its_own_and_stops_it(launch_dir):
    folder, overrides = launch_dir
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's sockets: short paths
    try:
        done = cnnlab(
            "train", "-m", *overrides, f"+hydra.launcher.ray.init._temp_dir={temp}",
            "+hydra.launcher.ray.init.include_dashboard=false", "train.seed=1,2",
            cwd=folder, timeout=600, env=cli_env(RAY_ADDRESS="", HOME=str(folder)),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Started a local Ray instance" in done.stderr
        parent, children = Store(f"sqlite:///{folder / 'mlflow.db'}").sweep()
        assert [r.info.status for r in children] == ["FINISHED", "FINISHED"]
        # The Ray it started ended with it: no process left that uses its folder.
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert str(temp) not in ps
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_ctrl_c_stops_ray_jobs_as_killed_resumable_runs(ray_head, launch_dir):
    folder, overrides = launch_dir
    sweep = Running(
        ["-m", *overrides, f"hydra.launcher.ray.init.address={ray_head.address}",
         "train.epochs=500", "train.seed=1,2"],
        cwd=folder, env=cli_env(PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    training = set()  # the workers (one CPU each) whose job has started training
    while len(training) < 2:
        line = sweep.wait_for("(cnnlab_job pid=")
        if "Starting epoch" in line:
            training.add(line.split(")", 1)[0])
    sweep.proc.send_signal(signal.SIGINT)
    code, stderr = sweep.finish(timeout=120)

    assert code == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last == "cnnlab-train: interrupted; an open run is marked KILLED"
    store = Store(f"sqlite:///{folder / 'mlflow.db'}")
    parent, children = store.sweep()
    # Not left RUNNING by workers Ray killed: each job stopped as on Ctrl-C, with a checkpoint.
    assert parent.info.status == "KILLED"
    assert [r.info.status for r in children] == ["KILLED", "KILLED"]
    for run in children:
        assert [a.path for a in store.client.list_artifacts(run.info.run_id, "checkpoints")] == [
            "checkpoints/last.pt"
        ]
