"""A run sent to a real `mlflow server` on loopback: the one-setting switch from the local store."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request

import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnlab.tracking import load_model
from conftest import BIN, cli_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env(),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"mlflow server did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_a_run_goes_to_the_server_with_one_setting(tiny_overrides, tmp_path, mlflow_server):
    overrides = [o for o in tiny_overrides if not o.startswith("tracking.uri=")]
    done = subprocess.run(
        [BIN / "cnnlab-train", *overrides, f"tracking.uri={mlflow_server}"],
        cwd=tmp_path, capture_output=True, text=True, env=cli_env(), timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the local default store

    client = MlflowClient(mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [
        20,
        40,
        60,
    ]
    model = load_model(run.data.tags["cnnlab.model_uri"], mlflow_server)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
