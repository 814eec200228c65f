"""A tracking server that dies, hangs or wants a password; signals at any moment; chdir jobs;
a full disk. Real servers and processes, real signals; every wait is bounded."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from cnnlab.inference.loaded import load_model
from helpers import Proxy, Running, Store, cnnlab, file_size_limit, train_in_process

LOSS = re.compile(r"Loss after mini-batch\s+(\d+): ([\d.]+)")


def train_args(tiny_overrides: list[str], uri: str, *extra: str) -> list[str]:
    """tiny_overrides pointed at `uri`; on a shared server, in an experiment of their own."""
    args = [o for o in tiny_overrides if not o.startswith("tracking.uri=")]
    return [*args, f"tracking.uri={uri}", *extra]


def training_against(
    tiny_overrides: list[str], cwd: Path, uri: str, experiment: str, *extra: str
) -> Running:
    """A tiny run in the background against `uri`, with short timeouts for a failing server."""
    args = train_args(tiny_overrides, uri, experiment, "tracking.request_timeout=2", *extra)
    return Running(args, cwd)


@pytest.fixture
def server(mlflow_server, request):
    """The session's server, running again after the test whatever the test did to it; and an
    experiment name for this test alone."""
    yield mlflow_server, f"tracking.experiment={request.node.name[:60]}"
    if mlflow_server.proc is None:
        mlflow_server.start()


def printed_losses(training: Running) -> list[tuple[int, float]]:
    """(global mini-batch, loss) as the run printed them (60 mini-batches an epoch)."""
    per_epoch = [(int(m[1]), float(m[2])) for ln in training.lines if (m := LOSS.match(ln))]
    epoch, last, steps = 0, 0, []
    for batch, loss in per_epoch:
        if batch <= last:
            epoch += 1
        last = batch
        steps.append((batch + epoch * 60, loss))  # 600 samples / batch 10 = 60 per epoch
    return steps


def the_run(uri: str, experiment: str):
    """The one run of `experiment` (an override `tracking.experiment=...`) in the store at `uri`."""
    store = Store(uri)
    return store.client, store.only_run(experiment.split("=", 1)[1])


def assert_complete(client: MlflowClient, run_id: str, training: Running, epochs: int) -> None:
    """Every printed loss arrived, in order, with the test metrics, checkpoint and model."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    logged = [(m.step, m.value) for m in client.get_metric_history(run_id, "train_loss")]
    printed = printed_losses(training)
    assert [s for s, _ in logged] == [s for s, _ in printed]
    assert [round(v, 3) for _, v in logged] == pytest.approx([v for _, v in printed], abs=1e-3)
    assert len(client.get_metric_history(run_id, "test_accuracy")) == epochs
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {"checkpoints/last.pt"}
    model = load_model(run.data.tags["cnnlab.model_uri"], client.tracking_uri)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.integration
@pytest.mark.server
def test_a_server_killed_mid_run_and_back_before_the_end_gets_everything(
    tiny_overrides, tmp_path, server
):
    server, experiment = server
    training = training_against(
        tiny_overrides, tmp_path, server.url, experiment, "train.epochs=4", "train.log_every=5",
        "tracking.flush_timeout=180",
    )  # fmt: skip
    training.wait_for("Starting epoch 1")  # the run and its params are in the store
    server.kill()
    training.wait_for("Epoch 4: test loss")  # trained on while the server was down
    assert training.times["Epoch 4: test loss"] - training.times["Starting epoch 1"] < 60
    server.start()
    code, stderr = training.finish()
    assert code == 0, stderr
    assert "failed" in stderr and "answers again" in stderr  # the user saw both
    client, run = the_run(server.url, experiment)
    assert_complete(client, run.info.run_id, training, epochs=4)
    assert not (tmp_path / "cnnlab-pending").exists()  # delivered: nothing left behind


@pytest.mark.integration
@pytest.mark.server
def test_a_server_gone_until_the_end_keeps_the_logs_for_cnnlab_sync(
    tiny_overrides, tmp_path, server
):
    server, experiment = server
    training = training_against(
        tiny_overrides, tmp_path, server.url, experiment, "train.epochs=3", "train.log_every=5",
        "tracking.flush_timeout=3",
    )  # fmt: skip
    line = training.wait_for("MLflow run ")
    run_id = re.search(r"\(([0-9a-f]{32})\)", line)[1]
    training.wait_for("Starting epoch 1")
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
    synced = cnnlab("sync", pending, cwd=tmp_path, timeout=120)
    assert synced.returncode == 0, synced.stderr
    assert f"to run {run_id}" in synced.stdout
    assert_complete(client, run_id, training, epochs=3)
    assert not pending.exists()


