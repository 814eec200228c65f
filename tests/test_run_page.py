"""What a run shows in the MLflow UI: the training view, its datasets, source and description,
figures of its mistakes, system metrics, and its model in the registry (tests/test_ui.py opens
the same in a real browser)."""

from __future__ import annotations

import json
import signal
import socket
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from cnnlab.config import schema
from cnnlab.config.validate import validate
from cnnlab.tracking import figures
from cnnlab.tracking.run import create_run
from helpers import Running, Store, cnnlab, free_port, one_error_line, train_in_process

KIND = "mlflow.experimentKind"


def test_a_run_shows_its_datasets_source_description_figures_and_system_metrics(
    tmp_path, tiny_data
):
    store, run_id = train_in_process(tmp_path, tiny_data, "tracking.system_metrics_interval=0.1")
    client = store.client
    run = client.get_run(run_id)
    # A model-training experiment, not a GenAI one (the UI's own view: tests/test_ui.py).
    assert client.get_experiment(run.info.experiment_id).tags[KIND] == "custom_model_development"

    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["mnist-test", "mnist-train"]
    assert [t.value for t in inputs["mnist-train"].tags] == ["training"]
    assert [t.value for t in inputs["mnist-test"].tags] == ["evaluation"]
    train_set = inputs["mnist-train"].dataset
    assert train_set.digest != inputs["mnist-test"].dataset.digest
    root, _ = tiny_data
    assert json.loads(train_set.source) == {"uri": (root / "MNIST" / "raw").resolve().as_uri()}
    assert json.loads(train_set.profile)["num_rows"] == 600
    assert json.loads(inputs["mnist-test"].dataset.profile)["images_shape"] == [200, 1, 28, 28]

    tags = run.data.tags
    assert tags["mlflow.source.name"] == "cnnlab-train"
    assert tags["mlflow.user"]
    accuracy = run.data.metrics["test_accuracy"]
    assert tags["mlflow.note.content"].startswith("**ConvNet** on **mnist**, Adam lr 0.0001")
    assert f"Test accuracy: **{accuracy:.2%}**" in tags["mlflow.note.content"]

    local = Path(client.download_artifacts(run_id, "figures", str(tmp_path / "dl")))
    names = sorted(p.name for p in local.iterdir())
    assert names == ["confusion_matrix.png", "misclassified.png", "per_class_accuracy.png"]
    for png in local.iterdir():
        with Image.open(png) as image:
            assert image.format == "PNG" and min(image.size) >= 300

    # A sample every 0.1 s over a run of seconds: a curve, at consecutive steps.
    cpu = store.history(run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 3
    assert [step for step, _ in cpu] == list(range(len(cpu)))
    assert all(0 <= value <= 100 for _, value in cpu)
    assert store.history(run_id, "system/system_memory_usage_megabytes")


def test_figures_and_system_metrics_can_be_turned_off(tmp_path, tiny_data):
    store, run_id = train_in_process(
        tmp_path, tiny_data, "tracking.log_figures=false", "tracking.system_metrics=false"
    )
    assert not store.client.list_artifacts(run_id, "figures")
    assert not [k for k in store.client.get_run(run_id).data.metrics if k.startswith("system/")]


def test_the_figures_count_what_the_model_got_wrong():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    guessed = torch.tensor([0, 1, 1, 1, 2, 0, 2])
    assert figures.confusion(labels, guessed, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    images = torch.randint(0, 256, (7, 1, 28, 28), dtype=torch.uint8)
    drawn = figures.prediction_figures(images, labels, guessed, ["zero", "one", "two"])
    grid = drawn["figures/misclassified.png"]
    texts = [t.get_text() for t in grid.axes[0].texts]
    assert texts == ["zero -> one", "two -> zero"]  # the two mistakes, in test-split order
    assert "2 shown" in grid.axes[0].get_title()


def test_an_existing_experiment_becomes_a_training_one_unless_it_has_a_kind(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    create_run(uri, "x", "first", {}, tmp_path / "pending").end("FINISHED")  # creates the store
    client = MlflowClient(uri)
    old = client.create_experiment("old")  # as MLflow or an older cnnlab made it: no kind
    mine = client.create_experiment("mine", tags={KIND: "genai_development"})
    for name in ("old", "mine"):
        create_run(uri, name, "r", {}, tmp_path / "pending").end("FINISHED")
    assert client.get_experiment(old).tags[KIND] == "custom_model_development"
    assert client.get_experiment(mine).tags[KIND] == "genai_development"  # a user's choice stays


@pytest.mark.integration  # three runs and the registry
def test_register_as_registers_each_run_and_moves_the_alias(tmp_path, tiny_data, tiny_overrides):
    folder = tmp_path / "a"
    folder.mkdir()
    store, first = train_in_process(folder, tiny_data, "tracking.register_as=digits")
    done = cnnlab(
        "train", *tiny_overrides, f"tracking.uri={store.uri}", "tracking.register_as=digits",
        "tracking.register_alias=champion", "optimizer.lr=1e-3", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "as models:/digits@champion (version 2)" in done.stdout
    client = store.client
    [second] = [r.info.run_id for r in store.runs() if r.info.run_id != first]
    assert client.get_model_version_by_alias("digits", "candidate").run_id == first
    assert client.get_model_version_by_alias("digits", "champion").run_id == second
    model_id = client.get_run(second).data.tags["cnnlab.model_uri"].removeprefix("models:/")
    registered = client.get_model_version("digits", "2")
    assert registered.source == client.get_logged_model(model_id).artifact_location

    # eval and predict take the registered name; eval scores the run's own data.
    evaluated = cnnlab("eval", "models:/digits@champion", f"tracking.uri={store.uri}",
                       cwd=tmp_path)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    accuracy = client.get_run(second).data.metrics["test_accuracy"]
    assert f"test accuracy {accuracy:.4%}" in evaluated.stdout
    image = tmp_path / "digit.png"
    Image.new("L", (28, 28), 0).save(image)
    predicted = cnnlab("predict", "models:/digits@candidate", image, f"tracking.uri={store.uri}",
                       cwd=tmp_path)  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    assert "digit.png: class " in predicted.stdout


@pytest.mark.integration
def test_a_sweep_registers_only_its_best_run_and_plots_each_swept_key(tmp_path, tiny_overrides):
    store = Store(next(o for o in tiny_overrides if o.startswith("tracking.uri="))[13:])
    done = cnnlab(
        "train", "-m", *tiny_overrides, "optimizer.lr=1e-4,1e-2", "train.batch_size=10,20",
        "tracking.register_as=swept", cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    parent, children = store.sweep()
    best = parent.data.tags["cnnlab.best_run_id"]
    versions = store.client.search_model_versions("name = 'swept'")
    assert [v.run_id for v in versions] == [best]  # the children registered nothing
    assert store.client.get_model_version_by_alias("swept", "best").run_id == best
    plotted = sorted(a.path for a in store.client.list_artifacts(parent.info.run_id, "figures"))
    assert plotted == ["figures/sweep_optimizer.lr.png", "figures/sweep_train.batch_size.png"]
    assert len(children) == 4


def test_registering_needs_a_logged_model(compose_cfg):
    with pytest.raises(schema.ConfigError, match="set tracking.log_model=true"):
        validate(compose_cfg(["tracking.register_as=x", "tracking.log_model=false"]))


@pytest.mark.integration
@pytest.mark.server
def test_cnnlab_ui_serves_the_store_and_links_its_training_view(tmp_path, tiny_data):
    store, run_id = train_in_process(tmp_path, tiny_data)
    port = free_port()
    ui = Running(["--port", port, f"tracking.uri={store.uri}"], cwd=tmp_path, command="ui")
    try:
        line = ui.wait_for("Experiment cnnlab", timeout=180)
        url = f"http://127.0.0.1:{port}"
        assert line.strip() == (
            f"Experiment cnnlab (1 run): {url}/#/experiments/1/runs?workflowType=machine_learning"
        )
        ui.wait_for("Serving")
        # What the UI's pages fetch: the run, and its figures from the folder beside the store.
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/runs/get?run_id={run_id}") as reply:
            assert json.load(reply)["run"]["info"]["status"] == "FINISHED"
        figure = f"{url}/get-artifact?path=figures/confusion_matrix.png&run_uuid={run_id}"
        with urllib.request.urlopen(figure) as reply:
            assert reply.read(8) == b"\x89PNG\r\n\x1a\n"
    finally:
        ui.proc.send_signal(signal.SIGINT)
        status, _ = ui.finish(timeout=60)
    assert status == 130
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # the server went with it


def test_cnnlab_ui_says_what_is_wrong_in_one_line(tmp_path, tiny_data):
    missing = cnnlab("ui", f"tracking.uri=sqlite:///{tmp_path / 'none.db'}", cwd=tmp_path)
    assert "no MLflow store at" in one_error_line(missing)
    store, _ = train_in_process(tmp_path, tiny_data, "tracking.log_model=false")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = cnnlab("ui", "--port", taken.getsockname()[1], f"tracking.uri={store.uri}",
                      cwd=tmp_path, timeout=180)  # fmt: skip
    assert "pick another --port" in one_error_line(busy)
