"""The training and evaluation loops: pure torch, every dependency an argument."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from cnnlab import CnnlabError
from cnnlab.data.preprocess import to_float
from cnnlab.data.splits import Split
from cnnlab.training.step import TrainStep


class NonFiniteLossError(CnnlabError):
    """The training loss became NaN or infinite."""


def epoch_order(n: int) -> Tensor:
    """The epoch's sample order, drawn exactly as `DataLoader(shuffle=True)` draws it.

    A DataLoader iterator first draws a worker base seed from the global RNG, then its
    RandomSampler draws a seed for a fresh generator and takes `randperm(n)` from it. Making the
    same two draws keeps the global RNG stream, and so every batch, identical to the article's.
    """
    torch.empty((), dtype=torch.int64).random_()  # the iterator's worker base seed, unused here
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.randperm(n, generator=generator)


class TrainingInterrupted(Exception):  # noqa: N818 - a request, not an error
    """A stop was requested (Ctrl-C, SIGTERM); the epoch can continue from `next_batch`."""

    def __init__(self, next_batch: int, running: float, epoch_rng: torch.Tensor) -> None:
        super().__init__(f"stopped before mini-batch {next_batch + 1}")
        self.epoch_rng = epoch_rng
        self.next_batch = next_batch
        self.running = running  # sum of the losses of the unfinished log window

    def args_for_resume(self) -> tuple[int, float, torch.Tensor]:
        """(batch, running, rng) to continue this epoch; the RNG as it was when it began."""
        return self.next_batch, self.running, self.epoch_rng


def train_one_epoch(
    step: TrainStep,
    log_every: int,
    progress: bool = False,
    start_batch: int = 0,
    running: float = 0.0,
    stop: Callable[[], bool] = lambda: False,
    batches: int | None = None,
) -> Iterator[tuple[int, float]]:
    """Train one epoch of `step.data`; every `log_every` batches yield (batches done, mean loss),
    and at the end that of the last window, if it is shorter.

    `batches` ends the epoch after that many mini-batches of its (full) random order.

    `start_batch` and `running` continue an epoch that was interrupted (the global RNG must be
    where it was when that epoch began, so the same order is drawn). `stop` is asked after each
    batch; when it answers True, TrainingInterrupted says where to continue.
    """
    step.model.train()
    n = len(step.data)
    epoch_rng = torch.get_rng_state()
    order = epoch_order(n).to(step.loss_sum.device)
    if step.augment is not None:
        step.augment.new_epoch()  # after the order, from the same RNG: a resume redraws both
    # float64, like the article's Python float sum; summed on the device (see TrainStep).
    loss_sum = step.loss_sum
    loss_sum.fill_(running)
    batch_size = step.batch_size
    starts = range(0, n, batch_size)[:batches]
    batches = tqdm(
        starts[start_batch:], disable=not progress, leave=False, unit="batch",
        initial=start_batch, total=len(starts),
    )  # fmt: skip
    for i, start in enumerate(batches, start=start_batch):
        step(order[start : start + batch_size])
        if (i + 1) % log_every == 0:
            yield i + 1, _finite(step.loss_total() / log_every, i + 1)
            loss_sum.zero_()
        if stop() and i + 1 < len(starts):
            raise TrainingInterrupted(i + 1, step.loss_total(), epoch_rng)
    if rest := len(starts) % log_every:
        # The epoch's last, partial window: its mean at the epoch's end, so an epoch shorter
        # than log_every still has a train_loss (and a NaN in it still fails the run).
        yield len(starts), _finite(step.loss_total() / rest, len(starts))


def _finite(loss: float, batch: int) -> float:
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"training loss became {loss} by mini-batch {batch}; lower optimizer.lr "
            "or check the data"
        )
    return loss


@torch.no_grad()  # on a generator: torch restores the caller's grad mode at every yield
def _logits(model: nn.Module, data: Split, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(labels, logits) of `data`'s batches, the model in eval mode, without gradients."""
    model.eval()
    for start in range(0, len(data), batch_size):
        images = data.images[start : start + batch_size]
        yield data.labels[start : start + batch_size], model(to_float(images))


def evaluate(model: nn.Module, data: Split, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (0..1) of `model` over `data`."""
    total_loss = torch.zeros((), dtype=torch.float64, device=data.labels.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.labels.device)
    for labels, logits in _logits(model, data, batch_size):
        total_loss += F.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(dim=1) == labels).sum()
    return total_loss.item() / len(data), correct.item() / len(data)


def predicted(model: nn.Module, data: Split, batch_size: int) -> Tensor:
    """The class `model` predicts for each of `data`'s samples (on the CPU)."""
    return torch.cat([logits.argmax(dim=1).cpu() for _, logits in _logits(model, data, batch_size)])
