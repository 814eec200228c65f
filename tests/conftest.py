"""Fixtures: a tiny synthetic dataset in the real IDX format, a fresh store per test, the
composed real config, and the real servers shared by the tests that need them: an mlflow server
on SQLite, and the team deployment (mlflow server on PostgreSQL 15)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from cnnlab.config.compose import CONF_DIR
from helpers import MlflowServer, Store, cli_env, data_overrides, unavailable, write_dataset
from postgres import PostgreSQL, PostgresUnavailable


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A synthetic MNIST-format set (600 train, 200 test) at <root>/MNIST/raw, read-only use."""
    root = tmp_path_factory.mktemp("tiny-data")
    md5 = write_dataset(root / "MNIST" / "raw")
    return root, md5


@pytest.fixture
def store(tmp_path) -> Store:
    """A new SQLite store in the test's folder (created by the first run)."""
    return Store(f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture
def tiny_overrides(tiny_data, tmp_path, store) -> list[str]:
    """Overrides for a seconds-long run on tiny data into `store`; logs wait in the test's
    folder (tracking.pending_dir), also for runs trained in the test's own process."""
    root, md5 = tiny_data
    return [
        *data_overrides(root, md5),
        "train.epochs=1",
        "train.log_every=20",
        "hardware=cpu",
        f"tracking.uri={store.uri}",
        f"tracking.pending_dir={tmp_path / 'cnnlab-pending'}",
    ]


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """Compose the real conf/ with overrides, as cnnlab-train would."""

    def _compose(overrides: list[str] | None = None) -> DictConfig:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=overrides or [])

    return _compose


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> MlflowServer:
    """A real `mlflow server` on loopback (SQLite backend, proxied artifacts) for the session.

    Tests that kill it start it again; tests use their own experiment names.
    """
    folder = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(folder, cli_env()).start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL 15 server for the session (per test worker), on loopback."""
    # Not under pytest's folders: PostgreSQL runs as the OS user postgres, which must get through
    # every folder above its data, and pytest's are private to us.
    db = PostgreSQL(Path(tempfile.mkdtemp(prefix="cnnlab-postgres-")))
    try:
        db.start()
    except PostgresUnavailable as exc:
        db.stop()
        shutil.rmtree(db.folder, ignore_errors=True)
        unavailable("PostgreSQL", str(exc))
    yield db
    db.stop()
    shutil.rmtree(db.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def team_server(postgres, tmp_path_factory) -> MlflowServer:
    """The team deployment: `mlflow server --backend-store-uri postgresql://...
    --artifacts-destination DIR --serve-artifacts --host 127.0.0.1 --port P`."""
    folder = tmp_path_factory.mktemp("team-server")
    server = MlflowServer(folder, cli_env(), backend_store_uri=postgres.uri)
    yield server.start(timeout=300)  # a new database is migrated first
    server.kill()


@pytest.fixture(scope="session", autouse=True)
def _data_cache_dir(tmp_path_factory):
    # Decoded datasets are cached in the user's cache dir: never ~/.cache from a test. Set in
    # os.environ, so cnnlab subprocesses inherit it; one per session, so tests share warm caches.
    previous = os.environ.get("CNNLAB_CACHE_DIR")
    os.environ["CNNLAB_CACHE_DIR"] = str(tmp_path_factory.mktemp("cnnlab-cache"))
    yield
    if previous is None:
        os.environ.pop("CNNLAB_CACHE_DIR", None)
    else:
        os.environ["CNNLAB_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    # A developer's tracking settings or data root must not leak into tests.
    for name in ("MLFLOW_TRACKING_URI", "CNNLAB_DATA_ROOT", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items):
    # A test that starts a server or a cluster is an integration test, deselected by default,
    # whether or not it also says so.
    for item in items:
        if item.get_closest_marker("server") or item.get_closest_marker("cluster"):
            item.add_marker(pytest.mark.integration)