@pytest.mark.integration
@pytest.mark.server
def test_a_slow_but_healthy_server_gets_the_whole_run(tiny_overrides, tmp_path, server):
    # Every request answered after 1 s: delivering the run takes far longer than
    # tracking.flush_timeout=4 s, but no single write does, so the run's end waits on and the
    # run is FINISHED, complete (it used to give up after 4 s: exit 1, the run left RUNNING).
    server, experiment = server
    proxy = Proxy(server.port, delay=1.0)
    url = f"http://127.0.0.1:{proxy.port}"
    training = training_against(
        tiny_overrides, tmp_path, url, experiment, "train.epochs=2", "train.log_every=5",
        "tracking.flush_timeout=4",
    )  # fmt: skip
    code, stderr = training.finish(timeout=600)
    assert code == 0, stderr
    client, run = the_run(server.url, experiment)
    assert_complete(client, run.info.run_id, training, epochs=2)
    assert not (tmp_path / "cnnlab-pending").exists()  # delivered: nothing left behind
    proxy.close()


@pytest.mark.integration
@pytest.mark.server
def test_a_hanging_server_never_stalls_training(tiny_overrides, tmp_path, server):
    server, experiment = server
    proxy = Proxy(server.port)
    url = f"http://127.0.0.1:{proxy.port}"
    training = training_against(
        tiny_overrides, tmp_path, url, experiment, "train.epochs=3", "train.log_every=1",
        "tracking.flush_timeout=3",
    )  # fmt: skip
    training.wait_for("Starting epoch 1")
    proxy.hang.set()  # /health would still have answered; now nothing does
    # 180 losses, each a request that would hang 2 s: training must not wait for any of them.
    code, stderr = training.finish(timeout=120)
    assert training.times["end"] - training.times["Starting epoch 1"] < 120, stderr
    assert code == 1 and "cnnlab-sync" in stderr.strip().splitlines()[-1]
    proxy.hang.clear()
    synced = cnnlab("sync", cwd=tmp_path, timeout=120)  # every run waiting in ./cnnlab-pending
    assert synced.returncode == 0, synced.stderr
    client, run = the_run(server.url, experiment)
    assert len(printed_losses(training)) == 180
    assert_complete(client, run.info.run_id, training, epochs=3)
    proxy.close()


