"""Bring your own data: a folder of the user's images, described by a data option in the user's
own config folder, trains, logs its class names, and is evaluated, predicted and reproduced
from the logged config alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers import Store, cnnlab

pytestmark = pytest.mark.xdist_group("image-folder")

# ~/my_conf/data/shapes.yaml as the README shows it: cnnlab's option, then the user's values.
USER_DATA = """\
defaults: [imagefolder]
root: {root}
image_size: [16, 16]
preprocess: {{mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25], crop_padding: 2, flip: true}}
"""


def photo(path: Path, colour: int, size: tuple[int, int], seed: int) -> None:
    """A noisy RGB picture whose dominant channel is `colour` (0 red, 2 blue), any size."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 90, (size[1], size[0], 3))
    pixels[..., colour] += 160
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    """A user's folder: photos/{red,blue}/*.png (no train/test split), conf/data/shapes.yaml,
    and one training run of the ConvNet on it."""
    home = tmp_path_factory.mktemp("shapes")
    for i in range(30):
        for name, colour in (("red", 0), ("blue", 2)):
            photo(home / "photos" / name / f"{i}.png", colour, (20 + i % 7, 18 + i % 5), i)
    (home / "conf" / "data").mkdir(parents=True)
    (home / "conf" / "data" / "shapes.yaml").write_text(USER_DATA.format(root=home / "photos"))
    store = Store(f"sqlite:///{home / 'mlflow.db'}")
    uri = f"tracking.uri={store.uri}"
    done = cnnlab(
        "train", "--config-dir", home / "conf", "data=shapes", "train.epochs=3",
        "optimizer.lr=0.01", "train.log_every=5", "hardware=cpu", uri, cwd=home,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [run] = store.runs()
    return {"home": home, "store": store, "uri": uri, "run": run}


def test_the_users_data_option_composes_over_imagefolder_and_logs_its_classes(shapes):
    run = shapes["run"]
    params = run.data.params
    assert params["data.dataset"] == "ImageFolder" and params["data.image_size"] == "[16, 16]"
    assert params["data.preprocess.crop_padding"] == "2"
    local = shapes["store"].client.download_artifacts(
        run.info.run_id, "data/classes.yaml", str(shapes["home"])
    )
    assert yaml.safe_load(Path(local).read_text()) == ["blue", "red"]  # torchvision's order
    # 60 images, a seeded 20% of each class held out: 48 train, batch 10 -> 5 steps an epoch.
    history = shapes["store"].history(run.info.run_id, "test_accuracy")
    assert [step for step, _ in history] == [5, 10, 15]


def test_eval_scores_the_runs_own_test_split_without_being_told(shapes):
    run = shapes["run"]
    done = cnnlab("eval", run.info.run_id, shapes["uri"], cwd=shapes["home"])
    assert done.returncode == 0, done.stderr
    assert "on imagefolder test (12 images)" in done.stdout
    assert f"test accuracy {run.data.metrics['test_accuracy']:.4%}" in done.stdout


def test_predict_names_the_class_of_a_colour_photo(shapes):
    home = shapes["home"]
    photo(home / "new-red.png", 0, (64, 48), seed=99)  # bigger than any training image
    done = cnnlab("predict", shapes["run"].info.run_id, "new-red.png", shapes["uri"], cwd=home)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("new-red.png: class 1 (red, p=")
    assert "inverted" not in done.stdout  # colour photos are taken as they are


@pytest.mark.integration  # a second run (test_reproduce reproduces by default)
def test_reproduce_rebuilds_the_split_and_augmentations_bit_identically(shapes):
    done = cnnlab("reproduce", shapes["run"].info.run_id, shapes["uri"], cwd=shapes["home"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "result            IDENTICAL" in done.stdout
