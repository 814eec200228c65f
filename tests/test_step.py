"""The training step's fast paths change no number, and its CUDA-graph set-up leaves no trace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from cnnlab import CnnlabError
from cnnlab.data.splits import Split
from cnnlab.models.networks import ConvNet
from cnnlab.training.step import TrainStep, flat_parameters, optimizer_step, rehearsal

OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adam-l2": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
}


@pytest.fixture
def data() -> Split:
    generator = torch.Generator().manual_seed(1)
    return Split(torch.rand(400, 1, 28, 28, generator=generator), torch.randint(0, 10, (400,)))


def plain_training(data: Split, make_optimizer) -> list[torch.Tensor]:
    """The article's way: per-tensor parameters, grads set to None, optimizer.step()."""
    torch.manual_seed(0)
    model = ConvNet()
    optimizer = make_optimizer(model.parameters())
    for s in range(0, len(data), 10):
        optimizer.zero_grad()
        F.cross_entropy(model(data.images[s : s + 10]), data.labels[s : s + 10]).backward()
        optimizer.step()
    return [p.detach() for p in model.parameters()]


def fast_training(data: Split, make_optimizer, steps: int = 40, rehearse_at: int = -1):
    """cnnlab's TrainStep on a flat buffer; optionally some steps rehearsed (and undone) first."""
    torch.manual_seed(0)
    model = ConvNet()
    optimizer = make_optimizer([flat_parameters(model)])
    step = TrainStep(model, optimizer, data, batch_size=10)
    for i in range(steps):
        if i == rehearse_at:
            with rehearsal(optimizer, step.loss_sum):
                for s in (200, 300, 100):
                    step(torch.arange(s, s + 10))
        step(torch.arange(i * 10, i * 10 + 10))
    return model, optimizer, step


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_train_step_trains_bit_identically_to_the_plain_loop(data, name):
    model, optimizer, _ = fast_training(data, OPTIMIZERS[name])
    for plain, fast in zip(plain_training(data, OPTIMIZERS[name]), model.parameters(), strict=True):
        assert torch.equal(plain, fast)


def count_torch_steps(optimizer: torch.optim.Optimizer) -> list[int]:
    calls: list[int] = []
    torch_step = optimizer.step
    optimizer.step = lambda: calls.append(1) or torch_step()
    return calls


@pytest.mark.parametrize("name", ["adam", "adam-l2", "adamw"])
def test_adam_takes_the_lean_step_after_the_first(data, name):
    model = ConvNet()
    optimizer = OPTIMIZERS[name]([flat_parameters(model)])
    calls = count_torch_steps(optimizer)
    step = TrainStep(model, optimizer, data, batch_size=10)
    for i in range(5):
        step(torch.arange(i * 10, i * 10 + 10))
    assert len(calls) == 1  # torch's step only creates the state


@pytest.mark.parametrize(
    "register",
    [
        lambda opt, hook: opt.register_step_pre_hook(hook),
        lambda opt, hook: opt.register_step_post_hook(hook),
        # Global hooks live in torch's private registries, which the lean step reads by name:
        # these two fail if a torch upgrade renames them.
        lambda opt, hook: register_optimizer_step_pre_hook(hook),
        lambda opt, hook: register_optimizer_step_post_hook(hook),
    ],
    ids=["pre", "post", "global-pre", "global-post"],
)
def test_lean_step_runs_step_hooks(data, register):
    model = ConvNet()
    optimizer = OPTIMIZERS["adam"]([flat_parameters(model)])
    hooked: list[int] = []
    handle = register(optimizer, lambda *_: hooked.append(1))
    try:
        step = TrainStep(model, optimizer, data, batch_size=10)
        for i in range(3):
            step(torch.arange(i * 10, i * 10 + 10))
    finally:
        handle.remove()
    assert len(hooked) == 3


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.Adam(p, lr=1e-3),
        lambda p: torch.optim.Adam(p, lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.5, 0.9), weight_decay=0.3),
    ],
    ids=["adam", "adam-l2", "adamw"],
)
def test_lean_adam_is_the_installed_torchs_adam_bit_for_bit(make):
    # _adam_step copies torch's _single_tensor_adam. If a torch upgrade changes that function's
    # arithmetic, this fails, instead of cnnlab's results silently drifting from torch's: then
    # update _adam_step to the new arithmetic, or drop it for optimizer.step.
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(5000, generator=generator)
    ours, theirs = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    lean, torch_adam = make([ours]), make([theirs])
    calls = count_torch_steps(lean)
    lean_step = optimizer_step(lean)
    for _ in range(30):
        grad = torch.randn(5000, generator=generator)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        lean_step()
        torch_adam.step()
    assert len(calls) == 1, "the lean step did not run: the test would compare torch with itself"
    assert torch.equal(ours, theirs), (
        f"torch {torch.__version__}'s Adam no longer matches cnnlab.training.step._adam_step "
        "bit for bit"
    )
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(lean.state[ours][key], torch_adam.state[theirs][key]), key


