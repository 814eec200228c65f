"""cnnlab-eval and cnnlab-predict: use a logged model.

    cnnlab-eval <run_id | models:/m-...> [data=fashion_mnist] [data.root=...] [--trust-store]
    cnnlab-predict <run_id | models:/m-...> digit.png another.jpg ... [--trust-store]

Both find the store like cnnlab-train (tracking.uri=..., $MLFLOW_TRACKING_URI, or mlflow.db here)
and take cnnlab-train's key=value overrides for it and for the data.

Nothing in the store runs as code: the network is rebuilt from its run's logged config and given
the weights in the model's pt2 archive, read as plain numbers. A model that cannot be loaded
that way (a pickle, a model cnnlab did not log) is refused unless you pass:

    --trust-store   load the model the way MLflow stores it (pickle, torch.export program),
                    which can run code from the store: only for a store you trust

cnnlab-predict reads regular files only (not FIFOs, devices or directories) of at most
64 megapixels; each file it cannot read gets one error line, and the others still get answers.
"""

from __future__ import annotations

import os
import stat
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from cnnlab import CnnlabError, schema
from cnnlab.data import load_dataset
from cnnlab.loop import evaluate
from cnnlab.tracking import load_model, resolve_uri
from cnnlab.train import CONF_DIR


def composed(overrides: list[str]) -> DictConfig:
    """cnnlab-train's config with `overrides`, checked the same way."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    schema.validate(cfg)
    return cfg


def evaluate_logged(
    model_ref: str, overrides: list[str], trust_store: bool = False
) -> tuple[float, float]:
    """Test loss and accuracy of a logged model on the configured dataset's test split."""
    cfg = composed(overrides)
    model = load_model(model_ref, resolve_uri(cfg.tracking.uri, Path.cwd()), trust_store)
    data = load_dataset(**cfg.data)
    loss, accuracy = evaluate(model, data.test, cfg.train.eval_batch_size)
    print(
        f"{model_ref} on {cfg.data.name} test ({len(data.test)} images): "
        f"test loss {loss:.4f}, test accuracy {accuracy:.4%}"
    )
    return loss, accuracy


MAX_MEGAPIXELS = 64  # larger images are refused: decoding one takes up to 4 bytes a pixel


def image_tensor(path: Path, in_shape: tuple[int, ...]) -> tuple[torch.Tensor, bool]:
    """An image file as the model's input (1, C, H, W) in [0, 1], and whether it was inverted.

    Like the training data: greyscale (or RGB for 3 channels), resized to H x W, scaled to
    [0, 1], light strokes on a dark background (a dark-on-light image is inverted).
    """
    from PIL import Image, UnidentifiedImageError

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
                image = image.convert("L" if channels == 1 else "RGB")
                image = image.resize((width, height), Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32) / 255
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
    pixels = pixels.reshape(height, width, -1).transpose(2, 0, 1)  # (C, H, W)
    border = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, :, 0], pixels[:, :, -1]], 1)
    inverted = bool(border.mean() > 0.5)
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
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{exc.__class__.__name__}: {first}" if first else exc.__class__.__name__


def predict(
    model_ref: str, paths: list[str], overrides: list[str], trust_store: bool = False
) -> int:
    """Print the class and probabilities for each image; return how many could not be read."""
    if not paths:
        raise CnnlabError("give one or more image files after the model")
    cfg = composed(overrides)
    model = load_model(model_ref, resolve_uri(cfg.tracking.uri, Path.cwd()), trust_store)
    failures = 0
    for name in paths:
        try:
            x, inverted = image_tensor(Path(name), model.in_shape)
        except CnnlabError as exc:
            print(f"cnnlab-predict: error: {exc}", file=sys.stderr, flush=True)
            failures += 1
            continue
        with torch.no_grad():
            probabilities = torch.softmax(model(x), dim=1)[0]
        label = int(probabilities.argmax())
        shown = " ".join(f"{i}:{p:.3f}" for i, p in enumerate(probabilities.tolist()))
        note = " (inverted: dark strokes on a light background)" if inverted else ""
        print(f"{name}: class {label} (p={probabilities[label]:.3f}){note}  [{shown}]", flush=True)
    return failures


TRUST_STORE = "--trust-store"


def _cli(prog: str, body: Callable[[str, list[str], list[str], bool], int]) -> None:
    args = sys.argv[1:]
    trust_store = TRUST_STORE in args
    args = [a for a in args if a != TRUST_STORE]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if args else 2)
    unknown = [a for a in args if a.startswith("--")]
    if unknown:
        sys.exit(
            f"{prog}: error: unknown option {unknown[0]}; the options are {TRUST_STORE} and "
            "--help (a file whose name starts with -- can be given as ./--name)"
        )
    overrides = [a for a in args[1:] if "=" in a]
    rest = [a for a in args[1:] if "=" not in a]
    try:
        failed = body(args[0], rest, overrides, trust_store)
    except CnnlabError as exc:
        sys.exit(f"{prog}: error: {exc}")
    except (HydraException, OmegaConfBaseException) as exc:
        sys.exit(f"{prog}: error: {schema.describe_config_error(exc)}")
    if failed:
        sys.exit(1)


def _eval(model_ref: str, extra: list[str], overrides: list[str], trust_store: bool) -> int:
    if extra:
        raise CnnlabError(f"unexpected argument {extra[0]}: give key=value overrides")
    evaluate_logged(model_ref, overrides, trust_store)
    return 0


def eval_main() -> None:
    """Console entry point of cnnlab-eval."""
    _cli("cnnlab-eval", _eval)


def predict_main() -> None:
    """Console entry point of cnnlab-predict."""
    _cli("cnnlab-predict", predict)
