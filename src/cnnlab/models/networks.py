"""Classifiers, and the one place a config's model class is resolved and built.

Constructor keywords are the keys of conf/model/*.yaml; the data decides `in_shape` and
`num_classes`, which `build_network` passes in.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import OmegaConf
from torch import Tensor, nn

from cnnlab import CnnlabError, one_line
from cnnlab.data.preprocess import with_normalization


def _relu() -> nn.ReLU:
    # In place: the same values without a new tensor per activation, a measurable share of a
    # small-batch step (cnnlab-bench bench.sections=[step]). Safe here: no layer's backward
    # needs its output before the ReLU.
    return nn.ReLU(inplace=True)


def _dense_head(in_features: int, hidden: Sequence[int], num_classes: int) -> list[nn.Module]:
    # Linear+ReLU per hidden width, then the logits layer: the MLP that ends every model here.
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), _relu()]
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return layers


class ConvNet(nn.Module):
    """The article's ConvNet: valid convs with ReLU, flatten, then a dense head.

    Layers are created in the article's order so that a seed initialises the same weights.
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        conv_channels: Sequence[int] = (10, 5),
        kernel_size: int = 3,
        hidden: Sequence[int] = (64, 32),
    ) -> None:
        super().__init__()
        channels, height, width = in_shape
        layers: list[nn.Module] = []
        for out_channels in conv_channels:
            layers += [nn.Conv2d(channels, out_channels, kernel_size), _relu()]
            # No padding: each conv trims kernel_size - 1 pixels from each side's length.
            channels, height, width = (
                out_channels,
                height - kernel_size + 1,
                width - kernel_size + 1,
            )
        if height < 1 or width < 1:
            raise CnnlabError(
                f"model.conv_channels={list(conv_channels)} with model.kernel_size={kernel_size} "
                f"shrinks a {in_shape[1]}x{in_shape[2]} image to nothing: use fewer/smaller convs"
            )
        layers.append(nn.Flatten())
        layers += _dense_head(channels * height * width, hidden, num_classes)
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, num_classes) logits."""
        return self.layers(x)


class MLP(nn.Module):
    """A multilayer perceptron on the flattened image: the baseline the article argues against."""

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        hidden: Sequence[int] = (64, 32),
    ) -> None:
        super().__init__()
        features = 1
        for side in in_shape:
            features *= side
        self.layers = nn.Sequential(nn.Flatten(), *_dense_head(features, hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, num_classes) logits."""
        return self.layers(x)