def test_lean_step_honours_flags_set_after_it_was_built(data):
    def after_switch(model, optimizer, train_on):
        for i in range(4):
            if i == 2:
                optimizer.param_groups[0]["maximize"] = True  # a flag it does not replicate
            train_on(torch.arange(i * 10, i * 10 + 10))
        return list(model.parameters())

    torch.manual_seed(0)
    model = ConvNet()
    optimizer = OPTIMIZERS["adam"]([flat_parameters(model)])
    ours = after_switch(model, optimizer, TrainStep(model, optimizer, data, batch_size=10))

    torch.manual_seed(0)
    ref = ConvNet()
    ref_optimizer = OPTIMIZERS["adam"](ref.parameters())

    def plain(idx):
        ref_optimizer.zero_grad()
        F.cross_entropy(ref(data.images[idx]), data.labels[idx]).backward()
        ref_optimizer.step()

    for a, b in zip(ours, after_switch(ref, ref_optimizer, plain), strict=True):
        assert torch.equal(a, b)


def test_lean_adam_state_is_torchs(data):
    """A checkpoint of the lean step loads into, and continues as, torch's own Adam."""
    _, fast, _ = fast_training(data, OPTIMIZERS["adam"], steps=12)
    torch.manual_seed(0)
    model = ConvNet()
    plain = torch.optim.Adam([flat_parameters(model)], lr=1e-3)
    for i in range(12):
        plain.zero_grad(set_to_none=False)
        images, labels = data.images[i * 10 : i * 10 + 10], data.labels[i * 10 : i * 10 + 10]
        F.cross_entropy(model(images), labels).backward()
        plain.step()
    ours, theirs = fast.state_dict(), plain.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(ours["state"][0][key], theirs["state"][0][key])


@pytest.mark.parametrize("name", ["adam", "sgd"])
@pytest.mark.parametrize("rehearse_at", [0, 5])  # before the optimizer has state, and after
def test_rehearsed_steps_leave_no_trace(data, name, rehearse_at):
    model, optimizer, step = fast_training(data, OPTIMIZERS[name], rehearse_at=rehearse_at)
    ref_model, ref_optimizer, ref_step = fast_training(data, OPTIMIZERS[name])
    assert torch.equal(step.loss_sum, ref_step.loss_sum)
    for ours, theirs in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(ours, theirs)
    for key, value in ref_optimizer.state_dict()["state"][0].items():
        assert torch.equal(optimizer.state_dict()["state"][0][key], value)


def test_a_graphed_runs_checkpoint_continues_eagerly(data):
    model, optimizer, _ = fast_training(data, OPTIMIZERS["adam"], steps=3)
    saved = optimizer.state_dict()
    saved["param_groups"][0]["capturable"] = True  # as a run with hardware.cuda_graphs saves it
    optimizer.load_state_dict(saved)
    TrainStep(model, optimizer, data, batch_size=10)(torch.arange(30, 40))
    uninterrupted, _, _ = fast_training(data, OPTIMIZERS["adam"], steps=4)
    for ours, theirs in zip(model.parameters(), uninterrupted.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_cuda_graphs_need_a_cuda_device(data):
    model = ConvNet()
    optimizer = torch.optim.Adam([flat_parameters(model)])
    with pytest.raises(CnnlabError, match="hardware=cuda"):
        TrainStep(model, optimizer, data, batch_size=10, cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_trains_like_the_eager_step(data):
    gpu = Split(data.images[:95].cuda(), data.labels[:95].cuda())  # the 10th batch has 5 samples

    def losses(cuda_graph: bool) -> list[float]:
        torch.manual_seed(0)
        model = ConvNet().cuda()
        optimizer = torch.optim.Adam([flat_parameters(model)], lr=1e-3)
        step = TrainStep(model, optimizer, gpu, batch_size=10, cuda_graph=cuda_graph)
        out = []
        for _ in range(2):  # two epochs: the graph is replayed across them
            for start in range(0, 95, 10):
                step(torch.arange(start, min(start + 10, 95), device="cuda"))
                out.append(step.loss_sum.item())
                step.loss_sum.zero_()
        return out

    eager, graphed = losses(False), losses(True)
    assert graphed == pytest.approx(eager, rel=1e-4)  # the warm-up trained nothing extra


def test_a_rehearsal_leaves_batchnorm_statistics_as_they_were(data):
    # The CUDA graph's warm-up steps run inside a rehearsal: a ResNet's running mean/var must
    # come out as if they had never run, or a graphed run would score differently.
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
        torch.nn.Linear(4 * 26 * 26, 10),
    )  # fmt: skip
    optimizer = torch.optim.Adam([flat_parameters(model)], lr=1e-3)
    step = TrainStep(model, optimizer, data, batch_size=10)
    step(torch.arange(0, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with rehearsal(optimizer, step.loss_sum, model):
        for s in (200, 300, 100):
            step(torch.arange(s, s + 10))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
