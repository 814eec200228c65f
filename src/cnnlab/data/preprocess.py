"""Stored images to a model's input, on the device, a whole batch at a time.

Datasets are decoded and cached as uint8 (N, C, H, W). On the training device a split whose
float32 copy fits FLOAT_BUDGET is converted once (MNIST, CIFAR: no per-step cost); a bigger one
(an image folder of large images) stays uint8, a quarter of the memory, and each mini-batch is
converted as it is used. Either way it is the article's ToTensor (x / 255), the same bits.

- Augmentation (`data.preprocess.crop_padding`, `flip`) is training-only: each sample's crop
  offset and flip are drawn for the whole epoch right after its order, from the same global RNG,
  so an epoch resumed mid-way (which re-draws its order) re-draws the same augmentations too.
- Normalisation (`mean`, `std`) is the model's first layer (`Normalized`), so the logged model
  takes [0, 1] images like every other: cnnlab-predict and cnnlab-eval need no data config.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab import CnnlabError
from cnnlab.data.splits import Split

FLOAT_BUDGET = 2 * 2**30  # bytes of float32 pixels a split may take on the device


def on_device(split: Split, device: torch.device, budget: int = FLOAT_BUDGET) -> Split:
    """`split` on `device`, its images converted to float once where that copy fits `budget`."""
    split = split.to(device)  # uint8 crosses to a GPU: a quarter of the bytes
    if split.images.numel() * 4 <= budget:
        split = Split(to_float(split.images), split.labels)
    return split


def to_float(images: Tensor) -> Tensor:
    """uint8 images -> float32 in [0, 1]; float images (already converted) pass through."""
    if images.is_floating_point():
        return images
    return images.float().div_(255)


class Augment:
    """Random crop (zero padding, then a crop back to size) and horizontal flip, per sample.

    `new_epoch()` draws every sample's offsets and flip for the coming epoch; `apply(images,
    idx)` transforms the uint8 batch `images` of samples `idx` with them. The drawn tensors keep
    their storage across epochs (a captured CUDA graph reads them).
    """

    def __init__(self, n: int, crop_padding: int, flip: bool, device: torch.device) -> None:
        self.n, self.padding, self.flip = n, crop_padding, flip
        # offsets[i] = (dy, dx) in [0, 2 * padding]; padding, padding is the unshifted image.
        self.offsets = torch.full((n, 2), crop_padding, dtype=torch.int64, device=device)
        self.flips = torch.zeros(n, dtype=torch.bool, device=device)

    @property
    def active(self) -> bool:
        """Whether there is anything to apply."""
        return self.padding > 0 or self.flip

    def new_epoch(self) -> None:
        """Draw this epoch's augmentations from the global (CPU) RNG; nothing when inactive."""
        if self.padding > 0:
            self.offsets.copy_(torch.randint(0, 2 * self.padding + 1, (self.n, 2)))
        if self.flip:
            self.flips.copy_(torch.rand(self.n) < 0.5)

    def apply(self, images: Tensor, idx: Tensor) -> Tensor:
        """The batch `images` (B, C, H, W) of samples `idx`, cropped and flipped as drawn."""
        if self.padding > 0:
            images = _shifted_crops(images, self.offsets.index_select(0, idx), self.padding)
        if self.flip:
            flip = self.flips.index_select(0, idx).view(-1, 1, 1, 1)
            images = torch.where(flip, images.flip(3), images)
        return images


def _shifted_crops(images: Tensor, offsets: Tensor, padding: int) -> Tensor:
    # Pad each side with zeros, then take each sample's own H x W window at (dy, dx): one gather
    # for the whole batch, no per-sample Python.
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = offsets[:, 0:1] + torch.arange(h, device=images.device)  # (B, H)
    cols = offsets[:, 1:2] + torch.arange(w, device=images.device)  # (B, W)
    batch = torch.arange(b, device=images.device).view(b, 1, 1, 1)
    channel = torch.arange(c, device=images.device).view(1, c, 1, 1)
    return padded[batch, channel, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


class Normalized(nn.Module):
    """`net` behind a per-channel normalisation: ((x - mean) / std), x in [0, 1]."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        # Buffers, so a checkpoint and the logged model carry them with the weights.
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1))
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> the network's logits."""
        return self.net((x - self.mean) / self.std)


def with_normalization(
    net: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None, channels: int
) -> nn.Module:
    """`net` itself without a configured normalisation, else `Normalized(net, mean, std)`,
    which needs one mean and one std per channel of the images."""
    if mean is None and std is None:
        return net  # the article's model: its state_dict keys stay those of the bare network
    for key, values in (("mean", mean), ("std", std)):
        if values is None or len(values) != channels:
            raise CnnlabError(
                f"data.preprocess.{key} has {len(values or [])} value(s) but the images have "
                f"{channels} channel(s): give one per channel"
            )
    return Normalized(net, mean, std)
