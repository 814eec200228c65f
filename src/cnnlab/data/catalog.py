"""What cnnlab knows of each dataset without reading it: names, splits, file names, folders.

Kept free of torch and numpy: the config schema checks data.* against it before anything heavy
is imported, so a config error answers at once.
"""

from __future__ import annotations

import re
from pathlib import Path

# Checksum key (conf/data/*.yaml md5.*) -> file name, for MNIST, Fashion-MNIST and KMNIST.
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_SETS = ("MNIST", "FashionMNIST", "KMNIST", "EMNIST", "QMNIST")
CIFAR_SETS = ("CIFAR10", "CIFAR100")
DATASETS = (*IDX_SETS, *CIFAR_SETS, "ImageFolder")
EMNIST_SPLITS = ("byclass", "bymerge", "balanced", "letters", "digits", "mnist")
QMNIST_TESTS = ("test10k", "test50k", "test")  # QMNIST's test sets: MNIST's 10k, the rest, all
DEFAULT_SPLITS = {"EMNIST": "balanced", "QMNIST": "test10k"}  # data.split=null means these
# A package on the npm registry: [@scope/]name[@version or dist-tag]. Anything else (a git or
# GitHub spec, a URL, a path or tarball) `npm pack` builds from source, running its scripts.
_NPM_PACKAGE = re.compile(
    r"(?:@[a-z0-9-][a-z0-9._~-]*/)?[a-z0-9-][a-z0-9._~-]*(?:@[A-Za-z0-9][A-Za-z0-9.+_-]*)?"
)


def is_npm_registry_package(spec: str) -> bool:
    """Whether `spec` names a registry package ([@scope/]name[@version]), nothing npm builds."""
    # npm takes a spec ending in .tgz/.tar(.gz) as a local tarball, whatever precedes it.
    tarball = spec.lower().endswith((".tgz", ".tar", ".tar.gz"))
    return bool(_NPM_PACKAGE.fullmatch(spec)) and not tarball


def dataset_home(dataset: str, root: Path) -> Path:
    """The folder torchvision keeps `dataset` in under `root` (ImageFolder: root itself)."""
    if dataset in IDX_SETS:
        return root / dataset
    if dataset in CIFAR_SETS:
        return root / ("cifar-10-batches-py" if dataset == "CIFAR10" else "cifar-100-python")
    return root


def files_folder(dataset: str, root: Path) -> Path:
    """The folder holding `dataset`'s files: <home>/raw for the IDX sets, else the home."""
    home = dataset_home(dataset, root)
    return home / "raw" if dataset in IDX_SETS else home


def dataset_files(dataset: str, split: str | None = None) -> dict[str, str]:
    """md5 key -> file name of every file `dataset` (with `split`) is read from."""
    if dataset in ("MNIST", "FashionMNIST", "KMNIST"):
        return dict(FILES)
    if dataset == "EMNIST":
        return {
            f"{part}_{kind}": f"emnist-{split}-{part}-{kind}-{idx}-ubyte"
            for part in ("train", "test")
            for kind, idx in (("images", "idx3"), ("labels", "idx1"))
        }
    if dataset == "QMNIST":
        return {
            "train_images": "qmnist-train-images-idx3-ubyte",
            "train_labels": "qmnist-train-labels-idx2-int",
            "test_images": "qmnist-test-images-idx3-ubyte",
            "test_labels": "qmnist-test-labels-idx2-int",
        }
    if dataset == "CIFAR10":
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
        return {n: n for n in names}
    if dataset == "CIFAR100":
        return {n: n for n in ("train", "test", "meta")}
    return {}  # ImageFolder: whatever images the class folders hold
