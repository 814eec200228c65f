"""Config composition: every option of every group composes, and bad values fail early."""

from __future__ import annotations

import getpass
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cnnlab.config import schema
from cnnlab.config.compose import CONF_DIR
from cnnlab.config.validate import typed_config, validate
from cnnlab.models import networks as models
from helpers import BIN, cli_env

GROUPS = {
    group: sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))
    for group in ("model", "data", "optimizer", "hardware")
}


def test_each_group_has_the_options_the_readme_promises():
    assert GROUPS == {
        "model": ["convnet", "mlp", "resnet18", "torchvision"],
        "data": [
            "cifar10",
            "cifar100",
            "emnist",
            "fashion_mnist",
            "imagefolder",
            "kmnist",
            "mnist",
            "qmnist",
        ],  # fmt: skip
        "optimizer": ["adam", "adamw", "sgd"],
        "hardware": ["auto", "cpu", "cuda"],
    }


# Options that need a value of the user's to be complete.
# Options that name what only the user knows: which torchvision model, where the images are.
COMPLETED_BY = {"torchvision": ["model.name=mobilenet_v3_small"], "imagefolder": ["data.root=/x"]}


@pytest.mark.parametrize("group,option", [(g, o) for g, options in GROUPS.items() for o in options])
def test_every_option_composes_and_validates(compose_cfg, group, option):
    cfg = compose_cfg([f"{group}={option}", *COMPLETED_BY.get(option, [])])
    validate(cfg)
    assert OmegaConf.missing_keys(cfg) == set()


def test_defaults_are_the_articles_run(compose_cfg):
    cfg = compose_cfg()
    assert cfg.model._target_ == "cnnlab.models.ConvNet"
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 1e-4
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.seed) == (10, 5, 42)
    assert cfg.train.log_every == 500
    assert cfg.data.name == "mnist"


@pytest.mark.parametrize("option", GROUPS["optimizer"])
def test_optimizer_options_instantiate_with_their_keys(compose_cfg, option):
    cfg = compose_cfg([f"optimizer={option}", "optimizer.lr=0.5"])
    model = instantiate(cfg.model, in_shape=(1, 28, 28), num_classes=10)
    optimizer = instantiate(cfg.optimizer, _convert_="all")(model.parameters())
    assert optimizer.param_groups[0]["lr"] == 0.5
    assert type(optimizer).__name__.lower() == option


@pytest.mark.parametrize("option", GROUPS["model"])
def test_model_options_build(compose_cfg, option):
    cfg = compose_cfg([f"model={option}", *COMPLETED_BY.get(option, [])])
    model = models.build_network(cfg.model, in_shape=(1, 28, 28), num_classes=10)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert type(model).__name__ == {"convnet": "ConvNet", "mlp": "MLP"}.get(
        option, "TorchvisionNet"
    )


def test_torchvision_needs_a_model_name(compose_cfg):
    with pytest.raises(schema.ConfigError, match=r"^model.name has no value; set model.name="):
        validate(compose_cfg(["model=torchvision"]))