@pytest.mark.integration
@pytest.mark.server
def test_a_password_in_the_tracking_uri_is_used_and_never_written(tiny_overrides, tmp_path, server):
    server, experiment = server
    secret = "s3cret-Pa55"
    proxy = Proxy(server.port, credentials=("alice", secret))
    url = f"http://127.0.0.1:{proxy.port}"
    done = cnnlab(
        "train", *train_args(tiny_overrides, f"http://alice:{secret}@127.0.0.1:{proxy.port}",
                             experiment),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert secret not in done.stdout + done.stderr
    # Not in Hydra's output folder, nor anywhere else under the launch folder.
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    client, run = the_run(server.url, experiment)  # past the proxy: the server has no secret
    assert run.data.params["tracking.uri"] == url
    assert all(secret not in v for v in [*run.data.params.values(), *run.data.tags.values()])
    local = client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl"))
    for path in Path(local).rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    # The requests carried the credentials (the proxy refuses any without them).
    assert any(b"authorization: basic" in chunk.lower() for chunk in proxy.seen)

    # An unreachable server's error names the URI without the password.
    refused = cnnlab(
        "train", *train_args(tiny_overrides, f"http://alice:{secret}@127.0.0.1:9"), cwd=tmp_path
    )
    assert refused.returncode != 0
    assert "http://127.0.0.1:9 is unreachable" in refused.stderr
    assert secret not in refused.stdout + refused.stderr
    proxy.close()


@pytest.mark.integration  # a real failure mid-run, then recovery
def test_sigterm_while_the_model_is_logged_ends_the_run_and_resume_finishes_it(
    tiny_overrides, tmp_path, store
):
    training = Running(tiny_overrides, tmp_path)
    training.wait_for("Epoch 1: test loss")  # the last epoch is done: the model is saved next
    training.proc.send_signal(signal.SIGTERM)
    code, stderr = training.finish()
    assert code == 128 + signal.SIGTERM
    assert "Traceback" not in stderr and "interrupted" in stderr.strip().splitlines()[-1]
    run = store.only_run()
    assert run.info.status in ("KILLED", "FINISHED")  # never left RUNNING
    if run.info.status == "KILLED":
        resumed = cnnlab(
            "train", f"train.resume={run.info.run_id}", f"tracking.uri={store.uri}", cwd=tmp_path
        )
        assert resumed.returncode == 0, resumed.stderr
        run = store.client.get_run(run.info.run_id)
        assert run.info.status == "FINISHED" and "cnnlab.model_uri" in run.data.tags


@pytest.mark.integration  # a real failure mid-run, then recovery
def test_resume_marks_a_model_left_pending_failed(tiny_data, tmp_path):
    store, run_id = train_in_process(tmp_path, tiny_data, "train.epochs=2")
    client, run = store.client, store.only_run()
    # What a process SIGKILLed while creating its model leaves: a PENDING model, a RUNNING run.
    orphan = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run_id)
    client.update_run(run_id, status="RUNNING")
    resumed = cnnlab("train", f"train.resume={run_id}", f"tracking.uri={store.uri}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert client.get_logged_model(orphan.model_id).status == LoggedModelStatus.FAILED
    assert client.get_run(run_id).info.status == "FINISHED"
    models = client.search_logged_models([run.info.experiment_id])
    assert LoggedModelStatus.PENDING not in {m.status for m in models}
    latest = client.get_run(run_id).data.tags["cnnlab.model_uri"].removeprefix("models:/")
    assert client.get_logged_model(latest).status == LoggedModelStatus.READY


@pytest.mark.integration  # a sweep
def test_chdir_jobs_share_the_launch_folders_store_and_data(tiny_data, tmp_path):
    root, md5 = tiny_data
    (tmp_path / "data").symlink_to(root, target_is_directory=True)  # data.root=data, relative
    args = [
        *(f"data.md5.{key}={value}" for key, value in md5.items()),
        "data.root=data", "data.mirrors=[]", "data.npm_package=null", "train.epochs=1",
        "train.log_every=20", "hardware=cpu", "tracking.log_model=false", "hydra.job.chdir=true",
    ]  # fmt: skip
    single = cnnlab("train", *args, cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    swept = cnnlab("train", "-m", *args, "train.seed=1,2", cwd=tmp_path)
    assert swept.returncode == 0, swept.stderr
    assert "Fetched" not in single.stdout + swept.stdout  # the launch folder's data was found
    assert list(tmp_path.rglob("mlflow.db")) == [tmp_path / "mlflow.db"]  # where `mlflow ui` runs
    runs = Store(f"sqlite:///{tmp_path / 'mlflow.db'}").runs()
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4  # run, parent, 2 children
    for folder in ("outputs", "multirun"):  # nothing fetched into, or kept in, a job's folder
        assert not list((tmp_path / folder).rglob("MNIST"))
        assert not list((tmp_path / folder).rglob("cnnlab-pending"))


@pytest.mark.integration  # a real failure mid-run, then recovery
def test_a_full_disk_during_a_run_is_one_line_and_keeps_what_was_logged(
    tiny_overrides, tmp_path, store
):
    args = [*tiny_overrides, "train.epochs=2", "tracking.log_model=false"]
    # The store exists first; then no file written may grow past 1.5 MB, less than a
    # checkpoint (model + Adam state: ~2.6 MB), as on a disk with that much room left.
    probe = cnnlab("train", *args, "train.epochs=1", "tracking.run_name=probe", cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    full = cnnlab(
        "train", *args, "tracking.run_name=full", cwd=tmp_path,
        preexec_fn=file_size_limit(1_500_000),
    )  # fmt: skip
    assert full.returncode == 1
    lines = full.stderr.strip().splitlines()
    assert "Traceback" not in full.stderr
    assert lines[-1].startswith("cnnlab-train: error: cannot write the checkpoint")
    assert "free disk space" in lines[-1] and "train.resume=" in lines[-1]
    [run] = store.runs(where="attributes.run_name = 'full'")
    assert run.info.status == "FAILED"  # not left RUNNING
    assert store.history(run.info.run_id, "train_loss")  # what it logged is kept
