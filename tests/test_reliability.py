"""A tracking server that dies, hangs or wants a password; signals at any moment; chdir jobs;
a full disk. Real servers and processes, real signals; every wait is bounded."""

from __future__ import annotations

import re
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import BIN, MlflowServer, Proxy
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from cnnlab.tracking import load_model
from conftest import cli_env

pytestmark = pytest.mark.slow

LOSS = re.compile(r"Loss after mini-batch\s+(\d+): ([\d.]+)")


def train_args(tiny_overrides: list[str], uri: str, *extra: str) -> list[str]:
    """tiny_overrides pointed at `uri`."""
    args = [o for o in tiny_overrides if not o.startswith("tracking.uri=")]
    return [*args, f"tracking.uri={uri}", *extra]


class Training:
    """cnnlab-train running in the background; `wait_for` reads its stdout up to a line."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [BIN / "cnnlab-train", *args], cwd=cwd, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=env or cli_env(),
        )  # fmt: skip
        self.lines: list[str] = []
        self.times: dict[str, float] = {}

    def wait_for(self, prefix: str) -> None:
        """Read stdout until a line starts with `prefix` (fails if the process ends first)."""
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith(prefix):
                self.times[prefix] = time.monotonic()
                return
        raise AssertionError(f"no line {prefix!r}; stderr: {self.proc.stderr.read()[-3000:]}")

    def finish(self, timeout: float = 240) -> tuple[int, str]:
        """(exit status, stderr) once the process ends; stdout lines are kept in `lines`."""
        out, err = self.proc.communicate(timeout=timeout)
        self.lines += out.splitlines(keepends=True)
        self.times["end"] = time.monotonic()
        return self.proc.returncode, err

    def printed_losses(self) -> list[tuple[int, float]]:
        """(mini-batch, loss) as printed; global steps when every epoch has the same length."""
        per_epoch = [(int(m[1]), float(m[2])) for ln in self.lines if (m := LOSS.match(ln))]
        epoch, last, steps = 0, 0, []
        for batch, loss in per_epoch:
            if batch <= last:
                epoch += 1
            last = batch
            steps.append((batch + epoch * 60, loss))  # 600 samples / batch 10 = 60 per epoch
        return steps


def the_run(uri: str):
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    return client, run


def assert_complete(client: MlflowClient, run_id: str, training: Training, epochs: int) -> None:
    """Every printed loss arrived, in order, with the test metrics, checkpoint and model."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    logged = [(m.step, m.value) for m in client.get_metric_history(run_id, "train_loss")]
    printed = training.printed_losses()
    assert [s for s, _ in logged] == [s for s, _ in printed]
    assert [round(v, 3) for _, v in logged] == pytest.approx([v for _, v in printed], abs=1e-3)
    assert len(client.get_metric_history(run_id, "test_accuracy")) == epochs
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {"checkpoints/last.pt"}
    model = load_model(run.data.tags["cnnlab.model_uri"], client.tracking_uri)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path / "server", cli_env())
    srv.folder.mkdir()
    srv.start()
    yield srv
    srv.kill()


def test_a_server_killed_mid_run_and_back_before_the_end_gets_everything(
    tiny_overrides, tmp_path, server
):
    training = Training(
        train_args(tiny_overrides, server.url, "train.epochs=4", "train.log_every=5",
                   "tracking.flush_timeout=180", "tracking.request_timeout=2"),
        tmp_path,
    )  # fmt: skip
    training.wait_for("Starting epoch 1")  # the run and its params are in the store
    server.kill()
    training.wait_for("Epoch 4: test loss")  # trained on while the server was down
    assert training.times["Epoch 4: test loss"] - training.times["Starting epoch 1"] < 60
    server.start()
    code, stderr = training.finish()
    assert code == 0, stderr
    assert "failed" in stderr and "answers again" in stderr  # the user saw both
    client, run = the_run(server.url)
    assert_complete(client, run.info.run_id, training, epochs=4)
    assert not (tmp_path / "cnnlab-pending").exists()  # delivered: nothing left behind