@pytest.mark.parametrize(
    "override",
    [
        "train.bacth_size=10",  # misspelled key
        "optimizer.momentum=0.9",  # a key adam does not have
        "train.batch_size=ten",  # wrong type
        "hardware.deterministic=maybe",
        "model=resnet",  # unknown option
    ],
)
def test_unknown_keys_and_wrong_types_fail_at_compose(compose_cfg, override):
    with pytest.raises(ConfigCompositionException):
        compose_cfg([override])


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.batch_size=0", "train.batch_size"),
        ("train.batch_size=-10", "train.batch_size"),
        ("train.epochs=0", "train.epochs"),
        ("train.log_every=0", "train.log_every"),
        ("optimizer.lr=-0.1", "optimizer.lr"),
        ("optimizer.lr=0", "optimizer.lr"),
        ("optimizer.weight_decay=-1", "optimizer.weight_decay"),
        ("optimizer.betas=[0.9,1.5]", "optimizer.betas"),
        ("hardware.device=tpu", "hardware.device"),
        ("hardware.threads=-2", "hardware.threads"),
        ("model.hidden=[64,0]", "model.hidden"),
        ("data.num_classes=1", "data.num_classes"),
        ("train.limit_batches=0", "train.limit_batches"),
        ("train.limit_eval_batches=-1", "train.limit_eval_batches"),
        ("train.overfit_batches=-2", "train.overfit_batches"),
        ("tracking.register_alias=latest", "tracking.register_alias"),  # MLflow reserves these
        ("tracking.register_alias=v3", "tracking.register_alias"),
        ("tracking.register_as=a/b", "tracking.register_as"),
        ('tracking.register_as="it\'s"', "tracking.register_as"),  # MLflow's filters break
        ("tracking.system_metrics_interval=0", "tracking.system_metrics_interval"),
        ("tracking.uri=ftp://127.0.0.1/runs", "tracking.uri"),
        ("tracking.uri=file:", "tracking.uri"),
        ("tracking.uri=file:///tmp/mlruns", "tracking.uri"),
        ("tracking.uri=mlruns", "tracking.uri"),
    ],
)
def test_impossible_values_name_the_key(compose_cfg, override, key):
    cfg = compose_cfg([override])
    with pytest.raises(schema.ConfigError, match=f"^{key}="):
        validate(cfg)


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "+train.bacth_size=64",
            "train.bacth_size is not a config key; did you mean train.batch_size?",
        ),
        ("+optimizer.momentum=0.9", "optimizer.momentum is not a config key"),  # adam has none
        ("+data.md5.extra=x", "data.md5.extra is not a file of MNIST"),
        ("+foo=1", "foo is not a config key"),
    ],
)
def test_appended_keys_outside_the_schema_are_rejected(compose_cfg, override, message):
    # Hydra's `+key=` appends even to a typed node; validate is what catches it.
    with pytest.raises(schema.ConfigError, match=f"^{message}"):
        validate(compose_cfg([override]))


def test_sgd_momentum_range(compose_cfg):
    with pytest.raises(schema.ConfigError, match="optimizer.momentum"):
        validate(compose_cfg(["optimizer=sgd", "optimizer.momentum=1.0"]))


@pytest.mark.parametrize(
    "override,expected",
    [
        ("train.batch_size=-1", "train.batch_size=-1 is invalid"),
        ("train.bacth_size=3", "train.bacth_size"),
        ("optimizer.lr=fast", "optimizer.lr"),
        ("hardware=cpu hardware.cuda_graphs=true", "needs a CUDA device"),
    ],
)
def test_cli_rejects_bad_values_before_creating_a_store(tmp_path, override, expected):
    done = subprocess.run(
        [BIN / "cnnlab-train", *override.split(), "data.root=/nonexistent"],
        cwd=tmp_path, capture_output=True, text=True, env=cli_env(), timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert expected in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "mlflow.db").exists()  # no store, no run for a config that can't work


def test_env_var_sets_the_data_root(compose_cfg, monkeypatch):
    monkeypatch.setenv("CNNLAB_DATA_ROOT", "/datasets")
    assert compose_cfg().data.root == "/datasets"


def test_help_lists_every_option_of_every_group(tmp_path):
    done = subprocess.run(
        [BIN / "cnnlab-train", "--help"], cwd=tmp_path, capture_output=True, text=True,
        env=cli_env(), timeout=120,
    )  # fmt: skip
    assert done.returncode == 0
    for group, options in GROUPS.items():
        line = next(ln for ln in done.stdout.splitlines() if ln.startswith(f"{group}: "))
        assert sorted(line.split(": ", 1)[1].split(", ")) == options


def test_configs_logged_before_cuda_graphs_existed_still_type(compose_cfg):
    logged = OmegaConf.to_container(compose_cfg(), resolve=True)
    del logged["hardware"]["cuda_graphs"]
    assert typed_config(logged).hardware.cuda_graphs is False


# ---------------------------------------------------------------- experiment and debug presets
PRESETS = {
    group: sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))
    for group in ("experiment", "debug")
}


