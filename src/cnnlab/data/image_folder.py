"""data=imagefolder: a user's folder of images, one subfolder per class (train/ and test/, or
only class folders and a seeded stratified test split), decoded once into tensors.

The folder is scanned by cnnlab, not torchvision's ImageFolder (which follows every link): it
stays inside data.root, follows a link only to something inside it, detects loops, bounds the
files it looks at, and says what it skipped."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnlab.data.cache import Recipe, cache_recipe, file_stamps
from cnnlab.data.splits import DataError, stratified_split

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------- ImageFolder
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


# torchvision's ImageFolder's extensions: the files a class folder's images are.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_ENTRIES = 2_000_000  # files and folders looked at under data.root before giving up


@dataclass
class ImageScan:
    """The images of one folder of class folders, in torchvision ImageFolder's order."""

    classes: list[str]
    samples: list[tuple[str, int]]  # (path, class index)
    skipped: list[str]  # links that lead outside data.root, nowhere, or round in a loop


def scan_images(folder: Path, root: Path) -> ImageScan:
    """The class folders of `folder` and their image files, never leaving `root`: a link is
    followed only to a file or folder inside it, a folder reached twice is a loop (skipped), and
    more than MAX_ENTRIES entries is a DataError. FileNotFoundError, as torchvision's, for no
    class folder or a class without images."""
    inside = root.resolve()
    skipped: list[str] = []

    def kept(path: Path, within: Path) -> bool:  # a plain entry, or a link into `within`
        if not path.is_symlink():
            return True
        try:
            ok = path.resolve(strict=True).is_relative_to(within)
        except (OSError, RuntimeError):  # dangling, or a loop of links
            ok = False
        if not ok:
            skipped.append(str(path))
        return ok

    classes = sorted(
        e.name for e in os.scandir(folder) if e.is_dir() and kept(Path(e.path), inside)
    )
    if not classes:
        raise FileNotFoundError(f"Couldn't find any class folder in {folder}.")
    samples, seen, entries, empty = [], set(), 0, []
    for index, name in enumerate(classes):
        files: dict[str, list[str]] = {}  # folder -> image files, walked without following
        stack = [folder / name]
        own = stack[0].resolve()  # a folder link may not lead out of its class: labels stay true
        while stack:
            here = stack.pop()
            real = here.resolve()
            if real in seen:  # reached again through a link: a loop
                skipped.append(str(here))
                continue
            seen.add(real)
            files[str(here)] = []
            for entry in os.scandir(here):
                entries += 1
                if entries > MAX_ENTRIES:
                    raise DataError(
                        f"{root} holds more than {MAX_ENTRIES} files and folders; point "
                        "data.root at the folder of your class folders"
                    )
                path = Path(entry.path)
                if entry.is_dir():
                    if kept(path, own):
                        stack.append(path)
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and kept(path, inside):
                    if entry.is_file():
                        files[str(here)].append(entry.path)
        found = [(p, index) for d in sorted(files) for p in sorted(files[d])]
        samples += found
        if not found:
            empty.append(name)
    if empty:
        raise FileNotFoundError(
            f"Found no valid file for the classes {', '.join(sorted(empty))}. Supported "
            f"extensions are: {', '.join(IMAGE_EXTENSIONS)}"
        )
    return ImageScan(classes, samples, skipped)


def image_folder_recipe(
    root: Path,
    image_size: Sequence[int] | None,
    channels: int | None,
    test_fraction: float,
    split_seed: int,
) -> Recipe:
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
            scans[part] = scan_images(folder, root)
        except FileNotFoundError as exc:
            raise DataError(
                f"{folder}: {' '.join(str(exc).split())}; put each class's images in "
                f"{folder}/<class>/ (an empty class folder: remove it). {layout}"
            ) from exc
    skipped = [path for scan in scans.values() for path in scan.skipped]
    if skipped:
        log.warning(
            "warning: skipped %d link(s) under %s that lead outside it, nowhere or round in a "
            "loop, e.g. %s", len(skipped), root, skipped[0],
        )  # fmt: skip
    if "all" not in scans and scans["train"].classes != scans["test"].classes:
        raise DataError(
            f"{root / 'test'} has classes {scans['test'].classes} but {root / 'train'} has "
            f"{scans['train'].classes}; give train/ and test/ the same class folders"
        )
    samples = {part: [Path(p) for p, _ in scan.samples] for part, scan in scans.items()}
    stamp = {
        "dataset": "ImageFolder",
        "files": {part: file_stamps(paths) for part, paths in samples.items()},
        "image_size": list(image_size) if image_size else None,
        "channels": channels,
        "test_fraction": test_fraction if "all" in scans else None,
        "split_seed": split_seed if "all" in scans else None,
    }
    size = tuple(image_size) if image_size else None
    decode = lambda: _decode_image_folder(root, scans, size, channels, test_fraction, split_seed)  # noqa: E731
    return cache_recipe("ImageFolder", root, root, stamp, decode)


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
        images = [load(path) for path, _ in scan.samples]
        labels = [label for _, label in scan.samples]
        parts[part] = (torch.stack(images), torch.tensor(labels, dtype=torch.int64))
        decoded["classes"] = list(scan.classes)
    if "all" in parts:
        labels_all = parts["all"][1]
        parts = stratified_split(*parts["all"], test_fraction, split_seed)
        for part, (_, labels) in parts.items():
            if not len(labels):  # a class with 2+ images puts one in each split
                raise DataError(
                    f"{root}: data.test_fraction={test_fraction} of its {len(labels_all)} "
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