def test_a_server_gone_until_the_end_keeps_the_logs_for_cnnlab_sync(
    tiny_overrides, tmp_path, server
):
    training = Training(
        train_args(tiny_overrides, server.url, "train.epochs=3", "train.log_every=5",
                   "tracking.flush_timeout=3", "tracking.request_timeout=2"),
        tmp_path,
    )  # fmt: skip
    training.wait_for("Starting epoch 1")
    run_id = re.search(r"\(([0-9a-f]{32})\)", "".join(training.lines))[1]
    server.kill()
    code, stderr = training.finish(timeout=120)
    assert code == 1
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    pending = tmp_path / "cnnlab-pending" / run_id
    assert last.startswith("cnnlab-train: error: tracking store")
    assert f"cnnlab-sync {pending}" in last
    assert (pending / "journal.jsonl").is_file()

    server.start()
    client = MlflowClient(server.url)
    assert client.get_run(run_id).info.status == "RUNNING"  # not falsely FINISHED
    synced = subprocess.run(
        [BIN / "cnnlab-sync", str(pending)], cwd=tmp_path, capture_output=True, text=True,
        env=cli_env(), timeout=120,
    )  # fmt: skip
    assert synced.returncode == 0, synced.stderr
    assert f"to run {run_id}" in synced.stdout
    assert_complete(client, run_id, training, epochs=3)
    assert not pending.exists()


def test_a_hanging_server_never_stalls_training(tiny_overrides, tmp_path, server):
    proxy = Proxy(server.port)
    url = f"http://127.0.0.1:{proxy.port}"
    training = Training(
        train_args(tiny_overrides, url, "train.epochs=3", "train.log_every=1",
                   "tracking.flush_timeout=3", "tracking.request_timeout=2"),
        tmp_path,
    )  # fmt: skip
    training.wait_for("Starting epoch 1")
    proxy.hang.set()  # /health would still have answered; now nothing does
    # 180 losses, each a request that would hang 2 s: training must not wait for any of them.
    code, stderr = training.finish(timeout=120)
    assert training.times["end"] - training.times["Starting epoch 1"] < 120, stderr
    assert code == 1 and "cnnlab-sync" in stderr.strip().splitlines()[-1]
    proxy.hang.clear()
    [pending] = (tmp_path / "cnnlab-pending").iterdir()
    synced = subprocess.run(
        [BIN / "cnnlab-sync"], cwd=tmp_path, capture_output=True, text=True, env=cli_env(),
        timeout=120,
    )  # fmt: skip
    assert synced.returncode == 0, synced.stderr
    client, run = the_run(server.url)
    assert len(training.printed_losses()) == 180
    assert_complete(client, run.info.run_id, training, epochs=3)
    proxy.close()


