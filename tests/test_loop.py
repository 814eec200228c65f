"""The training loop's fast paths change no number."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cnnlab.data import Split
from cnnlab.loop import evaluate, flat_parameters, train_one_epoch
from cnnlab.models import ConvNet


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.Adam(p, lr=1e-3),
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    ],
)
def test_flat_parameters_train_bit_identically(make_optimizer):
    x, y = torch.rand(400, 1, 28, 28), torch.randint(0, 10, (400,))

    def weights_after(flat: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = ConvNet()
        optimizer = make_optimizer([flat_parameters(model)] if flat else model.parameters())
        for s in range(0, 400, 10):
            optimizer.zero_grad(set_to_none=not flat)
            F.cross_entropy(model(x[s : s + 10]), y[s : s + 10]).backward()
            optimizer.step()
        return [p.detach() for p in model.parameters()]

    for plain, flat in zip(weights_after(False), weights_after(True), strict=True):
        assert torch.equal(plain, flat)


def test_train_one_epoch_yields_window_means_at_batch_numbers():
    torch.manual_seed(0)
    data = Split(torch.rand(95, 1, 28, 28), torch.randint(0, 10, (95,)))
    model = ConvNet()
    optimizer = torch.optim.SGD([flat_parameters(model)], lr=0.01)
    logged = list(train_one_epoch(model, optimizer, data, batch_size=10, log_every=3))
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