class TorchvisionNet(nn.Module):
    """Any torchvision classification model by name, untrained, fitted to the data: its first
    convolution takes the data's channels and its head gives `num_classes` logits."""

    def __init__(
        self,
        name: str,
        in_shape: Sequence[int] = (3, 224, 224),
        num_classes: int = 1000,
        small_images: bool = False,
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        import torchvision  # here: a second's import that only these models need

        known = torchvision.models.list_models(module=torchvision.models)  # classifiers only
        if name not in known:
            guess = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {guess[0]}? " if guess else ""
            raise ModelConfigError(
                f"model.name={name} is not a torchvision classification model; {hint}"
                'list them with: python -c "import torchvision; '
                'print(torchvision.models.list_models(module=torchvision.models))"'
            )
        kwargs = dict(kwargs or {})
        for key in ("weights", "num_classes"):
            if key in kwargs:
                why = "it is built untrained" if key == "weights" else "the data sets it"
                raise ModelConfigError(f"model.kwargs.{key}: {why}; remove the key")
        try:
            self.net = torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
        except TypeError as exc:  # a keyword the builder does not take: its words, one line
            raise ModelConfigError(f"model.kwargs for {name}: {one_line(exc)}") from exc
        channels = in_shape[0]
        if small_images:
            # CIFAR-style ResNet stem: a 32x32 image keeps its resolution into layer1 instead
            # of shrinking to 8x8 in the 7x7 stride-2 conv and the max-pool.
            conv1, maxpool = getattr(self.net, "conv1", None), getattr(self.net, "maxpool", None)
            if not (isinstance(conv1, nn.Conv2d) and isinstance(maxpool, nn.MaxPool2d)):
                raise ModelConfigError(
                    f"model.small_images=true needs a ResNet-style stem (conv1 + maxpool), "
                    f"which {name} has not; set model.small_images=false"
                )
            self.net.conv1 = nn.Conv2d(channels, conv1.out_channels, 3, 1, 1, bias=False)
            self.net.maxpool = nn.Identity()
        _adapt_first_conv(self.net, channels)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, num_classes) logits."""
        return self.net(x)


def _adapt_first_conv(net: nn.Module, channels: int) -> None:
    # torchvision's classifiers expect RGB; a new first conv (PyTorch's default init) with the
    # same geometry reads `channels` planes instead, e.g. MNIST's one.
    first = next(((p, m) for p, m in net.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None or first[1].in_channels == channels:
        return
    path, conv = first
    parent_path, _, attribute = path.rpartition(".")
    replacement = nn.Conv2d(
        channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )  # fmt: skip
    setattr(net.get_submodule(parent_path), attribute, replacement)


# ------------------------------------------------------------- a config's model, built safely
class ModelConfigError(CnnlabError):
    """A model config that names no usable class or gives it arguments it does not take."""


TRUSTED_MODULES = "CNNLAB_TRUSTED_MODULES"  # packages a logged config may import models from


def model_class(target: Any, logged: bool = False) -> type[nn.Module]:
    """The torch.nn.Module subclass a model's `_target_` names, or a one-line refusal.

    A logged config may come from a hostile store: the name may only ever resolve to an
    nn.Module class, never to a function (os.system) or any other callable, and no standard-
    library module is imported (some run code on import: `this`, `antigravity`).
    """
    where = f"model._target_={target}"
    if not isinstance(target, str) or not re.fullmatch(r"\w+(\.\w+)+", target):
        raise ModelConfigError(
            f"{where}: give the full import path of a torch.nn.Module class, e.g. mypkg.MyNet"
        )
    module_name, _, class_name = target.rpartition(".")
    parts = module_name.split(".")
    if parts[0] in sys.stdlib_module_names or "__main__" in parts:
        raise ModelConfigError(
            f"{where}: not a model; a model's _target_ names a torch.nn.Module class of your own "
            "or an installed package (nothing is imported from the standard library)"
        )
    trusted = {"cnnlab", *filter(None, os.environ.get(TRUSTED_MODULES, "").split(","))}
    if logged and parts[0] not in {t.strip() for t in trusted}:
        # Importing a module runs its top-level code: a store must not pick which one runs.
        raise ModelConfigError(
            f"{where}: named by a logged config, whose model modules cnnlab imports only from "
            f"packages you trust: export {TRUSTED_MODULES}={parts[0]} (comma-separated) and "
            "run again"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
            # A module the user's module imports is missing, not the user's module.
            raise ModelConfigError(f"{where}: importing {module_name} failed: {exc}") from exc
        raise ModelConfigError(
            f"{where}: cannot import {module_name} ({exc}); "
            "install it or put its folder on PYTHONPATH"
        ) from exc
    except Exception as exc:  # the user's module itself fails: its own words, in one line
        raise ModelConfigError(f"{where}: importing {module_name} failed: {one_line(exc)}") from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        classes = [n for n, v in vars(module).items() if isinstance(v, type)]
        guess = difflib.get_close_matches(class_name, classes, n=1)
        hint = f"; did you mean {module_name}.{guess[0]}?" if guess else ""
        raise ModelConfigError(f"{where}: {module_name} has no {class_name}{hint}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelConfigError(f"{where}: not a torch.nn.Module class (a model is one)")
    return cls


def build_network(
    model_cfg: Mapping[str, Any], in_shape: Sequence[int], num_classes: int
) -> nn.Module:
    """The network `model_cfg` describes: its `_target_` class called with the other keys, and
    with `in_shape` and `num_classes` where its constructor takes them."""
    if OmegaConf.is_config(model_cfg):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    arguments = dict(model_cfg)
    target = arguments.pop("_target_", None)
    cls = model_class(target)
    for key, value in arguments.items():
        # Hydra's instantiate would act on these (and build nested _target_s); cnnlab builds
        # exactly one class, the one the guard above let through.
        if key.startswith("_") and key.endswith("_") or _has_target(value):
            raise ModelConfigError(
                f"model.{key}: cnnlab builds only the model's own _target_ class; build "
                "sub-modules inside it and give it plain values"
            )
    parameters = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    data = {"in_shape": tuple(in_shape), "num_classes": num_classes}
    for key, value in data.items():
        if key in arguments:
            raise ModelConfigError(
                f"model.{key}: the data sets it ({value}); remove it from the model's config"
            )
    given = {k: v for k, v in data.items() if takes_any or k in parameters}
    try:
        return cls(**given, **arguments)
    except TypeError as exc:
        try:  # an argument the constructor does not take: the class's own words, one line
            inspect.signature(cls).bind(**given, **arguments)
        except TypeError:
            raise ModelConfigError(f"model._target_={target}: {one_line(exc)}") from exc
        raise  # a TypeError inside the constructor: the user's bug, with its traceback


def configured_network(cfg: Any, in_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The network a whole config describes: its model behind the data's normalisation (the
    first layer, so that a logged model takes [0, 1] images). Training and every reload of a
    logged model build it here, so they cannot drift apart."""
    network = build_network(cfg.model, in_shape, num_classes)
    pre = cfg.data.preprocess
    return with_normalization(network, pre.mean, pre.std, in_shape[0])


def _has_target(value: Any) -> bool:
    if isinstance(value, dict):
        return "_target_" in value or any(_has_target(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_target(v) for v in value)
    return False
