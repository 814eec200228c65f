"""cnnlab-eval and cnnlab-predict against hostile stores and hostile image files."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from PIL import Image

from cnnlab import CnnlabError
from cnnlab.inference.loaded import load_model
from cnnlab.inference.predict import image_tensor
from cnnlab.models.networks import ConvNet
from helpers import cnnlab, data_overrides, synthetic_split, train_in_process


class Payload(torch.nn.Linear):
    """A module whose pickle, once loaded, creates `marker`: what a hostile store would hold."""

    def __init__(self, marker: Path) -> None:
        super().__init__(784, 10)
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def log_pickled(uri: str, run_id: str, module: torch.nn.Module) -> str:
    """Log `module` in MLflow's pickle format (torch.save) to `run_id`; return its models:/ URI."""
    mlflow.set_tracking_uri(uri)
    # The run's experiment: MLflow would otherwise create the model in experiment 0, whose
    # artifacts go to ./mlruns under the current directory.
    mlflow.set_experiment(experiment_id=MlflowClient(uri).get_run(run_id).info.experiment_id)
    x = torch.zeros(2, 1, 28, 28)
    info = mlflow.pytorch.log_model(
        module,
        name="model",
        serialization_format="pickle",
        signature=infer_signature(x.numpy(), torch.zeros(2, 10).numpy()),
        pip_requirements=["torch"],
        run_id=run_id,
    )
    return info.model_uri


@pytest.fixture(scope="module")
def logged(tiny_data, tmp_path_factory) -> dict:
    """A store with a cnnlab run (pt2 model) and, in another run, two pickled models."""
    home = tmp_path_factory.mktemp("store")
    data = data_overrides(*tiny_data)
    trained, run_id = train_in_process(home, tiny_data)
    uri, client = trained.uri, trained.client
    run = client.get_run(run_id)
    experiment = run.info.experiment_id
    other = client.create_run(experiment).info.run_id
    marker = home / "MARKER"
    hostile = log_pickled(uri, other, Payload(marker))
    benign = log_pickled(
        uri, other, torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    )
    assert not marker.exists()  # logging it ran nothing
    return {
        "uri": uri, "run_id": run.info.run_id, "model_uri": run.data.tags["cnnlab.model_uri"],
        "hostile": hostile, "benign": benign, "marker": marker, "data": data,
    }  # fmt: skip


def test_a_pickled_model_is_refused_with_one_line_and_never_unpickled(logged, tmp_path):
    ref, uri = logged["hostile"], f"tracking.uri={logged['uri']}"
    # cnnlab-eval's command line; cnnlab-predict loads through the same load_model.
    done = cnnlab("eval", ref, *logged["data"], uri, cwd=tmp_path)
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"cnnlab-eval: error: model {ref} is stored as a pickle (torch.save), which can run code "
        "when loaded; pass --trust-store if you trust the store that wrote it"
    ]
    with pytest.raises(CnnlabError, match="stored as a pickle"):
        load_model(ref, logged["uri"])
    assert not logged["marker"].exists()
    # The opt-in loads it the way MLflow does, and the payload runs: the refusal above mattered.
    done = cnnlab("eval", ref, *logged["data"], uri, "--trust-store", cwd=tmp_path)
    assert logged["marker"].exists()
    assert done.returncode != 0 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_trust_store_loads_a_benign_pickled_model(logged):
    with pytest.raises(CnnlabError, match="stored as a pickle"):
        load_model(logged["benign"], logged["uri"])
    model = load_model(logged["benign"], logged["uri"], trust_store=True)
    assert model.in_shape == (1, 28, 28)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_a_cnnlab_model_is_rebuilt_from_its_config_as_exactly_the_logged_network(logged):
    rebuilt = load_model(logged["run_id"], logged["uri"])
    assert isinstance(rebuilt.network, ConvNet)  # built by cnnlab, not deserialised
    exported = load_model(logged["model_uri"], logged["uri"], trust_store=True)  # MLflow's own load
    x = torch.rand(7, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), exported(x))


def test_a_pt2_graph_that_runs_code_is_never_evaluated(logged, tmp_path):
    # torch.export.load eval()s each symbolic shape in the graph with sympy, and MLflow's check
    # of pt2 archives only looks for pickles: this archive passes it and runs code when loaded.
    mlflow.set_tracking_uri(logged["uri"])
    x = torch.zeros(2, 1, 28, 28)
    network = ConvNet().eval()
    info = mlflow.pytorch.log_model(
        network, name="model", input_example=x.numpy(), pip_requirements=["torch"],
        signature=infer_signature(x.numpy(), network(x).detach().numpy()), run_id=logged["run_id"],
    )  # fmt: skip
    location = MlflowClient(logged["uri"]).get_logged_model(info.model_id).artifact_location
    archive = Path(urlparse(location).path) / "data" / "model.pt2"
    with zipfile.ZipFile(archive) as original:
        records = [(record, original.read(record)) for record in original.infolist()]
    marker = tmp_path / "PT2_MARKER"
    payload = f"__import__('pathlib').Path('{marker}').touch() or Symbol(".encode()
    with zipfile.ZipFile(archive, "w") as out:
        for record, data in records:
            if record.filename.endswith("models/model.json"):
                assert b'"expr_str": "Symbol(' in data
                data = data.replace(b'"expr_str": "Symbol(', b'"expr_str": "' + payload)
            out.writestr(record, data)

    model = load_model(info.model_uri, logged["uri"])
    assert model(x).shape == (2, 10) and not marker.exists()
    load_model(info.model_uri, logged["uri"], trust_store=True)
    assert marker.exists()


