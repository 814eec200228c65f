"""cnnlab-eval and cnnlab-predict: use a logged model.

    cnnlab-eval <run_id | models:/m-...> [data=fashion_mnist] [data.root=...]
    cnnlab-predict <run_id | models:/m-...> digit.png another.jpg ...

Both find the store like cnnlab-train (tracking.uri=..., $MLFLOW_TRACKING_URI, or mlflow.db here)
and take cnnlab-train's key=value overrides for it and for the data.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

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


def evaluate_logged(model_ref: str, overrides: list[str]) -> tuple[float, float]:
    """Test loss and accuracy of a logged model on the configured dataset's test split."""
    cfg = composed(overrides)
    model = load_model(model_ref, resolve_uri(cfg.tracking.uri, Path.cwd()))
    data = load_dataset(**cfg.data)
    loss, accuracy = evaluate(model, data.test, cfg.train.eval_batch_size)
    print(
        f"{model_ref} on {cfg.data.name} test ({len(data.test)} images): "
        f"test loss {loss:.4f}, test accuracy {accuracy:.4%}"
    )
    return loss, accuracy


def image_tensor(path: Path, in_shape: tuple[int, ...]) -> tuple[torch.Tensor, bool]:
    """An image file as the model's input (1, C, H, W) in [0, 1], and whether it was inverted.

    Like the training data: greyscale (or RGB for 3 channels), resized to H x W, scaled to
    [0, 1], light strokes on a dark background (a dark-on-light image is inverted).
    """
    from PIL import Image, UnidentifiedImageError

    channels, height, width = in_shape
    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            image = image.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32) / 255
    except (OSError, UnidentifiedImageError) as exc:
        raise CnnlabError(f"{path}: cannot read an image ({exc.__class__.__name__})") from exc
    pixels = pixels.reshape(height, width, -1).transpose(2, 0, 1)  # (C, H, W)
    border = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, :, 0], pixels[:, :, -1]], 1)
    inverted = bool(border.mean() > 0.5)
    if inverted:
        pixels = 1 - pixels
    return torch.from_numpy(np.ascontiguousarray(pixels)).unsqueeze(0), inverted


def predict(model_ref: str, paths: list[str], overrides: list[str]) -> int:
    """Print the class and probabilities for each image; return how many could not be read."""
    cfg = composed(overrides)
    model = load_model(model_ref, resolve_uri(cfg.tracking.uri, Path.cwd()))
    failures = 0
    for name in paths:
        try:
            x, inverted = image_tensor(Path(name), model.in_shape)
        except CnnlabError as exc:
            print(f"cnnlab-predict: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        with torch.no_grad():
            probabilities = torch.softmax(model(x), dim=1)[0]
        label = int(probabilities.argmax())
        shown = " ".join(f"{i}:{p:.3f}" for i, p in enumerate(probabilities.tolist()))
        note = " (inverted: dark strokes on a light background)" if inverted else ""
        print(f"{name}: class {label} (p={probabilities[label]:.3f}){note}  [{shown}]")
    return failures


def _cli(prog: str, body: Callable[[str, list[str], list[str]], int]) -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if args else 2)
    overrides = [a for a in args[1:] if "=" in a]
    rest = [a for a in args[1:] if "=" not in a]
    try:
        failed = body(args[0], rest, overrides)
    except CnnlabError as exc:
        sys.exit(f"{prog}: error: {exc}")
    except (HydraException, OmegaConfBaseException) as exc:
        sys.exit(f"{prog}: error: {schema.describe_config_error(exc)}")
    if failed:
        sys.exit(1)


def _eval(model_ref: str, extra: list[str], overrides: list[str]) -> int:
    if extra:
        raise CnnlabError(f"unexpected argument {extra[0]}: give key=value overrides")
    evaluate_logged(model_ref, overrides)
    return 0


def eval_main() -> None:
    """Console entry point of cnnlab-eval."""
    _cli("cnnlab-eval", _eval)


def predict_main() -> None:
    """Console entry point of cnnlab-predict."""
    _cli("cnnlab-predict", predict)
