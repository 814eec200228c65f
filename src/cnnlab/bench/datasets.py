"""cnnlab-bench's datasets section: training samples/s per dataset, each with its own recipe,
with the same steps as cnnlab-train."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from cnnlab import CnnlabError
from cnnlab.bench.harness import alternate, synthetic_dataset, training_rate
from cnnlab.config.compose import launch_path
from cnnlab.data.load import data_arguments, load_dataset
from cnnlab.data.splits import Dataset

log = logging.getLogger(__name__)


def section_datasets(cfg: DictConfig, data: Dataset, device: torch.device) -> list[str]:
    """Training samples/s per dataset, each with its own recipe, same steps as cnnlab-train.

    MNIST runs the article's settings twice: images held as float32 (as cnnlab-train holds any
    split that fits preprocess.FLOAT_BUDGET), against uint8 converted per batch on the device
    (how a split over the budget trains). Fashion-MNIST is fetched as a first run would where
    data.root has none; a CIFAR-shaped synthetic set (50,000 3x32x32 uint8) trains ResNet-18 as
    experiment=cifar10_resnet does, with and without its crop + flip augmentation.
    """
    return [
        f"Datasets ({device}; samples/s over {cfg.bench.batches} mini-batches unless said):",
        mnist_line(cfg, data, device),
        fashion_line(cfg, device),
        cifar_line(cfg, device),
    ]


def mnist_line(cfg: DictConfig, data: Dataset, device: torch.device) -> str:
    """cnnlab-train holds MNIST as float32 (its copy fits preprocess.FLOAT_BUDGET); a set over
    the budget stays uint8 and converts each batch: what that costs, on MNIST's steps."""
    batches = cfg.bench.batches
    uint8 = alternate(cfg.bench.rounds, {
        "held": training_rate(cfg, data, batches, device),
        "uint8": training_rate(cfg, data, batches, device, budget=0),
    })  # fmt: skip
    return (
        f"  MNIST, article's settings      float32 held {uint8.median('held'):8.0f}   uint8 "
        f"converted per batch {uint8.median('uint8'):8.0f}   ratio "
        f"{uint8.ratio('uint8', 'held'):.3f}x"
    )


def fashion_line(cfg: DictConfig, device: torch.device) -> str:
    """Fashion-MNIST with the article's settings, from data.root, else fetched the way a user's
    first run fetches it, into a folder of the benchmark's own (data.root may be read-only)."""
    # Inside cnnlab-bench's own Hydra app: compose the training config beside it.
    fashion_cfg = hydra.compose("config", ["data=fashion_mnist"])
    root = launch_path(cfg.data.root)
    with tempfile.TemporaryDirectory(prefix="cnnlab-bench-") as scratch:
        if not (root / fashion_cfg.data.dataset).is_dir():
            log.info("no Fashion-MNIST in %s: fetching it into %s", root, scratch)
            root = Path(scratch)
        try:
            fashion = load_dataset(**data_arguments(fashion_cfg.data, root))
        except CnnlabError as exc:
            return f"  Fashion-MNIST                  not measured: {exc}"
        side = training_rate(cfg, fashion, cfg.bench.batches, device)
        speed = alternate(cfg.bench.rounds, {"x": side}).median("x")
    return f"  Fashion-MNIST, article's settings {speed:8.0f}"


def cifar_line(cfg: DictConfig, device: torch.device) -> str:
    """ResNet-18 on a CIFAR-shaped synthetic set, with and without its augmentation."""
    resnet_cfg = OmegaConf.merge(
        hydra.compose("config", ["experiment=cifar10_resnet"]), {"hardware": cfg.hardware}
    )
    cifar = synthetic_dataset(50_000, (3, 32, 32), 10)
    steps = max(cfg.bench.batches // 300, 3)  # a ResNet step is ~1000x an article step on a CPU
    plain = OmegaConf.merge(
        resnet_cfg, {"data": {"preprocess": {"crop_padding": 0, "flip": False}}}
    )
    resnet = alternate(cfg.bench.rounds, {
        "augmented": training_rate(resnet_cfg, cifar, steps, device),
        "plain": training_rate(plain, cifar, steps, device),
    })  # fmt: skip
    pre = resnet_cfg.data.preprocess
    return (
        f"  CIFAR-shaped, ResNet-18 ({resnet_cfg.model.name}, batch {resnet_cfg.train.batch_size}, "
        f"{steps} steps)   crop {pre.crop_padding} + flip {resnet.median('augmented'):7.1f}   "
        f"none {resnet.median('plain'):7.1f}   ratio {resnet.ratio('augmented', 'plain'):.3f}x"
    )
