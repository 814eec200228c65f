"""cnnlab-bench's article section: the article's own training loop against cnnlab's default
loop on the same mini-batches, in samples/s, and how far apart their losses are."""

from __future__ import annotations

from collections.abc import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from cnnlab.bench.harness import Rounds, alternate, cnnlab_training
from cnnlab.config.compose import launch_path
from cnnlab.data.splits import Dataset
from cnnlab.models.article import article_training

Losses = dict[str, list[float]]  # each side's mean losses of its last round


def section_article(cfg: DictConfig, data: Dataset, device: torch.device) -> list[str]:
    """Samples/s of the article's loop against cnnlab's default loop, same batches.

    On a GPU a third side replays cnnlab's step as a CUDA graph (hardware.cuda_graphs=true).
    Both sides average the loss every train.log_every batches (the article's 500 by default).
    """
    log_every = cfg.train.log_every
    batches = cfg.bench.batches - cfg.bench.batches % log_every or log_every
    root = launch_path(cfg.data.root)
    runs = {
        "article": lambda: article_training(root, batches, log_every, device),
        "cnnlab": lambda: cnnlab_training(cfg, data, batches, device),
    }
    if device.type == "cuda" and not cfg.hardware.cuda_graphs:
        graphed = OmegaConf.merge(cfg, {"hardware": {"cuda_graphs": True}})
        runs["cnnlab + CUDA graph"] = lambda: cnnlab_training(graphed, data, batches, device)
    seen: Losses = {}
    sides = {name: samples_per_second(name, run, batches, seen) for name, run in runs.items()}
    rounds = alternate(cfg.bench.rounds, sides)
    return article_lines(rounds, seen, batches, log_every, 5 * len(data.train), device)


def samples_per_second(
    name: str, run: Callable[[], tuple[list[float], float]], batches: int, seen: Losses
) -> Callable[[], float]:
    """A side of the comparison: `run`'s samples/s (mini-batches of 10); its losses kept in
    `seen`[name]."""

    def measure() -> float:
        losses, seconds = run()
        seen[name] = losses
        return batches * 10 / seconds

    return measure


def article_lines(
    rounds: Rounds, seen: Losses, batches: int, log_every: int, epochs_5: int, device: torch.device
) -> list[str]:
    """The section's lines; `epochs_5`: the samples of the article's whole run (5 epochs)."""
    lines = [
        f"article loop vs cnnlab default ({batches} mini-batches of 10, {device}):",
        f"  {'article':20s} {rounds.median('article'):9.0f} samples/s"
        f"   article's 5 epochs {epochs_5 / rounds.median('article'):7.1f} s",
    ]
    for name in list(rounds)[1:]:
        diff = max(abs(a - b) for a, b in zip(seen["article"], seen[name], strict=True))
        lines += [
            f"  {name:20s} {rounds.median(name):9.0f} samples/s   article's 5 epochs "
            f"{epochs_5 / rounds.median(name):7.1f} s   ratio {rounds.ratio(name, 'article'):.2f}x",
            f"  {'':20s} losses every {log_every} batches: max |difference| {diff:.2e} "
            f"over {len(seen[name])} values",
        ]
    return lines
