"""Find, fetch, verify, decode and cache image datasets; torchvision.datasets reads them, and
cnnlab itself reads CIFAR's pickled batches, with an unpickler that builds no code.

Supported (data.dataset): MNIST, FashionMNIST, KMNIST, EMNIST, QMNIST, CIFAR10, CIFAR100 (in
torchvision's folder layout under data.root) and ImageFolder (data.root/{train,test}/<class>/...).
Each file is checked against data.md5 (of its uncompressed bytes); a missing set is fetched from
the configured sources in turn, and a file that fails its check is reported, never used.

Decoding happens once: the splits are cached as uint8 tensors (torch.save, read back with
weights_only=True) beside the data where cnnlab created that folder, else in the user's cache
directory; the cache's name covers everything that changes the decoded tensors, so a file
replaced on disk is read (and verified) again.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from cnnlab.data.cache import Recipe, cache_recipe, file_stamps
from cnnlab.data.catalog import (
    CIFAR_SETS,
    IDX_SETS,
    dataset_home,
    files_folder,
)
from cnnlab.data.splits import DataError, top_label

_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x0C: np.dtype(">i4")}  # ubyte images, QMNIST's int labels


# -------------------------------------------------------------- torchvision's file-based sets
def files_recipe(
    dataset: str, split: str | None, root: Path, files: Mapping[str, str], md5: Mapping[str, str]
) -> Recipe:
    folder = files_folder(dataset, root)
    paths = {key: find_file(folder, name) for key, name in files.items()}
    stamp = {
        "dataset": dataset,
        "split": split,
        "files": file_stamps(list(paths.values())),
        "md5": {key: md5.get(key) for key in files},
    }
    decode = lambda: _decode_files(dataset, split, folder, files, paths, md5)  # noqa: E731
    return cache_recipe(dataset, folder, dataset_home(dataset, root), stamp, decode)


def _decode_files(
    dataset: str,
    split: str | None,
    folder: Path,
    files: Mapping[str, str],
    paths: Mapping[str, Path],
    md5: Mapping[str, str],
) -> dict[str, Any]:
    """Verify the files, then let torchvision decode them: the cache's contents."""
    digests = []
    # torchvision reads <view>/<its layout>: links to the verified files, and the verified bytes
    # of gzipped ones, so nothing is written beside the user's files and nothing else is read
    # (MNIST would prefer a stale processed/training.pt, say).
    with tempfile.TemporaryDirectory(prefix="cnnlab-read-") as view:
        view_folder = files_folder(dataset, Path(view))
        view_folder.mkdir(parents=True)
        for key, name in files.items():
            path = paths[key]
            blob = read_bytes(path)
            actual = hashlib.md5(blob).hexdigest()
            expected = md5.get(key)
            if expected and actual != expected:
                raise DataError(
                    f"{path} is corrupt or truncated (md5 {actual}, expected {expected}): "
                    "delete it and run again to re-fetch, or replace it with a good copy"
                )
            if dataset in IDX_SETS:
                parse_idx(blob, str(path))  # one clear line where torchvision would assert
            digests.append(actual)
            if path.suffix == ".gz":
                (view_folder / name).write_bytes(blob)
            else:
                try:
                    (view_folder / name).symlink_to(path)
                except OSError:  # a file system without links
                    shutil.copyfile(path, view_folder / name)
            del blob
        decoded = _read_with_torchvision(dataset, split, Path(view), folder)
    for part in ("train", "test"):
        images, labels = decoded[f"{part}_images"], decoded[f"{part}_labels"]
        if len(images) != len(labels):
            raise DataError(
                f"{folder}: {part} has {len(images)} images but {len(labels)} labels; "
                "replace the files with a matching set"
            )
        if top_label(labels) >= len(decoded["classes"]) or (len(labels) and labels.min() < 0):
            raise DataError(
                f"{folder}: {part} label {top_label(labels)} is out of range for "
                f"{dataset}'s {len(decoded['classes'])} classes; replace the files with a good copy"
            )
    decoded["checksum"] = hashlib.md5("".join(digests).encode()).hexdigest()
    return decoded


# What CIFAR's pickled batches hold: dicts, lists, str/bytes and numpy arrays. Python 2 wrote
# numpy.core's _reconstruct (numpy 2 writes numpy._core's); _codecs.encode is how Python 3's
# protocol 2 writes bytes.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