def bomb_png(side: int) -> bytes:
    """A valid side x side 1-bit PNG of zeros: ~50 KB that Pillow would decode to side**2 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    deflate, row = zlib.compressobj(9), bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def test_predict_answers_every_good_image_and_refuses_each_hostile_file(logged, tmp_path):
    images, _ = synthetic_split(2, seed=2)
    Image.fromarray(images[0]).save(tmp_path / "first.png")
    Image.fromarray(images[1]).save(tmp_path / "last.png")
    os.mkfifo(tmp_path / "fifo.png")  # opening it would wait forever for a writer
    (tmp_path / "bomb.png").write_bytes(bomb_png(20000))  # 400 megapixels
    (tmp_path / "medium.png").write_bytes(bomb_png(9000))  # 81: under Pillow's limit, over ours
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "folder.png").mkdir()
    names = ["first.png", "fifo.png", "bomb.png", "medium.png", "notes.png", "folder.png"]
    done = cnnlab(
        "predict", logged["run_id"], *names, "missing.png", "last.png",
        f"tracking.uri={logged['uri']}", cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == ["first.png", "last.png"]
    # The class names the run logged with its model (torchvision's MNIST names them "7 - seven").
    assert re.match(r"first\.png: class (\d) \(\1 - \w+, p=", done.stdout)
    assert done.stderr.splitlines() == [
        "cnnlab-predict: error: fifo.png: cannot read an image (a FIFO, not a regular file)",
        "cnnlab-predict: error: bomb.png: cannot read an image (over the 64-megapixel limit)",
        "cnnlab-predict: error: medium.png: cannot read an image "
        "(9000x9000 pixels, over the 64-megapixel limit)",
        "cnnlab-predict: error: notes.png: cannot read an image (not a format Pillow knows)",
        "cnnlab-predict: error: folder.png: cannot read an image (a directory, not a regular file)",
        "cnnlab-predict: error: missing.png: cannot read an image (no such file or directory)",
    ]


def test_only_a_model_of_light_strokes_on_dark_gets_inverted_images(tmp_path):
    # A dark digit on white paper suits an MNIST model once inverted; an X-ray (a greyscale
    # image folder) or a photo is taken as it is.
    paper = np.full((28, 28), 255, dtype=np.uint8)
    paper[10:18, 12:16] = 0
    Image.fromarray(paper).save(tmp_path / "paper.png")
    mnist, inverted = image_tensor(tmp_path / "paper.png", (1, 28, 28), light_on_dark=True)
    assert inverted and mnist[0, 0, 0, 0] == 0 and mnist[0, 0, 12, 13] == 1
    xray, inverted = image_tensor(tmp_path / "paper.png", (1, 28, 28), light_on_dark=False)
    assert not inverted and xray[0, 0, 0, 0] == 1


def test_predict_converts_16_bit_images_like_training_does(tmp_path):
    # 16-bit greyscale is scaled to 8 bits (not clipped at 255), as data.image_pixels does.
    wide = np.full((28, 28), 30000, dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    x, _ = image_tensor(tmp_path / "wide.png", (1, 28, 28), light_on_dark=False)
    assert x[0, 0, 0, 0].item() == pytest.approx(round(30000 / 257) / 255)


def test_a_model_tag_naming_a_folder_is_refused_before_anything_is_read(logged, tmp_path):
    # Someone with write access to the store points a run's model tag at a local folder that
    # holds a model (here a real copy of the run's own).
    client = MlflowClient(logged["uri"])
    folder = (tmp_path / "elsewhere").resolve()
    folder.mkdir()
    model_dir = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=logged["model_uri"], dst_path=str(folder))
    )
    crafted = client.create_run(client.get_run(logged["run_id"]).info.experiment_id).info.run_id
    client.set_tag(crafted, "cnnlab.model_uri", model_dir.as_uri())
    for trust_store in (False, True):  # trusted or not: the store's own models only
        with pytest.raises(CnnlabError, match="names no logged model of this store"):
            load_model(crafted, logged["uri"], trust_store=trust_store)


def test_a_logged_config_cannot_make_eval_allocate_beyond_the_stored_weights(logged, tmp_path):
    # A run whose logged config asks for 20000-channel convolutions (14 GB of weights) and whose
    # model tag names the real, small model: refused by comparing shapes on the meta device,
    # in a process that may not allocate 4 GB (an allocation first would fail otherwise).
    client = MlflowClient(logged["uri"])
    source = client.get_run(logged["run_id"])
    config = yaml.safe_load(
        Path(
            client.download_artifacts(logged["run_id"], "config/config.yaml", str(tmp_path))
        ).read_text()
    )
    config["model"]["conv_channels"] = [20000, 20000]
    crafted = client.create_run(source.info.experiment_id).info.run_id
    client.log_dict(crafted, config, "config/config.yaml")
    client.set_tag(crafted, "cnnlab.model_uri", logged["model_uri"])
    probe = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_DATA, (4 << 30, 4 << 30))\n"
        "from cnnlab import CnnlabError\n"
        "from cnnlab.inference.loaded import load_model\n"
        "try:\n"
        f"    load_model({crafted!r}, {logged['uri']!r})\n"
        "except CnnlabError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "cannot rebuild it from its run's config" in done.stdout
    assert "size mismatch" in done.stdout and "[20000, 1, 3, 3]" in done.stdout
