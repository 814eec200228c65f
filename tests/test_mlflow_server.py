"""A run sent to a real `mlflow server` on loopback: the one-setting switch from the local store."""

from __future__ import annotations

import pytest
import torch

from cnnlab.inference.loaded import load_model
from helpers import Store, cnnlab

pytestmark = [pytest.mark.integration, pytest.mark.server]


def test_a_run_goes_to_the_server_with_one_setting(tiny_overrides, tmp_path, mlflow_server):
    overrides = [o for o in tiny_overrides if not o.startswith("tracking.uri=")]
    done = cnnlab(
        "train", *overrides, f"tracking.uri={mlflow_server.url}", "tracking.experiment=one-setting",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the local default store

    server = Store(mlflow_server.url)
    run = server.only_run("one-setting")
    assert run.info.status == "FINISHED"
    assert [step for step, _ in server.history(run.info.run_id, "train_loss")] == [20, 40, 60]
    model = load_model(run.data.tags["cnnlab.model_uri"], mlflow_server.url)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
