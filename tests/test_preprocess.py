"""Preprocessing on the device: uint8 batches to [0, 1], per-sample crops and flips drawn per
epoch (so a resumed epoch trains the same batches), normalisation inside the logged model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cnnlab.data.preprocess import Augment, Normalized, on_device, to_float
from cnnlab.data.splits import Split
from cnnlab.models.networks import ConvNet
from cnnlab.training.loop import TrainingInterrupted, train_one_epoch
from cnnlab.training.step import TrainStep, flat_parameters
from helpers import Store, cnnlab, one_error_line


def uint8_split(n: int, channels: int = 1, side: int = 12, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, side, side), dtype=torch.uint8, generator=g)
    return Split(images, torch.randint(0, 10, (n,), generator=g))


def test_to_float_is_totensor_on_a_batch():
    images = uint8_split(4).images
    assert torch.equal(to_float(images), images.float() / 255)  # the article's ToTensor
    floats = torch.rand(2, 1, 3, 3)
    assert to_float(floats) is floats


def test_each_sample_gets_its_own_crop_and_flip():
    data = uint8_split(64, channels=3, side=8)
    augment = Augment(64, crop_padding=2, flip=True, device=torch.device("cpu"))
    torch.manual_seed(0)
    augment.new_epoch()
    idx = torch.tensor([5, 0, 63, 17])
    out = augment.apply(data.images.index_select(0, idx), idx)
    assert out.dtype == torch.uint8 and out.shape == (4, 3, 8, 8)
    for row, i in enumerate(idx.tolist()):  # the obvious per-image version, one at a time
        dy, dx = augment.offsets[i].tolist()
        assert 0 <= dy <= 4 and 0 <= dx <= 4
        expected = F.pad(data.images[i], (2, 2, 2, 2))[:, dy : dy + 8, dx : dx + 8]
        if augment.flips[i]:
            expected = expected.flip(2)
        assert torch.equal(out[row], expected)
    # Over 64 samples both flips and several offsets occur: the draws are per sample.
    assert 0 < int(augment.flips.sum()) < 64 and len(augment.offsets.unique(dim=0)) > 4


def test_augmentations_follow_the_rng_like_the_order():
    augment = Augment(50, crop_padding=3, flip=True, device=torch.device("cpu"))
    torch.manual_seed(7)
    augment.new_epoch()
    first = augment.offsets.clone(), augment.flips.clone()
    torch.manual_seed(7)
    augment.new_epoch()
    assert torch.equal(augment.offsets, first[0]) and torch.equal(augment.flips, first[1])
    augment.new_epoch()
    assert not torch.equal(augment.offsets, first[0])


def augmented_step(data: Split, trained: TrainStep | None = None) -> TrainStep:
    """A batch-8 step with crop and flip: of a new small ConvNet, or of `trained`'s model and
    optimizer (as a resumed process builds it: new step, new augmentations)."""
    if trained is None:
        torch.manual_seed(3)
        model = ConvNet(in_shape=(1, 12, 12), num_classes=10, conv_channels=[4], hidden=[16])
        optimizer = torch.optim.Adam([flat_parameters(model)], lr=1e-2)
    else:
        model, optimizer = trained.model, trained.optimizer
    augment = Augment(len(data), crop_padding=2, flip=True, device=torch.device("cpu"))
    return TrainStep(model, optimizer, data, 8, augment=augment)


def _trained(data: Split, stop_after: int | None) -> list[torch.Tensor]:
    """One augmented epoch of batch 8; with stop_after, stopped there and resumed."""
    step = augmented_step(data)
    torch.manual_seed(11)
    losses = []
    calls = iter(range(10**6))
    stop = (lambda: next(calls) + 1 == stop_after) if stop_after else (lambda: False)
    try:
        for _, loss in train_one_epoch(step, 2, stop=stop):
            losses.append(loss)  # one by one: those before the stop count too
    except TrainingInterrupted as stopped:
        batch, running, rng = stopped.args_for_resume()
        torch.manual_seed(999)  # whatever the RNG did since, the epoch's own state comes back
        torch.set_rng_state(rng)
        # A new process: a new step and new augmentations, which must be drawn again alike.
        step = augmented_step(data, step)
        losses += [loss for _, loss in train_one_epoch(step, 2, False, batch, running)]
    return [*losses, *[p.detach().clone() for p in step.model.parameters()]]


def test_an_augmented_epoch_resumed_mid_way_trains_the_same_batches():
    data = uint8_split(80)
    unbroken, resumed = _trained(data, None), _trained(data, stop_after=5)
    assert len(unbroken) == len(resumed)
    assert all(
        torch.equal(torch.as_tensor(a), torch.as_tensor(b))
        for a, b in zip(unbroken, resumed, strict=True)
    )


def test_normalization_is_the_models_first_layer():
    net = ConvNet(in_shape=(3, 12, 12), num_classes=10, conv_channels=[4], hidden=[16])
    model = Normalized(net, [0.5, 0.4, 0.3], [0.2, 0.25, 0.5])
    x = torch.rand(2, 3, 12, 12)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    assert torch.equal(model(x), net((x - mean) / std))
    assert {"mean", "std"} <= set(model.state_dict())  # saved with the weights


@pytest.mark.integration
def test_a_normalized_augmented_run_logs_a_model_that_scores_the_same(
    tiny_overrides, tmp_path, store: Store
):
    args = [
        *tiny_overrides,
        "data.preprocess.mean=[0.2]",
        "data.preprocess.std=[0.3]",
        "data.preprocess.crop_padding=2",
        "data.preprocess.flip=true",
    ]
    done = cnnlab("train", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run = store.only_run()
    assert run.data.params["data.preprocess.crop_padding"] == "2"
    # cnnlab-eval rebuilds the network from the logged config (normalisation included) and
    # reads the weights as numbers: it must score what the run logged.
    evaluated = cnnlab("eval", run.info.run_id, *tiny_overrides, cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    logged = run.data.metrics["test_accuracy"]
    assert f"test accuracy {logged:.4%}" in evaluated.stdout


def test_normalization_errors_are_one_line(tiny_overrides, tmp_path):
    half = cnnlab("train", *tiny_overrides, "data.preprocess.mean=[0.5]", cwd=tmp_path)
    assert half.returncode != 0
    assert "data.preprocess.std" in one_error_line(half) and "go together" in half.stderr
    channels = cnnlab(
        "train",
        *tiny_overrides,
        "data.preprocess.mean=[0.5,0.5,0.5]",
        "data.preprocess.std=[0.2,0.2,0.2]",
        cwd=tmp_path,
    )
    assert channels.returncode != 0
    assert "1 channel(s)" in one_error_line(channels)


def test_a_split_over_the_budget_trains_the_same_bits_converted_per_batch():
    data = uint8_split(60)
    held, streamed = on_device(data, torch.device("cpu")), on_device(data, torch.device("cpu"), 0)
    assert held.images.dtype == torch.float32 and streamed.images.dtype == torch.uint8

    def weights(split: Split) -> list[torch.Tensor]:
        step = augmented_step(split)
        torch.manual_seed(5)
        for _ in train_one_epoch(step, 4):
            pass
        return [p.detach().clone() for p in step.model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(weights(held), weights(streamed), strict=True))
