"""Classifiers. Constructor keywords are the keys of conf/model/*.yaml; the data decides
`in_shape` and `num_classes`, which train.py passes in."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from cnnlab import CnnlabError


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
