"""One run on the real MNIST beside the checkout (../shared/data): the numbers a user will see."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import BIN, SHARED_MNIST, cli_env
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


@pytest.fixture
def real_mnist_root():
    if not (SHARED_MNIST / "MNIST" / "raw").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the real MNIST at {SHARED_MNIST}/MNIST/raw")
        pytest.skip(f"no real MNIST at {SHARED_MNIST}/MNIST/raw")
    return SHARED_MNIST


def test_one_epoch_on_real_mnist_beats_95_percent(real_mnist_root, tmp_path):
    # The article's network and optimizer; a larger batch and lr make one epoch enough.
    done = subprocess.run(
        [BIN / "cnnlab-train", f"data.root={real_mnist_root}", "train.epochs=1",
         "train.batch_size=32", "optimizer.lr=1e-3", "hardware=cpu",
         f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=tmp_path, capture_output=True, text=True, env=cli_env(), timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] > 0.95, done.stdout
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 60000 // 32 // 500
    assert list((real_mnist_root / "MNIST" / "raw").iterdir())  # used in place, nothing fetched
