"""The epoch loop: batches, logged windows, evaluation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cnnlab.data.splits import Split
from cnnlab.models.networks import ConvNet
from cnnlab.training.loop import epoch_order, evaluate, train_one_epoch
from cnnlab.training.step import TrainStep, flat_parameters


def test_train_one_epoch_yields_window_means_at_batch_numbers():
    torch.manual_seed(0)
    data = Split(torch.rand(95, 1, 28, 28), torch.randint(0, 10, (95,)))
    model = ConvNet()
    reference = copy.deepcopy(model)  # trained below by a plain loop, batch by batch
    optimizer = torch.optim.SGD([flat_parameters(model)], lr=0.01)
    step = TrainStep(model, optimizer, data, batch_size=10)
    rng = torch.get_rng_state()
    logged = list(train_one_epoch(step, log_every=3))
    # 10 batches, the last one of 5 samples; the 10th alone is the last, partial window
    assert [batch for batch, _ in logged] == [3, 6, 9, 10]

    torch.set_rng_state(rng)  # the same epoch order again
    order = epoch_order(95)
    plain = torch.optim.SGD(reference.parameters(), lr=0.01)
    losses = []
    for start in range(0, 95, 10):
        idx = order[start : start + 10]
        plain.zero_grad()
        loss = F.cross_entropy(reference(data.images[idx]), data.labels[idx])
        loss.backward()
        plain.step()
        losses.append(loss.item())
    windows = [sum(losses[i : i + 3]) / 3 for i in (0, 3, 6)] + [losses[9]]
    assert [loss for _, loss in logged] == pytest.approx(windows, abs=1e-6)


def test_evaluate_counts_every_sample_once():
    model = ConvNet()
    data = Split(torch.rand(25, 1, 28, 28), torch.randint(0, 10, (25,)))
    loss, accuracy = evaluate(model, data, batch_size=7)
    with torch.no_grad():
        logits = model(data.images)
    assert loss == pytest.approx(F.cross_entropy(logits, data.labels).item(), rel=1e-5)
    assert accuracy == (logits.argmax(1) == data.labels).sum().item() / 25
