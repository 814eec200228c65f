"""One run on the real MNIST beside the checkout (../shared/data): the numbers a user will see."""

from __future__ import annotations

import os

import pytest

from helpers import SHARED_MNIST, Store, cnnlab

pytestmark = pytest.mark.integration  # the real MNIST


@pytest.fixture
def real_mnist_root():
    if not (SHARED_MNIST / "MNIST" / "raw").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the real MNIST at {SHARED_MNIST}/MNIST/raw")
        pytest.skip(f"no real MNIST at {SHARED_MNIST}/MNIST/raw")
    return SHARED_MNIST


def test_one_epoch_on_real_mnist_beats_95_percent(real_mnist_root, tmp_path):
    # The article's network and optimizer; a larger batch and lr make one epoch enough. One
    # thread: the suite's other worker trains beside it on the second core.
    raw = real_mnist_root / "MNIST" / "raw"
    before = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    store = Store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    done = cnnlab(
        "train", f"data.root={real_mnist_root}", "train.epochs=1", "train.batch_size=32",
        "optimizer.lr=1e-3", "hardware=cpu", "hardware.threads=1", f"tracking.uri={store.uri}",
        cwd=tmp_path,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    run = store.only_run()
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] > 0.95, done.stdout
    # 1875 mini-batches: a loss every 500, and the last 375's at the epoch's end.
    steps = [step for step, _ in store.history(run.info.run_id, "train_loss")]
    assert steps == [500, 1000, 1500, 1875]
    # Used in place: nothing fetched, nothing written beside the files.
    assert "Fetched" not in done.stdout
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == before
