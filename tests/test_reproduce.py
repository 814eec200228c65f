"""Reproduce a run from the store alone; evaluate and predict with logged models."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import BIN, cli_env, synthetic_split


def cli(prog: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BIN / prog, *args], cwd=cwd, capture_output=True, text=True, env=cli_env(), timeout=300
    )


@pytest.fixture
def logged_run(tiny_overrides, tmp_path) -> tuple[str, str]:
    """(tracking uri, run id) of a finished 2-epoch run on tiny data with its model."""
    done = cli("cnnlab-train", [*tiny_overrides, "train.epochs=2", "train.log_every=10"], tmp_path)
    assert done.returncode == 0, done.stderr
    uri = next(o.split("=", 1)[1] for o in tiny_overrides if o.startswith("tracking.uri="))
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    return uri, run.info.run_id


def test_reproduce_reruns_the_logged_config_to_identical_numbers(logged_run, tmp_path):
    uri, run_id = logged_run
    # A changed conf/ or launch directory must not matter: only the store is read.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = cli("cnnlab-reproduce", [run_id, f"tracking.uri={uri}"], elsewhere)
    assert done.returncode == 0, done.stderr
    assert "result            IDENTICAL" in done.stdout
    assert "12 shared steps, 12 identical" in done.stdout
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    [copy] = [r for r in runs if r.info.run_id != run_id]
    assert copy.data.tags["cnnlab.reproduces"] == run_id
    assert copy.data.params == {k: v for k, v in client.get_run(run_id).data.params.items()} | {
        "tracking.uri": uri,
        "tracking.run_name": copy.info.run_name,
    }


def test_reproduce_with_an_override_and_a_mismatch(logged_run, tmp_path):
    uri, run_id = logged_run
    more = cli("cnnlab-reproduce", [run_id, f"tracking.uri={uri}", "train.epochs=3"], tmp_path)
    assert more.returncode == 0, more.stderr  # the 2 shared epochs agree; the 3rd is new
    assert "(12 vs 18 points)" in more.stdout
    other = cli("cnnlab-reproduce", [run_id, f"tracking.uri={uri}", "train.seed=7"], tmp_path)
    assert other.returncode != 0
    assert "result            DIFFERENT" in other.stdout
    assert "differs from the source run" in other.stderr
    bad = cli("cnnlab-reproduce", [run_id, f"tracking.uri={uri}", "optimizer=sgd"], tmp_path)
    assert bad.returncode != 0 and "needs cnnlab-train" in bad.stderr


def test_eval_scores_a_logged_model_like_the_run_did(logged_run, tiny_overrides, tmp_path):
    uri, run_id = logged_run
    data = [o for o in tiny_overrides if o.startswith("data.")]
    done = cli("cnnlab-eval", [run_id, *data, f"tracking.uri={uri}"], tmp_path)
    assert done.returncode == 0, done.stderr
    accuracy = MlflowClient(uri).get_run(run_id).data.metrics["test_accuracy"]
    assert f"test accuracy {accuracy:.4%}" in done.stdout


def test_predict_reads_any_image_and_reports_bad_ones(logged_run, tmp_path):
    uri, run_id = logged_run
    images, labels = synthetic_split(3, seed=2)
    Image.fromarray(images[0]).save(tmp_path / "plain.png")
    # Big, colour, dark-on-light, JPEG: converted like the training data.
    big = np.kron(255 - images[1], np.ones((8, 8), dtype=np.uint8))
    Image.fromarray(big).convert("RGB").save(tmp_path / "big.jpg", quality=95)
    (tmp_path / "notes.png").write_text("not an image")
    done = cli(
        "cnnlab-predict",
        [run_id, "plain.png", "missing.png", "big.jpg", "notes.png", f"tracking.uri={uri}"],
        tmp_path,
    )
    assert done.returncode != 0  # two files could not be read
    lines = done.stdout.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["plain.png", "big.jpg"]
    assert "inverted" in lines[1] and "inverted" not in lines[0]
    probabilities = [float(p.split(":")[1]) for p in lines[0].split("[")[1].rstrip("]").split()]
    assert len(probabilities) == 10 and abs(sum(probabilities) - 1) < 0.006  # 3-decimal rounding
    assert "missing.png: cannot read an image" in done.stderr
    assert "notes.png: cannot read an image" in done.stderr
