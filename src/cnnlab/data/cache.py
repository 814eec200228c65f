"""The decoded tensors' cache: a dataset is decoded once, then loaded from a file keyed by the
stamps (size, mtime) of the files it came from."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnnlab.data.splits import Dataset, Split

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the cached tensors' layout or decoding changes (2: EMNIST upright)


MARKER = ".cnnlab-created"  # in a folder cnnlab created: its cache may live beside the data


_CACHE_FOLDER = ".cnnlab-cache"


@dataclass
class Recipe:
    """How to decode one dataset, and the name of its cached tensors."""

    dataset: str
    source: Path
    key: str  # sha256 over everything that changes the decoded tensors
    cache_file: Path
    decode: Callable[[], dict[str, Any]]  # -> train/test images and labels, classes, checksum


def cache_recipe(dataset: str, source: Path, home: Path, stamp: dict, decode) -> Recipe:
    key = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **stamp}, sort_keys=True).encode())
    key = key.hexdigest()
    # Beside the data only in a folder cnnlab created: a user's folder is theirs to keep as is.
    if (home / MARKER).is_file():
        folder = home / _CACHE_FOLDER
    else:
        folder = user_cache_dir()
    # One cache file per dataset folder: a new one replaces the stale one (see _write_cache).
    where = hashlib.sha256(str(source).encode()).hexdigest()[:12]
    return Recipe(dataset, source, key, folder / f"{dataset}-{where}-{key[:24]}.pt", decode)


def user_cache_dir() -> Path:
    """$CNNLAB_CACHE_DIR, else $XDG_CACHE_HOME/cnnlab, else ~/.cache/cnnlab."""
    if os.environ.get("CNNLAB_CACHE_DIR"):
        return Path(os.environ["CNNLAB_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cnnlab"


def file_stamps(paths: Sequence[Path]) -> list:
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def cached_dataset(recipe: Recipe) -> Dataset:
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
        log.warning(
            "cnnlab: cannot cache the decoded data in %s (%s); set CNNLAB_CACHE_DIR to a "
            "writable folder", path.parent, exc.strerror,
        )  # fmt: skip
    finally:
        with suppress(OSError):
            partial.unlink(missing_ok=True)
