"""What a dataset is once decoded: a Split (images, labels) per part, and a validation split
held out of the training data."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cnnlab import CnnlabError


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


def with_classes(data: Dataset, num_classes: int | None, source: Path) -> Dataset:
    """`data`, once a configured data.num_classes is checked against the data's own classes."""
    if num_classes is None or num_classes == data.num_classes:
        return data
    top = max(top_label(data.train.labels), top_label(data.test.labels))
    fix = f"set data.num_classes={data.num_classes} (or null to take it from the data)"
    if top >= num_classes:
        raise DataError(
            f"{source}: label {top} is out of range for data.num_classes={num_classes}; {fix}"
        )
    raise DataError(
        f"data.num_classes={num_classes} but {source} has {data.num_classes} classes; {fix}"
    )


def top_label(labels: torch.Tensor) -> int:
    return int(labels.max()) if len(labels) else -1


def stratified_split(
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
