"""The article's network and training loop, as its script writes them: the oracle cnnlab is
checked against (tests/test_parity.py, tests/test_models.py) and timed against (cnnlab-bench).

Nothing here uses cnnlab's own model, data or step code, so a change there cannot make both
sides of a comparison wrong alike. The loop reads MNIST with torchvision's own dataset class
and ToTensor, imported when it runs (a second that only the oracle needs).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from cnnlab import CnnlabError


class ArticleConvNet(nn.Module):
    """The article's ConvNet, verbatim: Simple Convolutional Neural Network."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, 10, kernel_size=3),
            nn.ReLU(),
            nn.Conv2d(10, 5, kernel_size=3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(24 * 24 * 5, 64),
            nn.ReLU(),
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Linear(32, 10),
        )

    def forward(self, x):
        """Forward pass"""
        return self.layers(x)


def article_training(
    root: Path, batches: int, log_every: int, device: torch.device
) -> tuple[list[float], float]:
    """The article's __main__ loop for `batches` mini-batches (across epochs): (losses, seconds).

    Its statements, in its order, with four changes that leave every number alone: MNIST is read
    from `root` (not downloaded into the working directory), each mean loss is returned instead
    of printed, the epochs stop after `batches` mini-batches, and batches move to `device`.
    Seconds count from after the dataset is read, as cnnlab's side has its data in memory too.
    """
    try:
        from torchvision import transforms
        from torchvision.datasets import MNIST
    except ImportError as exc:
        raise CnnlabError("the article's loop needs torchvision: pip install torchvision") from exc
    torch.manual_seed(42)
    dataset = MNIST(str(root), download=False, transform=transforms.ToTensor())
    start = time.perf_counter()
    trainloader = torch.utils.data.DataLoader(dataset, batch_size=10, shuffle=True, num_workers=1)
    convnet = ArticleConvNet().to(device)
    loss_function = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(convnet.parameters(), lr=1e-4)
    losses, done = [], 0
    while done < batches:  # the article's `for epoch in range(0, 5)`, cut at `batches`
        current_loss = 0.0
        for i, data in enumerate(trainloader, 0):
            inputs, targets = data
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad()
            outputs = convnet(inputs)
            loss = loss_function(outputs, targets)
            loss.backward()
            optimizer.step()
            current_loss += loss.item()
            if i % log_every == log_every - 1:
                losses.append(current_loss / log_every)
                current_loss = 0.0
            done += 1
            if done == batches:
                break
    return losses, time.perf_counter() - start
