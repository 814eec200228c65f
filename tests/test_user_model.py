"""Bring your own model: a user's class from a --config-dir and torchvision's ResNet-18 train,
reproduce, evaluate and predict from the logged config; a crafted logged config never runs code."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from cnnlab import CnnlabError
from cnnlab.commands import reproduce
from cnnlab.inference.loaded import load_model
from cnnlab.models import networks as models
from helpers import Store, cli_env, cnnlab, data_overrides, synthetic_split, train_in_process

# One worker builds the module's fixtures (a trained run each) once for all its tests.
pytestmark = pytest.mark.xdist_group("user-model")

# A user's own network, in a module cnnlab knows nothing about. It takes in_shape and
# num_classes (cnnlab passes them because the constructor names them); BatchNorm gives it
# buffers, and `scale` is a buffer that is not in the state dict (persistent=False).
USER_MODULE = """
import torch
from torch import nn


class MyNet(nn.Module):
    def __init__(self, in_shape, num_classes, width=16, pool=4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_shape[0], width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(pool), nn.Flatten(),
        )
        self.head = nn.Linear(width * pool * pool, num_classes)
        self.register_buffer("scale", torch.full((1,), 2.0), persistent=False)

    def forward(self, x):
        return self.head(self.features(x * self.scale))
"""


class UserSetup:
    """A user's folder: code/mynets.py, conf/model/{mynet,typo}.yaml, and a store."""

    def __init__(self, home: Path, tiny_data) -> None:
        self.home = home
        (home / "code").mkdir()
        (home / "code" / "mynets.py").write_text(USER_MODULE)
        (home / "code" / "sidefx.py").write_text(
            "from pathlib import Path\nPath(__file__).parents[1].joinpath('MARKER').touch()\n"
        )
        (home / "conf" / "model").mkdir(parents=True)
        (home / "conf" / "model" / "mynet.yaml").write_text("_target_: mynets.MyNet\nwidth: 8\n")
        (home / "conf" / "model" / "typo.yaml").write_text("_target_: mynets.MyNet\nwidht: 8\n")
        self.store = Store(f"sqlite:///{home / 'mlflow.db'}")
        self.uri = f"tracking.uri={self.store.uri}"
        self.overrides = [
            *data_overrides(*tiny_data), "train.epochs=1", "train.log_every=20", "hardware=cpu",
            self.uri, f"tracking.pending_dir={home / 'cnnlab-pending'}",
        ]  # fmt: skip

    def env(self, importable: bool = True, trusted: bool = True) -> dict[str, str]:
        """The environment of a command: the user's code on PYTHONPATH, or not; its package
        trusted for logged configs (CNNLAB_TRUSTED_MODULES), or not."""
        paths = [os.environ.get("PYTHONPATH", "")]
        if importable:
            paths.insert(0, str(self.home / "code"))
        trust = {"CNNLAB_TRUSTED_MODULES": "mynets"} if trusted else {}
        return cli_env(PYTHONPATH=os.pathsep.join(p for p in paths if p), **trust)

    def run(self, command: str, *args: str, importable: bool = True, trusted: bool = True):
        """A cnnlab command in the user's folder."""
        return cnnlab(command, *args, cwd=self.home, env=self.env(importable, trusted))


@pytest.fixture(scope="module")
def user(tiny_data, tmp_path_factory) -> UserSetup:
    return UserSetup(tmp_path_factory.mktemp("user"), tiny_data)


@pytest.fixture(scope="module")
def user_run(user) -> str:
    """The id of a run of the user's model, trained by cnnlab-train --config-dir as a user does."""
    done = user.run("train", "--config-dir", user.home / "conf", "model=mynet", *user.overrides)
    assert done.returncode == 0, done.stderr
    [run] = user.store.runs()
    return run.info.run_id


def test_a_user_model_trains_from_a_config_dir_with_its_own_keys(user, user_run):
    run = user.store.client.get_run(user_run)
    assert run.info.status == "FINISHED"
    assert run.data.params["model._target_"] == "mynets.MyNet"
    assert run.data.params["model.width"] == "8"  # the user's own key, logged like any other
    assert "cnnlab.model_uri" in run.data.tags


@pytest.mark.integration  # a second run (test_reproduce reproduces by default)
def test_a_user_model_reproduces_bit_identically(user, user_run):
    done = user.run("reproduce", user_run, user.uri)  # no --config-dir: the logged config is all
    assert done.returncode == 0, done.stderr
    assert "result            IDENTICAL" in done.stdout
    assert "3 shared steps, 3 identical" in done.stdout