def test_a_password_in_the_tracking_uri_is_used_and_never_written(tiny_overrides, tmp_path, server):
    secret = "s3cret-Pa55"
    proxy = Proxy(server.port, credentials=("alice", secret))
    url = f"http://127.0.0.1:{proxy.port}"
    done = subprocess.run(
        [BIN / "cnnlab-train",
         *train_args(tiny_overrides, f"http://alice:{secret}@127.0.0.1:{proxy.port}")],
        cwd=tmp_path, capture_output=True, text=True, env=cli_env(), timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert secret not in done.stdout + done.stderr
    # Not in Hydra's output folder, nor anywhere else under the launch folder.
    for path in tmp_path.rglob("*"):
        if path.is_file() and "server" not in path.parts:
            assert secret.encode() not in path.read_bytes(), path
    client, run = the_run(server.url)  # read past the proxy: the server holds no secret either
    assert run.data.params["tracking.uri"] == url
    assert all(secret not in v for v in [*run.data.params.values(), *run.data.tags.values()])
    local = client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl"))
    for path in Path(local).rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    # The requests carried the credentials (the proxy refuses any without them).
    assert any(b"authorization: basic" in chunk.lower() for chunk in proxy.seen)

    # An unreachable server's error names the URI without the password.
    refused = subprocess.run(
        [BIN / "cnnlab-train", *train_args(tiny_overrides, f"http://alice:{secret}@127.0.0.1:9")],
        cwd=tmp_path, capture_output=True, text=True, env=cli_env(), timeout=120,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "http://127.0.0.1:9 is unreachable" in refused.stderr
    assert secret not in refused.stdout + refused.stderr
    proxy.close()


def test_sigterm_while_the_model_is_logged_ends_the_run_and_resume_finishes_it(
    tiny_overrides, tmp_path
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    training = Training(train_args(tiny_overrides, uri), tmp_path)
    training.wait_for("Epoch 1: test loss")  # the last epoch is done: the model is saved next
    training.proc.send_signal(signal.SIGTERM)
    code, stderr = training.finish()
    assert code == 128 + signal.SIGTERM
    assert "Traceback" not in stderr and "interrupted" in stderr.strip().splitlines()[-1]
    client, run = the_run(uri)
    assert run.info.status in ("KILLED", "FINISHED")  # never left RUNNING
    if run.info.status == "KILLED":
        resumed = subprocess.run(
            [BIN / "cnnlab-train", f"train.resume={run.info.run_id}", f"tracking.uri={uri}"],
            cwd=tmp_path, capture_output=True, text=True, env=cli_env(), timeout=300,
        )  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr
        run = client.get_run(run.info.run_id)
        assert run.info.status == "FINISHED" and "cnnlab.model_uri" in run.data.tags


def test_resume_marks_a_model_left_pending_failed(tiny_overrides, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = subprocess.run(
        [BIN / "cnnlab-train", *train_args(tiny_overrides, uri, "train.epochs=2")],
        cwd=tmp_path, capture_output=True, text=True, env=cli_env(), timeout=300,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    client, run = the_run(uri)
    run_id = run.info.run_id
    # What a process SIGKILLed while creating its model leaves: a PENDING model, a RUNNING run.
    orphan = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run_id)
    client.update_run(run_id, status="RUNNING")
    resumed = subprocess.run(
        [BIN / "cnnlab-train", f"train.resume={run_id}", f"tracking.uri={uri}"],
        cwd=tmp_path, capture_output=True, text=True, env=cli_env(), timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert client.get_logged_model(orphan.model_id).status == LoggedModelStatus.FAILED
    assert client.get_run(run_id).info.status == "FINISHED"
    models = client.search_logged_models([run.info.experiment_id])
    assert {m.status for m in models} == {LoggedModelStatus.READY, LoggedModelStatus.FAILED}


def test_chdir_jobs_share_the_launch_folders_store_and_data(tiny_data, tmp_path):
    root, md5 = tiny_data
    (tmp_path / "data").symlink_to(root, target_is_directory=True)  # data.root=data, relative
    args = [
        *(f"data.md5.{key}={value}" for key, value in md5.items()),
        "data.root=data", "data.mirrors=[]", "data.npm_package=null", "train.epochs=1",
        "train.log_every=20", "hardware=cpu", "tracking.log_model=false", "hydra.job.chdir=true",
    ]  # fmt: skip
    single = subprocess.run(
        [BIN / "cnnlab-train", *args], cwd=tmp_path, capture_output=True, text=True,
        env=cli_env(), timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr
    swept = subprocess.run(
        [BIN / "cnnlab-train", "-m", *args, "train.seed=1,2"], cwd=tmp_path,
        capture_output=True, text=True, env=cli_env(), timeout=300,
    )  # fmt: skip
    assert swept.returncode == 0, swept.stderr
    assert "Fetched" not in single.stdout + swept.stdout  # the launch folder's data was found
    stores = [p for p in tmp_path.rglob("mlflow.db")]
    assert stores == [tmp_path / "mlflow.db"]  # one store, where `mlflow ui` is started
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4  # run, parent, 2 children
    for folder in ("outputs", "multirun"):  # nothing fetched into, or stored in, a job's folder
        assert not list((tmp_path / folder).rglob("MNIST"))
        assert not list((tmp_path / folder).rglob("cnnlab-pending"))


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_during_a_run_is_one_line_and_the_run_resumes(tiny_overrides, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = train_args(tiny_overrides, uri, "train.epochs=2", "tracking.log_model=false")
    # The store exists first; then every file written may grow to 1 MB, less than a
    # checkpoint (model + Adam state: ~2.6 MB), as on a disk with that much room left.
    probe = subprocess.run(
        [BIN / "cnnlab-train", *args, "train.epochs=1", "tracking.run_name=probe"],
        cwd=tmp_path, capture_output=True, text=True, env=cli_env(), timeout=300,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    full = subprocess.run(
        [BIN / "cnnlab-train", *args, "tracking.run_name=full"], cwd=tmp_path,
        capture_output=True, text=True, env=cli_env(), timeout=300,
        preexec_fn=_file_size_limit(1_000_000),
    )  # fmt: skip
    assert full.returncode == 1
    lines = full.stderr.strip().splitlines()
    assert "Traceback" not in full.stderr
    assert lines[-1].startswith("cnnlab-train: error: cannot write the checkpoint")
    assert "free disk space" in lines[-1] and "train.resume=" in lines[-1]
    client = MlflowClient(uri)
    [run] = client.search_runs(
        [client.get_experiment_by_name("cnnlab").experiment_id],
        filter_string="attributes.run_name = 'full'",
    )
    assert run.info.status == "FAILED"  # not left RUNNING
    assert client.get_metric_history(run.info.run_id, "train_loss")  # what it logged is kept
