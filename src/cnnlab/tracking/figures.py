"""Figures a run logs for the MLflow UI to preview: what the trained model gets wrong on the
test split, and for a sweep, how its result depends on each swept key.

matplotlib's object API only (`Figure`, no pyplot): nothing global, no window, no backend to
choose, so a figure drawn in a sweep's worker process or thread touches nobody else's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from cnnlab import finite_float

GRID = 5  # misclassified.png shows up to GRID x GRID images
ANNOTATE_UP_TO = 20  # classes: above this the confusion matrix has no numbers in its cells


def confusion(labels: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> np.ndarray:
    """counts[true, predicted] over the split."""
    flat = labels.long().cpu() * num_classes + predicted.long().cpu()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes).numpy()


def _short(name: str, width: int = 14) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def confusion_figure(counts: np.ndarray, classes: Sequence[str]) -> Figure:
    """The confusion matrix as a heat map, each row normalised to the true class's samples."""
    k = len(classes)
    size = min(4 + 0.45 * k, 16)
    fig = Figure(figsize=(size + 1.5, size), layout="constrained")
    ax = fig.add_subplot()
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class")
    ticks = range(k) if k <= ANNOTATE_UP_TO else range(0, k, max(1, k // 20))
    names = [_short(classes[i]) for i in ticks]
    ax.set_xticks(list(ticks), names, rotation=90 if k > 10 else 0)
    ax.set_yticks(list(ticks), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix on the test split ({counts.sum()} images)")
    if k <= ANNOTATE_UP_TO:
        for (t, p), n in np.ndenumerate(counts):
            if n:
                ax.text(p, t, str(n), ha="center", va="center", fontsize=7,
                        color="white" if rates[t, p] > 0.5 else "black")  # fmt: skip
    return fig


def per_class_figure(counts: np.ndarray, classes: Sequence[str]) -> Figure:
    """Accuracy of each true class, worst classes easy to spot against the overall accuracy."""
    k = len(classes)
    totals = counts.sum(axis=1)
    accuracy = np.divide(np.diag(counts), totals, out=np.zeros(k), where=totals > 0)
    overall = np.trace(counts) / max(counts.sum(), 1)
    fig = Figure(figsize=(min(4 + 0.35 * k, 20), 4), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(range(k), accuracy, color=["#d62728" if a < overall else "#1f77b4" for a in accuracy])
    ax.axhline(overall, color="black", linestyle="--", linewidth=1,
               label=f"overall {overall:.2%}")  # fmt: skip
    ax.set_xticks(range(k), [_short(c) for c in classes], rotation=90 if k > 10 else 0)
    ax.set_ylim(max(0.0, min(accuracy.min(), overall) - 0.05), 1.0)
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy per true class (red: below overall)")
    ax.legend(loc="lower right")
    return fig


def misclassified_figure(
    images: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor, classes: Sequence[str]
) -> Figure:
    """The first GRID x GRID misclassified test images, each captioned true -> predicted."""
    wrong = torch.nonzero(predicted.cpu() != labels.cpu()).flatten()[: GRID * GRID]
    fig = Figure(figsize=(2 * GRID, 2.2 * GRID), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(f"Misclassified test images: {len(wrong)} shown, true -> predicted")
    ax.axis("off")
    if not len(wrong):
        return fig
    # One mosaic and one imshow, not GRID x GRID axes: a third of the time to draw.
    shown = images[wrong].cpu()  # (N, C, H, W): uint8, or float in [0, 1] (held on the device)
    if shown.dtype != torch.uint8:
        shown = (shown * 255).round().clamp(0, 255).to(torch.uint8)
    shown = shown[:, :3] if shown.shape[1] >= 3 else shown[:, :1].expand(-1, 3, -1, -1)
    n, _, h, w = shown.shape
    gap, caption = max(2, w // 10), max(8, h // 3)  # pixels between tiles, above each for text
    cell_h, cell_w = h + caption, w + gap
    mosaic = np.full((GRID * cell_h, GRID * cell_w, 3), 255, dtype=np.uint8)
    for slot in range(n):
        row, col = divmod(slot, GRID)
        top, left = row * cell_h + caption, col * cell_w
        mosaic[top : top + h, left : left + w] = shown[slot].permute(1, 2, 0).numpy()
    ax.imshow(mosaic, interpolation="nearest")
    for slot, index in enumerate(wrong.tolist()):
        row, col = divmod(slot, GRID)
        true, guess = int(labels[index]), int(predicted[index])
        ax.text(col * cell_w + w / 2, row * cell_h + caption - 1, f"{_short(classes[true], 10)} -> "
                f"{_short(classes[guess], 10)}", ha="center", va="bottom", fontsize=8)  # fmt: skip
    return fig


def prediction_figures(
    images: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor, classes: Sequence[str]
) -> dict[str, Figure]:
    """{artifact file: figure} of a model's predictions on the test split."""
    counts = confusion(labels, predicted, len(classes))
    return {
        "figures/confusion_matrix.png": confusion_figure(counts, classes),
        "figures/per_class_accuracy.png": per_class_figure(counts, classes),
        "figures/misclassified.png": misclassified_figure(images, labels, predicted, classes),
    }


def sweep_figure(key: str, points: Sequence[tuple[Any, float]], metric: str) -> Figure:
    """`metric` of each finished job against its value of the swept `key`: a scatter over a
    numeric key (log scale when it spans a decade or more), a strip per value otherwise."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    numbers = [finite_float(v) for v, _ in points]
    if all(n is not None for n in numbers):
        ax.scatter(numbers, [m for _, m in points])
        positive = [n for n in numbers if n > 0]
        if len(positive) == len(numbers) and max(positive) >= 10 * min(positive):
            ax.set_xscale("log")
    else:
        values = sorted({str(v) for v, _ in points})
        ax.scatter([values.index(str(v)) for v, _ in points], [m for _, m in points])
        ax.set_xticks(range(len(values)), values)
    best = max(points, key=lambda p: p[1])
    ax.set_title(f"{metric} by {key} (best {best[1]:.4f} at {best[0]})")
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    return fig


def sweep_figures(
    children: Sequence[Mapping[str, Any]], swept: Sequence[str], metric: str
) -> dict[str, Figure]:
    """{artifact file: figure}: `metric` against each swept key, over the children that
    finished with it (none if fewer than two did): a pruned or failed run's last value is not
    its final one."""
    done = [
        c for c in children
        if c["status"] == "FINISHED" and finite_float(c["metrics"].get(metric)) is not None
    ]  # fmt: skip
    if len(done) < 2:
        return {}
    return {
        f"figures/sweep_{key.replace('/', '_')}.png": sweep_figure(
            key,
            [(c["values"].get(key, c["params"].get(key)), c["metrics"][metric]) for c in done],
            metric,  # fmt: skip
        )
        for key in swept
    }