def test_a_user_model_is_evaluated_and_predicted_rebuilt_from_its_config(user, user_run, tiny_data):
    accuracy = user.store.client.get_run(user_run).data.metrics["test_accuracy"]
    done = user.run("eval", user_run, *data_overrides(*tiny_data), user.uri)  # no --trust-store
    assert done.returncode == 0, done.stderr
    assert f"test accuracy {accuracy:.4%}" in done.stdout

    Image.fromarray(synthetic_split(1, seed=2)[0][0]).save(user.home / "digit.png")
    done = user.run("predict", user_run, "digit.png", user.uri)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("digit.png: class ")


def test_reproducing_without_the_users_module_names_it_in_one_line(user, user_run):
    before = len(user.store.runs())
    done = user.run("reproduce", user_run, user.uri, importable=False)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "cnnlab-reproduce: error: model._target_=mynets.MyNet: cannot import mynets "
        "(No module named 'mynets'); install it or put its folder on PYTHONPATH"
    )
    assert len(user.store.runs()) == before  # refused before any run was created


def test_a_logged_config_imports_a_user_module_only_from_a_trusted_package(user, user_run):
    before = len(user.store.runs())
    done = user.run("reproduce", user_run, user.uri, trusted=False)
    assert done.stderr.strip().splitlines()[-1] == (
        "cnnlab-reproduce: error: model._target_=mynets.MyNet: named by a logged config, whose "
        "model modules cnnlab imports only from packages you trust: export "
        "CNNLAB_TRUSTED_MODULES=mynets (comma-separated) and run again"
    )
    assert done.returncode != 0 and len(user.store.runs()) == before


def test_a_user_models_unknown_argument_fails_with_its_own_error_in_one_line(user, tmp_path):
    done = user.run(
        "train", "--config-dir", user.home / "conf", "model=typo", *user.overrides[:-2],
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    )  # fmt: skip
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "cnnlab-train: error: model._target_=mynets.MyNet: TypeError: "
        "MyNet.__init__() got an unexpected keyword argument 'widht'"
    )


def test_a_builtin_models_misspelled_key_fails_with_did_you_mean(tmp_path):
    done = cnnlab("train", "model=resnet18", "model.smal_images=true", cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "cnnlab-train: error: model.smal_images is not a config key; did you mean "
        "model.small_images? (`cnnlab-train --cfg job` lists them all)"
    ]


