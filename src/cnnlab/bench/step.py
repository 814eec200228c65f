"""cnnlab-bench's step section: the article's training step as each of cnnlab's fast paths is
added, and torch's own Adam fast paths; steps/s, and whether the weights stay the article's."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from cnnlab.bench.harness import Rounds, alternate, synchronize
from cnnlab.data.preprocess import to_float
from cnnlab.data.splits import Dataset
from cnnlab.models import article as reference
from cnnlab.models.networks import ConvNet
from cnnlab.training.step import flat_parameters, optimizer_step

BASE = "article's step"
VARIANTS = [  # name, network, flat parameter, Adam's fast-path flags, cnnlab's lean update
    (BASE, reference.ArticleConvNet, False, {}, False),
    ("+ in-place ReLU", ConvNet, False, {}, False),
    ("+ flat parameter", ConvNet, True, {}, False),
    ("+ lean Adam (cnnlab)", ConvNet, True, {}, True),
    ("flat, foreach=True", ConvNet, True, {"foreach": True}, False),
    ("flat, fused=True", ConvNet, True, {"fused": True}, False),
]


def section_step(cfg: DictConfig, data: Dataset, device: torch.device) -> list[str]:
    """Steps/s of the article's training step as each of cnnlab's fast paths is added, and of
    torch's own Adam fast paths; for each, whether the weights stay the article's bit for bit.

    Every side trains the article's network with Adam 1e-4 on the same batches from the same
    seed, in the same plain loop, so only the model and the optimizer differ.
    """
    batch, steps = cfg.train.batch_size, cfg.bench.batches
    images, labels = to_float(data.train.images.to(device)), data.train.labels.to(device)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0)).to(device)
    weights: dict[str, list[torch.Tensor]] = {}

    def side(name: str, network: type, flat: bool, adam: dict, lean: bool) -> Callable[[], float]:
        def measure() -> float:
            torch.manual_seed(cfg.train.seed)
            model = network().to(device)
            params = [flat_parameters(model)] if flat else model.parameters()
            optimizer = torch.optim.Adam(params, lr=1e-4, **adam)
            update = optimizer_step(optimizer) if lean else optimizer.step
            synchronize(device)
            start = time.perf_counter()
            for i in range(steps):
                idx = order[(i * batch) % (len(order) - batch + 1) :][:batch]
                optimizer.zero_grad(set_to_none=not flat)  # flat: grads must stay views
                F.cross_entropy(model(images[idx]), labels[idx]).backward()
                update()
            synchronize(device)
            seconds = time.perf_counter() - start
            weights[name] = [p.detach().clone() for p in model.parameters()]
            return steps / seconds

        return measure

    rounds = alternate(cfg.bench.rounds, {name: side(name, *how) for name, *how in VARIANTS})
    header = f"Training step, article's network and Adam, batch {batch}, {steps} steps, {device}:"
    return [header, *step_lines(rounds, weights)]


def step_lines(rounds: Rounds, weights: dict[str, list[torch.Tensor]]) -> list[str]:
    """Each variant's steps/s, its ratio to the article's, and how far its weights moved."""
    lines = []
    for name, *_ in VARIANTS:
        diff = max(
            (a - b).abs().max().item() for a, b in zip(weights[name], weights[BASE], strict=True)
        )
        same = "bit-identical" if diff == 0 else f"max |difference| {diff:.1e}"
        lines.append(
            f"  {name:22s} {rounds.median(name):7.0f} steps/s  "
            f"{rounds.ratio(name, BASE):5.2f}x   weights vs the article's: {same}"
        )
    return lines
