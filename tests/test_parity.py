"""cnnlab's defaults reproduce the article's script: same batches, same losses."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import MNIST

from cnnlab.train import train


class ArticleConvNet(nn.Module):
    """The article's ConvNet, verbatim."""

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
        return self.layers(x)


def article_losses(root, epochs: int, log_every: int) -> list[float]:
    """The article's __main__ block with its print turned into a list (and a smaller window)."""
    torch.manual_seed(42)
    dataset = MNIST(str(root), download=False, transform=transforms.ToTensor())
    trainloader = DataLoader(dataset, batch_size=10, shuffle=True, num_workers=1)
    convnet = ArticleConvNet()
    loss_function = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(convnet.parameters(), lr=1e-4)
    losses = []
    for _epoch in range(0, epochs):
        current_loss = 0.0
        for i, data in enumerate(trainloader, 0):
            inputs, targets = data
            optimizer.zero_grad()
            outputs = convnet(inputs)
            loss = loss_function(outputs, targets)
            loss.backward()
            optimizer.step()
            current_loss += loss.item()
            if i % log_every == log_every - 1:
                losses.append(current_loss / log_every)
                current_loss = 0.0
    return losses


def test_default_config_logs_the_articles_losses(compose_cfg, tiny_data, tiny_overrides):
    root, _ = tiny_data
    expected = article_losses(root, epochs=2, log_every=20)

    cfg = compose_cfg([*tiny_overrides, "train.epochs=2", "tracking.log_model=false"])
    assert (cfg.train.batch_size, cfg.train.seed, cfg.optimizer.lr) == (10, 42, 1e-4)
    train(cfg)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])[0]
    logged = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert len(logged) == len(expected) == 2 * 600 // 10 // 20
    for ours, theirs in zip(logged, expected, strict=True):
        assert abs(ours - theirs) < 1e-6, (logged, expected)
    assert expected[-1] < expected[0]  # the synthetic task is learnable: losses really moved
