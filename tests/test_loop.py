"""The epoch loop: batches, logged windows, evaluation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cnnlab.data import Split
from cnnlab.loop import evaluate, train_one_epoch
from cnnlab.models import ConvNet
from cnnlab.step import TrainStep, flat_parameters


def test_train_one_epoch_yields_window_means_at_batch_numbers():
    torch.manual_seed(0)
    data = Split(torch.rand(95, 1, 28, 28), torch.randint(0, 10, (95,)))
    model = ConvNet()
    optimizer = torch.optim.SGD([flat_parameters(model)], lr=0.01)
    step = TrainStep(model, optimizer, data, batch_size=10)
    logged = list(train_one_epoch(step, log_every=3))
    assert [batch for batch, _ in logged] == [3, 6, 9]  # 10 batches, the last one of 5 samples
    assert all(1.5 < loss < 3.5 for _, loss in logged)  # ~ln(10) at the start


def test_evaluate_counts_every_sample_once():
    model = ConvNet()
    data = Split(torch.rand(25, 1, 28, 28), torch.randint(0, 10, (25,)))
    loss, accuracy = evaluate(model, data, batch_size=7)
    with torch.no_grad():
        logits = model(data.images)
    assert loss == pytest.approx(F.cross_entropy(logits, data.labels).item(), rel=1e-5)
    assert accuracy == (logits.argmax(1) == data.labels).sum().item() / 25
