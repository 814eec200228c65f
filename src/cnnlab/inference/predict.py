"""The class of each image file by a logged model (cnnlab-predict's work): any image converted
the way the model's training data was (size, channels, light-on-dark), decoding bounded."""

from __future__ import annotations

import os
import stat
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from cnnlab import CnnlabError, one_line
from cnnlab.config.compose import compose_config, store_uri

# numpy, torch and MLflow are imported where an image is read or a model loaded: `--help` and a
# bad argument answer without them.
if TYPE_CHECKING:
    import torch


MAX_MEGAPIXELS = 64  # larger images are refused: decoding one takes up to 4 bytes a pixel


def image_tensor(
    path: Path, in_shape: tuple[int, ...], light_on_dark: bool = True
) -> tuple[torch.Tensor, bool]:
    """An image file as the model's input (1, C, H, W) in [0, 1], and whether it was inverted.

    Converted exactly as the training images were (data.image_pixels: greyscale or RGB, 16-bit
    scaled, resized to H x W), then scaled to [0, 1]. A model that learnt light strokes on a
    dark background (MNIST and its family: `light_on_dark`) gets a dark-on-light image
    inverted; any other model (photos, CIFAR, an image folder) takes images as they are.
    """
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from cnnlab.data.image_folder import image_pixels

    channels, height, width = in_shape
    try:
        with _regular_file(path) as file, warnings.catch_warnings():
            # Pillow warns past its own pixel limit and refuses past twice that: both refusals.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                if image.width * image.height > MAX_MEGAPIXELS * 10**6:
                    raise CnnlabError(
                        f"{path}: cannot read an image ({image.width}x{image.height} pixels, "
                        f"over the {MAX_MEGAPIXELS}-megapixel limit)"
                    )
                pixels = image_pixels(image, channels, (height, width)).numpy() / np.float32(255)
    except CnnlabError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise CnnlabError(
            f"{path}: cannot read an image (over the {MAX_MEGAPIXELS}-megapixel limit)"
        ) from exc
    except UnidentifiedImageError as exc:  # its own message names a file descriptor
        raise CnnlabError(f"{path}: cannot read an image (not a format Pillow knows)") from exc
    except Exception as exc:  # any decoder failure costs this file its line, not the others theirs
        raise CnnlabError(f"{path}: cannot read an image ({_reason(exc)})") from exc
    border = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, :, 0], pixels[:, :, -1]], 1)
    inverted = light_on_dark and bool(border.mean() > 0.5)
    if inverted:
        pixels = 1 - pixels
    return torch.from_numpy(np.ascontiguousarray(pixels)).unsqueeze(0), inverted


def _regular_file(path: Path) -> BinaryIO:
    # stat, not open, first: opening a FIFO waits for a writer, opening a device may act on it.
    kind = _not_regular(os.stat(path).st_mode)
    if kind is None:
        # O_NONBLOCK and a second look at what was opened: the path may have changed since.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        kind = _not_regular(os.fstat(fd).st_mode)
        if kind is None:
            return os.fdopen(fd, "rb")
        os.close(fd)
    raise CnnlabError(f"{path}: cannot read an image ({kind}, not a regular file)")


def _not_regular(mode: int) -> str | None:
    # What a file that is not a regular file is, for the error line; None for a regular file.
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    return "a socket" if stat.S_ISSOCK(mode) else "a device"


def _reason(exc: Exception) -> str:
    # One line: an OSError's own words (no such file, permission denied), else type and message.
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return one_line(exc)


def predict(
    model_ref: str, paths: list[str], overrides: list[str], trust_store: bool = False
) -> int:
    """Print the class and probabilities for each image; return how many could not be read."""
    if not paths:
        raise CnnlabError("give one or more image files after the model")
    import torch

    from cnnlab.inference.loaded import load_model

    cfg = compose_config(overrides)
    model = load_model(model_ref, store_uri(cfg), trust_store)
    failures = 0
    for name in paths:
        try:
            x, inverted = image_tensor(Path(name), model.in_shape, model.light_on_dark)
        except CnnlabError as exc:
            print(f"cnnlab-predict: error: {exc}", file=sys.stderr, flush=True)
            failures += 1
            continue
        with torch.no_grad():
            probabilities = torch.softmax(model(x), dim=1)[0]
        label = int(probabilities.argmax())
        name_of = f"{model.classes[label]}, " if model.classes else ""  # e.g. "cat, "
        shown = " ".join(f"{i}:{p:.3f}" for i, p in enumerate(probabilities.tolist()))
        note = " (inverted: dark strokes on a light background)" if inverted else ""
        print(
            f"{name}: class {label} ({name_of}p={probabilities[label]:.3f}){note}  [{shown}]",
            flush=True,
        )
    return failures