# Each release's batches (train, test), the file of its class names and their key there.
_CIFAR_LAYOUT = {
    "CIFAR10": (
        {True: [f"data_batch_{i}" for i in range(1, 6)], False: ["test_batch"]},
        "batches.meta",
        "label_names",
    ),
    "CIFAR100": ({True: ["train"], False: ["test"]}, "meta", "fine_label_names"),
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only _CIFAR_GLOBALS: a crafted batch cannot call anything."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


class CifarSplit(NamedTuple):
    """One split of CIFAR-10/100: (N, 3, 32, 32) uint8 images, int64 labels, class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]


def _load_cifar_pickle(path: Path) -> Any:
    # The files' md5s come from the config, which may be a logged one from an untrusted store:
    # a matching md5 proves nothing about who wrote the file, so plain pickle never reads it.
    if not path.is_file():
        raise RuntimeError(f"{path.name} is missing")
    with path.open("rb") as file:
        return _CifarUnpickler(file, encoding="latin1").load()  # Python 2's str: latin1


def read_cifar(dataset: str, root: Path, train: bool) -> CifarSplit:
    """The train or test split of the CIFAR-10/100 batches under root (torchvision's layout),
    read as torchvision's CIFAR10/CIFAR100 read them, by _CifarUnpickler."""
    batches, meta, key = _CIFAR_LAYOUT[dataset]
    folder = files_folder(dataset, root)
    data: list[Any] = []
    targets: list[Any] = []
    for name in batches[train]:
        entry = _load_cifar_pickle(folder / name)
        data.append(entry["data"])
        # torchvision's rule, kept so that the same files give the same labels.
        targets.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
    # Each row is the red plane, then green, then blue: (3, 32, 32) as it lies.
    images = np.vstack(data).reshape(-1, 3, 32, 32)
    classes = [str(c) for c in _load_cifar_pickle(folder / meta)[key]]
    return CifarSplit(torch.from_numpy(images), torch.tensor(targets, dtype=torch.int64), classes)


def _download_cifar(dataset: str, root: Path) -> None:
    """torchvision's download of the release's archive, checked against its md5 (tgz_md5),
    unless every batch is there already."""
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import download_and_extract_archive

    release = getattr(tvd, dataset)
    # Only whether the batches exist, not their release md5s: re-packed or synthetic files are
    # data.md5's to check, which cnnlab does before reading.
    folder = files_folder(dataset, root)
    if all((folder / name).is_file() for name, _ in release.train_list + release.test_list):
        return
    download_and_extract_archive(
        release.url, str(root), filename=release.filename, md5=release.tgz_md5
    )


def torchvision_set(dataset: str, split: str | None, root: Path, train: bool, download: bool):
    """The train or test split of `dataset` under root, downloaded first if `download`: the
    torchvision dataset, or for CIFAR, cnnlab's reading of the same files (a CifarSplit)."""
    if dataset in CIFAR_SETS:
        if download:
            _download_cifar(dataset, root)
        return read_cifar(dataset, root, train)
    import torchvision.datasets as tvd

    cls = getattr(tvd, dataset)  # MNIST's family checks only that its files exist
    if dataset == "EMNIST":
        return cls(str(root), split=split, train=train, download=download)
    if dataset == "QMNIST":
        return cls(str(root), what="train" if train else split, compat=True, download=download)
    return cls(str(root), train=train, download=download)


def _read_with_torchvision(
    dataset: str, split: str | None, view: Path, folder: Path
) -> dict[str, Any]:
    decoded: dict[str, Any] = {}
    try:
        for part in ("train", "test"):
            tv = torchvision_set(dataset, split, view, train=part == "train", download=False)
            if dataset in CIFAR_SETS:
                images, labels = tv.images, tv.labels
            else:
                images = tv.data
                if dataset == "EMNIST":  # its files hold each image transposed: (N, W, H)
                    images = images.transpose(1, 2)
                images = images.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
                # QMNIST's labels hold 8 columns per image; the first is the class (compat).
                labels = (tv.targets[:, 0] if dataset == "QMNIST" else tv.targets).long()
            decoded[f"{part}_images"] = images.to(torch.uint8).contiguous()
            decoded[f"{part}_labels"] = labels.contiguous()
            decoded["classes"] = [str(c) for c in tv.classes]
    # torchvision asserts or raises what the file's bytes make it raise; one line here.
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AssertionError,
            EOFError, pickle.UnpicklingError) as exc:  # fmt: skip
        raise DataError(
            f"{folder}: torchvision cannot read {dataset} ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}); replace the files with a good copy"
        ) from exc
    return decoded


# ------------------------------------------------------------------------------ reading & checks
def find_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_bytes(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"{path} is corrupt or truncated ({exc}); delete it to re-fetch") from exc


def parse_idx(blob: bytes, where: str = "<bytes>") -> np.ndarray:
    """Decode an IDX file (unsigned bytes, or QMNIST's big-endian int32) into its declared shape."""
    # Header: 2 zero bytes, a type code, the number of dimensions, then one big-endian uint32
    # per dimension; the data follows as one flat run of items.
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0 or blob[2] not in _IDX_TYPES:
        raise DataError(f"{where} is not an IDX file of unsigned bytes or ints (bad magic number)")
    dtype, ndim = _IDX_TYPES[blob[2]], blob[3]
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise DataError(f"{where} is truncated inside its IDX header")
    shape = tuple(int(d) for d in np.frombuffer(blob, dtype=">u4", count=ndim, offset=4))
    if len(blob) - header != int(np.prod(shape)) * dtype.itemsize:
        raise DataError(
            f"{where} holds {len(blob) - header} data bytes but its header declares {shape}"
        )
    return np.frombuffer(blob, dtype=dtype, offset=header).reshape(shape)