def test_a_user_class_gets_in_shape_and_num_classes_only_where_it_takes_them():
    class TakesClasses(torch.nn.Module):
        def __init__(self, num_classes, width=3):
            super().__init__()
            self.head = torch.nn.LazyLinear(num_classes)

    class TakesAnything(torch.nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            self.kwargs = kwargs

    module = type(sys)("cnnlab_test_user_classes")
    module.TakesClasses, module.TakesAnything = TakesClasses, TakesAnything
    sys.modules[module.__name__] = module
    try:
        built = models.build_network(
            {"_target_": f"{module.__name__}.TakesClasses", "width": 5}, (1, 28, 28), 7
        )
        assert built.head.out_features == 7
        built = models.build_network(
            {"_target_": f"{module.__name__}.TakesAnything", "depth": 2}, (3, 8, 8), 4
        )
        assert built.kwargs == {"in_shape": (3, 8, 8), "num_classes": 4, "depth": 2}
    finally:
        del sys.modules[module.__name__]


# ------------------------------------------------------------------------ torchvision ResNet-18
@pytest.fixture(scope="module")
def resnet_run(tiny_data, tmp_path_factory) -> tuple[Store, str]:
    """A run of model=resnet18 on the 1x28x28 tiny data: its first conv takes one channel."""
    folder = tmp_path_factory.mktemp("resnet")
    return train_in_process(
        folder, tiny_data, "model=resnet18", "train.batch_size=50", "train.log_every=4"
    )


@pytest.mark.integration  # ResNet-18: checkpoints and the model are ~180 MB per run
def test_resnet18_trains_reproduces_and_evaluates_on_one_channel_images(
    resnet_run, tiny_data, tmp_path
):
    store, run_id = resnet_run
    run = store.client.get_run(run_id)
    assert run.data.params["model.name"] == "resnet18"
    uri = f"tracking.uri={store.uri}"

    done = cnnlab("reproduce", run_id, uri, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "result            IDENTICAL" in done.stdout
    assert "3 shared steps, 3 identical" in done.stdout

    done = cnnlab("eval", run_id, *data_overrides(*tiny_data), uri, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"test accuracy {run.data.metrics['test_accuracy']:.4%}" in done.stdout

    # Rebuilt from the config, with every BatchNorm statistic read from the archive.
    network = load_model(run_id, store.uri).network
    assert network.net.conv1.in_channels == 1
    assert int(network.net.bn1.num_batches_tracked) == 12  # 600 images / 50 per batch
    assert not torch.equal(network.net.bn1.running_var, torch.ones(64))


# --------------------------------------------------------------------- a crafted logged config
ZEN = "Beautiful is better than ugly"  # what `import this` prints


def hostile_models(marker: Path) -> dict[str, dict]:
    """Model configs a hostile store could log: each would touch `marker` (or print the Zen of
    Python) if its _target_ were ever resolved and called."""
    return {
        "os.system": {"_target_": "os.system", "command": f"touch {marker}"},
        "subprocess.Popen": {"_target_": "subprocess.Popen", "args": ["touch", str(marker)]},
        "this.Zen": {"_target_": "this.Zen"},  # a stdlib module that runs code on import
        "torch.save": {"_target_": "torch.save", "obj": 1, "f": str(marker)},  # not a class
        # An installed (importable) package that runs code on import, which the user never
        # said to trust: refused before it is imported.
        "sidefx.Net": {"_target_": "sidefx.Net"},
    }


@pytest.fixture(scope="module")
def crafted(user, user_run) -> dict:
    """Runs, in experiment `crafted`, whose logged config names a hostile model _target_ and
    whose model tag points to the user's real model (so eval gets as far as rebuilding it)."""
    client = user.store.client
    source = client.get_run(user_run)
    config = yaml.safe_load(
        Path(client.download_artifacts(user_run, "config/config.yaml", str(user.home))).read_text()
    )
    marker = user.home / "MARKER"
    # Its artifacts beside the store (MLflow's default is ./mlruns in the current directory).
    experiment = client.create_experiment(
        "crafted", artifact_location=(user.home / "crafted-artifacts").as_uri()
    )
    runs = {}
    for target, model in hostile_models(marker).items():
        run_id = client.create_run(experiment).info.run_id
        client.log_text(run_id, yaml.safe_dump({**config, "model": model}), "config/config.yaml")
        client.set_tag(run_id, "cnnlab.model_uri", source.data.tags["cnnlab.model_uri"])
        runs[target] = run_id
    return {"runs": runs, "marker": marker}


@pytest.mark.parametrize("target", list(hostile_models(Path("MARKER"))))
def test_a_crafted_model_target_is_refused_without_running_anything(user, crafted, target, capsys):
    run_id = crafted["runs"][target]
    untrusted = "named by a logged config, whose model modules cnnlab imports only"
    refusal = untrusted if target in ("torch.save", "sidefx.Net") else "not a model"
    with pytest.raises(CnnlabError, match=f"model._target_={target}: {refusal}"):
        load_model(run_id, user.store.uri)  # what cnnlab-eval and cnnlab-predict call
    before = len(user.store.runs())
    with pytest.raises(CnnlabError, match=f"^model._target_={target}: {refusal}"):
        reproduce.reproduce(run_id, [user.uri])
    assert len(user.store.runs()) == before
    assert not crafted["marker"].exists()
    assert "this" not in sys.modules and ZEN not in capsys.readouterr().out


@pytest.mark.parametrize(
    "command,target",
    [("eval", "os.system"), ("predict", "subprocess.Popen"), ("reproduce", "this.Zen")],
)
def test_each_command_refuses_a_crafted_model_target_in_one_line(
    user, crafted, tiny_data, command, target
):
    run_id = crafted["runs"][target]
    args = {"eval": data_overrides(*tiny_data), "predict": ["digit.png"], "reproduce": []}
    Image.fromarray(synthetic_split(1, seed=2)[0][0]).save(user.home / "digit.png")
    done = user.run(command, run_id, *args[command], user.uri)
    assert done.returncode != 0
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"cnnlab-{command}: error: ")
    assert (
        f"model._target_={target}: not a model; a model's _target_ names a torch.nn.Module" in line
    )
    assert not crafted["marker"].exists() and ZEN not in done.stdout