def test_the_presets_the_readme_promises():
    assert PRESETS == {
        "experiment": ["article", "cifar10_resnet", "fashion_convnet", "mnist_fast"],
        "debug": ["fast", "limit", "overfit"],
    }


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in PRESETS.items() for o in opts])
def test_every_preset_composes_and_validates(compose_cfg, group, option):
    cfg = compose_cfg([f"{group}={option}"])
    validate(cfg)
    assert OmegaConf.missing_keys(cfg) == set()
    OmegaConf.to_container(cfg, resolve=True)  # interpolations (the throwaway store) resolve


@pytest.mark.parametrize("debug", PRESETS["debug"])
@pytest.mark.parametrize("experiment", PRESETS["experiment"])
def test_every_experiment_composes_with_every_debug_preset(compose_cfg, experiment, debug):
    # A debug preset checks the user's recipe: it must compose over whatever groups it chose.
    cfg = compose_cfg([f"experiment={experiment}", f"debug={debug}"])
    validate(cfg)
    assert OmegaConf.missing_keys(cfg) == set()
    OmegaConf.to_container(cfg, resolve=True)


def test_experiment_article_is_the_default_run(compose_cfg):
    assert compose_cfg(["experiment=article"]) == compose_cfg()


def test_a_debug_preset_wins_over_an_experiment_and_the_command_line_over_both(compose_cfg):
    cfg = compose_cfg(["experiment=mnist_fast", "debug=overfit"])
    assert cfg.train.batch_size == 32 and cfg.optimizer.lr == 1e-3  # the recipe's
    assert (cfg.train.epochs, cfg.train.overfit_batches) == (300, 2)
    cfg = compose_cfg(["debug=overfit", "optimizer=sgd", "optimizer.lr=0.01", "train.epochs=7"])
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.lr == 0.01
    assert cfg.train.epochs == 7


def test_overfit_checks_the_recipes_optimizer_on_unaugmented_batches(compose_cfg):
    # The optimizer is part of what is checked; augmentation would change the "fixed" batches
    # every epoch while the check scores them as they are.
    cfg = compose_cfg(["experiment=cifar10_resnet", "debug=overfit"])
    optimizer = cfg.optimizer
    assert optimizer._target_ == "torch.optim.SGD" and optimizer.lr == 0.05
    assert optimizer.momentum == 0.9 and optimizer.nesterov
    assert (cfg.data.preprocess.crop_padding, cfg.data.preprocess.flip) == (0, False)
    assert cfg.data.preprocess.mean == [0.4914, 0.4822, 0.4465]  # normalising stays


def test_debug_presets_log_into_a_throwaway_store_in_the_temp_folder(compose_cfg):
    for option in PRESETS["debug"]:
        uri = compose_cfg([f"debug={option}"]).tracking.uri
        assert (
            uri
            == f"sqlite:///{Path(tempfile.gettempdir())}/cnnlab-debug-{getpass.getuser()}/mlflow.db"
        )
    assert compose_cfg(["debug=fast", "tracking.uri=http://x:5000"]).tracking.uri == "http://x:5000"


def test_help_lists_the_presets(tmp_path):
    done = subprocess.run(
        [BIN / "cnnlab-train", "--help"], cwd=tmp_path, capture_output=True, text=True,
        env=cli_env(), timeout=120,
    )  # fmt: skip
    for group, options in PRESETS.items():
        line = next(ln for ln in done.stdout.splitlines() if ln.startswith(f"{group}: "))
        assert sorted(line.split(": ", 1)[1].split(", ")) == options


def test_configs_logged_before_the_debug_keys_existed_still_type(compose_cfg):
    logged = OmegaConf.to_container(compose_cfg(), resolve=True)
    for key in ("limit_batches", "limit_eval_batches", "overfit_batches"):
        del logged["train"][key]
    train = typed_config(logged).train
    assert (train.limit_batches, train.limit_eval_batches, train.overfit_batches) == (None, None, 0)


def test_a_config_logged_with_the_old_bench_block_is_typed_again(compose_cfg):
    # Runs logged before the bench block left the training config carry `bench: null`.
    logged = OmegaConf.to_container(compose_cfg(), resolve=True)
    cfg = typed_config({**logged, "bench": None}, ["train.epochs=2"])
    assert "bench" not in cfg and cfg.train.epochs == 2
