"""Reproduce a run from the store alone; evaluate and predict with its logged model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cnnlab import CnnlabError
from cnnlab.tracking.queries import run_config
from helpers import (
    Store,
    cli_env,
    cnnlab,
    data_overrides,
    one_error_line,
    synthetic_split,
    train_in_process,
)


@pytest.fixture(scope="module")
def logged_run(tiny_data, tmp_path_factory) -> tuple[Store, str]:
    """(store, run id) of a finished 2-epoch run on tiny data with its model."""
    folder = tmp_path_factory.mktemp("reproduce")
    return train_in_process(folder, tiny_data, "train.epochs=2", "train.log_every=10")


def reproduce(store: Store, run_id: str, cwd, *overrides: str):
    """cnnlab-reproduce of `run_id` and the run it created (None if it made none)."""
    before = {r.info.run_id for r in store.runs()}
    done = cnnlab("reproduce", run_id, f"tracking.uri={store.uri}", *overrides, cwd=cwd)
    new = [r for r in store.runs() if r.info.run_id not in before]
    return done, (new[0] if new else None)


def test_reproduce_reruns_the_logged_config_to_identical_numbers(logged_run, tmp_path):
    store, run_id = logged_run
    # The launch directory and today's conf/ don't matter: only the store is read.
    done, copy = reproduce(store, run_id, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "result            IDENTICAL" in done.stdout
    assert "12 shared steps, 12 identical" in done.stdout
    assert copy.data.tags["cnnlab.reproduces"] == run_id
    source = store.client.get_run(run_id)
    assert copy.data.params == source.data.params | {"tracking.run_name": copy.info.run_name}
    assert copy.info.run_name == f"reproduce {source.info.run_name}"
    assert store.history(copy.info.run_id, "train_loss") == store.history(run_id, "train_loss")


@pytest.mark.integration  # three reproductions
def test_reproduce_with_an_override_and_a_mismatch(logged_run, tmp_path):
    store, run_id = logged_run
    more, _ = reproduce(store, run_id, tmp_path, "train.epochs=3")
    assert more.returncode == 0, more.stderr  # the 2 shared epochs agree; the 3rd is new
    assert "(12 vs 18 points)" in more.stdout
    other, _ = reproduce(store, run_id, tmp_path, "train.seed=7")
    assert other.returncode != 0
    assert "result            DIFFERENT" in other.stdout
    assert other.stderr.strip().splitlines()[-1] == (
        "cnnlab-reproduce: error: the reproduction differs from the source run"
    )
    bad, created = reproduce(store, run_id, tmp_path, "optimizer=sgd")
    assert bad.returncode != 0 and "needs cnnlab-train" in bad.stderr and created is None


def test_eval_scores_a_logged_model_like_the_run_did(logged_run, tiny_data, tmp_path):
    store, run_id = logged_run
    data = data_overrides(*tiny_data)
    done = cnnlab("eval", run_id, *data, f"tracking.uri={store.uri}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    accuracy = store.client.get_run(run_id).data.metrics["test_accuracy"]
    assert f"test accuracy {accuracy:.4%}" in done.stdout


def test_predict_converts_any_image_like_the_training_data(logged_run, tmp_path):
    store, run_id = logged_run
    images, labels = synthetic_split(3, seed=2)
    Image.fromarray(images[0]).save(tmp_path / "plain.png")
    # Big, colour, dark-on-light, JPEG: converted like the training data.
    big = np.kron(255 - images[0], np.ones((8, 8), dtype=np.uint8))
    Image.fromarray(big).convert("RGB").save(tmp_path / "big.jpg", quality=95)
    done = cnnlab(
        "predict", run_id, "plain.png", "big.jpg", f"tracking.uri={store.uri}", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    plain, big_line = done.stdout.strip().splitlines()
    assert plain.startswith("plain.png: class ") and big_line.startswith("big.jpg: class ")
    assert "inverted" in big_line and "inverted" not in plain
    # The same digit, inverted and enlarged, gets the same class.
    assert plain.split()[2] == big_line.split()[2]
    probabilities = [float(p.split(":")[1]) for p in plain.split("[")[1].rstrip("]").split()]
    assert len(probabilities) == 10 and abs(sum(probabilities) - 1) < 0.006  # 3-decimal rounding


def test_a_logged_config_is_never_resolved_again(tiny_data, tmp_path):
    # Someone who can write to the store puts an interpolation into a run's logged config: a
    # command that reads it back would resolve it here, and log this machine's secret.
    store, run_id = train_in_process(tmp_path, tiny_data)
    local = store.client.download_artifacts(run_id, "config/config.yaml", str(tmp_path))
    logged = yaml.safe_load(Path(local).read_text())
    logged["data"]["name"] = "${oc.env:SECRET_TOKEN}"
    crafted = tmp_path / "crafted" / "config.yaml"
    crafted.parent.mkdir()
    crafted.write_text(yaml.safe_dump(logged))
    store.client.log_artifact(run_id, str(crafted), "config")

    # Every command reads a logged config through run_config (eval and resume too): refused.
    says = f"run {run_id}'s logged config holds an interpolation at data.name"
    with pytest.raises(CnnlabError, match=re.escape(says)):
        run_config(store.uri, run_id)
    done = cnnlab("reproduce", run_id, f"tracking.uri={store.uri}", cwd=tmp_path,
                  env=cli_env(SECRET_TOKEN="hunter2"))  # fmt: skip
    error = one_error_line(done)
    assert says in error and "hunter2" not in error
    [run] = store.runs()  # no new run, and the one there is as it was
    assert run.info.status == "FINISHED" and "hunter2" not in str(run.data)
