"""Shared fixtures: tiny synthetic datasets in the real IDX format and the composed real config."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from cnnlab.data import FILES
from cnnlab.train import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data"  # real MNIST beside the checkout (CI, benchmarks)
BIN = Path(sys.executable).parent  # console scripts of the environment running the tests


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file: magic (0, 0, 0x08, ndim), big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def synthetic_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n 28x28 images whose class is a bright 6x6 square at one of ten places, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 5)
        images[i, 4 + row * 12 : 10 + row * 12, 2 + col * 5 : 8 + col * 5] = 255
    return images, labels


def write_dataset(
    raw_dir: Path, n_train: int = 600, n_test: int = 200, gz: bool = False
) -> dict[str, str]:
    """Write the four IDX files into raw_dir; return their md5s keyed like conf/data md5."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    train_x, train_y = synthetic_split(n_train, seed=1)
    test_x, test_y = synthetic_split(n_test, seed=2)
    arrays = {
        "train_images": train_x, "train_labels": train_y,
        "test_images": test_x, "test_labels": test_y,
    }  # fmt: skip
    md5 = {}
    for key, array in arrays.items():
        blob = idx_bytes(array)
        md5[key] = hashlib.md5(blob).hexdigest()
        name = FILES[key] + (".gz" if gz else "")
        (raw_dir / name).write_bytes(gzip.compress(blob) if gz else blob)
    return md5


def data_overrides(root: Path, md5: dict[str, str]) -> list[str]:
    """Overrides that point data=mnist at a synthetic set and switch fetching off."""
    return [
        f"data.root={root}",
        *(f"data.md5.{key}={value}" for key, value in md5.items()),
        "data.mirrors=[]",
        "data.npm_package=null",
    ]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A synthetic MNIST-format set (600 train, 200 test) at <root>/MNIST/raw, read-only use."""
    root = tmp_path_factory.mktemp("tiny-data")
    md5 = write_dataset(root / "MNIST" / "raw")
    return root, md5


@pytest.fixture
def tiny_overrides(tiny_data, tmp_path) -> list[str]:
    """Overrides for a seconds-long run on tiny data into a fresh temporary SQLite store."""
    root, md5 = tiny_data
    return [
        *data_overrides(root, md5),
        "train.epochs=1",
        "train.log_every=20",
        "hardware=cpu",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """Compose the real conf/ with overrides, as cnnlab-train would."""

    def _compose(overrides: list[str] | None = None) -> DictConfig:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=overrides or [])

    return _compose


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    # A developer's MLFLOW_TRACKING_URI or CNNLAB_DATA_ROOT must not leak into tests.
    for name in ("MLFLOW_TRACKING_URI", "CNNLAB_DATA_ROOT"):
        monkeypatch.delenv(name, raising=False)


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a cnnlab-train subprocess: the test's own, minus user tracking settings."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CNNLAB_DATA_ROOT")
    }
    env.update(extra)
    return env
