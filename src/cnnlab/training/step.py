"""One optimisation step on a mini-batch, made fast: pure torch, every dependency an argument.

At batch size 10 a step is a few milliseconds of small kernels on a CPU, so per-step overhead
(Python, allocations, one optimizer kernel per tensor) is a large share of it. The eager fast
paths here cut that overhead and keep every number bit-identical to the article's plain loop
(tests/test_step.py, tests/test_parity.py); `cnnlab-bench bench.sections=[step]` measures what
each is worth. On a GPU, the opt-in CUDA graph replays the whole step as one launch instead of
one per kernel; its Adam is torch's capturable one, equal to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
import torch.optim.optimizer as torch_optimizer
from torch import Tensor, nn

from cnnlab import CnnlabError
from cnnlab.data.preprocess import Augment, to_float
from cnnlab.data.splits import Split
from cnnlab.training import distributed
from cnnlab.training.distributed import World


def flat_parameters(model: nn.Module) -> nn.Parameter:
    """All of `model`'s parameters as one Parameter, each of them becoming a view into it.

    Given this one tensor, an elementwise optimizer (Adam, AdamW, SGD) launches its ~8 kernels
    once per step instead of once per parameter tensor: the same arithmetic on every element, so
    bit-identical weights, with less per-step overhead. Call after `model.to(device)`.
    """
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    grad = torch.zeros_like(flat)
    offset = 0
    for p in params:
        n = p.numel()
        # Backward accumulates in place into an existing .grad, so grads land in `grad` too.
        p.data = flat[offset : offset + n].view_as(p)
        p.grad = grad[offset : offset + n].view_as(p)
        offset += n
    merged = nn.Parameter(flat)
    merged.grad = grad
    return merged


class TrainStep:
    """Trains on `data[idx]` for each `step(idx)`, adding each batch's loss to `loss_sum`.

    `loss_sum` (float64, on the data's device) is read back only when the caller wants it: a
    `.item()` per step would stall a GPU on every batch. With `cuda_graph=True` the step is
    captured at the first batch of `batch_size` samples and replayed from then on; a smaller
    last batch runs eagerly. `augment` (drawn per epoch by the loop) transforms each batch.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: Split,
        batch_size: int,
        cuda_graph: bool = False,
        augment: Augment | None = None,
        world: World = distributed.SINGLE,
    ) -> None:
        self.model, self.optimizer, self.data = model, optimizer, data
        self.batch_size = batch_size
        self.augment = augment
        self.world = world
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=data.labels.device)
        if cuda_graph:
            check_cuda_graphs(self.loss_sum.device)
        else:
            _set_capturable(optimizer, False)  # a checkpoint of a graphed run may say True
        self._cuda_graph = cuda_graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_idx: Tensor | None = None
        self._zero_grad = _zero_grad(optimizer)
        self._optimizer_step = optimizer_step(optimizer)

    def __call__(self, idx: Tensor) -> None:
        if self._cuda_graph and idx.numel() == self.batch_size:
            # Streams and graphs belong to the current device: make it the data's (cuda:N).
            with torch.cuda.device(self.loss_sum.device):
                if self._graph is None:
                    self._capture(idx)
                self._static_idx.copy_(idx)
                self._graph.replay()
            return
        self.eager(idx)

    def loss_total(self) -> float:
        """`loss_sum` as a number: over every rank's share of the batches under torchrun."""
        if not self.world.distributed:
            return self.loss_sum.item()
        total = self.loss_sum.clone()
        distributed.all_reduce_sum(total)
        return total.item()

    def eager(self, idx: Tensor) -> None:
        """The step as the article writes it, launched op by op.

        Under torchrun this rank trains its slice of the global batch `idx`. Its loss is its
        samples' summed loss over the global batch's size, so the gradients summed over the
        ranks are those of the global batch's mean loss: the step a single process takes on all
        of `idx`, up to float rounding.
        """
        self._zero_grad()
        shared = self.world.distributed
        mine = idx.tensor_split(self.world.size)[self.world.rank] if shared else idx
        # index_select, not images[idx]: the same rows, without advanced indexing's overhead.
        images = self.data.images.index_select(0, mine)
        if self.augment is not None:
            images = self.augment.apply(images, mine)
        labels = self.data.labels.index_select(0, mine)
        logits = self.model(to_float(images))
        if shared:
            loss = F.cross_entropy(logits, labels, reduction="sum") / idx.numel()
        else:
            loss = F.cross_entropy(logits, labels)  # the article's mean, bit for bit
        loss.backward()
        if shared:
            for group in self.optimizer.param_groups:
                for p in group["params"]:  # one flat buffer (flat_parameters): one all-reduce
                    distributed.all_reduce_sum(p.grad)
        self._optimizer_step()
        self.loss_sum.add_(loss.detach())

    def _capture(self, idx: Tensor) -> None:
        """Record the step on `idx`-sized batches as a CUDA graph (torch's whole-network recipe).

        The graph bakes in the learning rate and every other float hyperparameter as it is now.
        """
        _set_capturable(self.optimizer, True)  # Adam & co. then keep their step count on the GPU
        self._optimizer_step = self.optimizer.step  # the lean CPU step is not capturable
        self._static_idx = idx.clone()
        # Warm-up on a side stream lets cuBLAS/cuDNN and the optimizer state initialise outside
        # the capture; `rehearsal` then puts weights, optimizer state and loss_sum back, so the
        # run trains exactly the batches it would have trained eagerly.
        with rehearsal(self.optimizer, self.loss_sum, self.model):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(side):
                    for _ in range(3):
                        self.eager(self._static_idx)
            finally:
                torch.cuda.current_stream().wait_stream(side)  # before rehearsal restores
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self.eager(self._static_idx)  # recorded, not run: nothing changes until replay


def _set_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """Switch an optimizer that has the flag (Adam & co.) between CUDA-graph and eager steps."""
    for group in optimizer.param_groups:
        if "capturable" in group:
            group["capturable"] = capturable
            for p in group["params"]:
                step = optimizer.state.get(p, {}).get("step")
                if isinstance(step, Tensor):  # capturable: on the parameter's device; else CPU
                    optimizer.state[p]["step"] = step.to(p.device if capturable else "cpu")


def check_cuda_graphs(device: torch.device) -> None:
    """Fail, naming the fix, when CUDA graphs are asked for on a device that has none."""
    if device.type != "cuda":
        raise CnnlabError(
            f"hardware.cuda_graphs=true needs a CUDA device, and this run is on {device}: "
            "set hardware.cuda_graphs=false, or train on a GPU with hardware=cuda"
        )


@contextmanager
def rehearsal(
    optimizer: torch.optim.Optimizer, loss_sum: Tensor, model: nn.Module | None = None
) -> Iterator[None]:
    """Steps taken inside leave no trace: parameters, optimizer state, `loss_sum` and the
    model's buffers (BatchNorm's running statistics) are restored in place (same storage, as a
    captured graph needs), as is the device's RNG (dropout); state the steps created is zeroed:
    Adam's initial state, and SGD's with momentum as long as dampening is 0 (cnnlab's schema
    has no dampening key)."""
    params = _params(optimizer)
    saved_params = [p.detach().clone() for p in params]
    buffers = list(model.buffers()) if model is not None else []
    saved_buffers = [b.detach().clone() for b in buffers]
    device = loss_sum.device
    saved_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    saved_state = {
        p: {k: v.clone() for k, v in state.items() if isinstance(v, Tensor)}
        for p, state in optimizer.state.items()
    }
    saved_loss_sum = loss_sum.clone()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, saved in zip(params, saved_params, strict=True):
                p.copy_(saved)
            for p, state in optimizer.state.items():
                before = saved_state.get(p, {})
                for key, value in state.items():
                    if isinstance(value, Tensor):
                        value.copy_(before[key]) if key in before else value.zero_()
            loss_sum.copy_(saved_loss_sum)
            for b, saved in zip(buffers, saved_buffers, strict=True):
                b.copy_(saved)
        if saved_rng is not None:
            torch.cuda.set_rng_state(saved_rng, device)


def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _zero_grad(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    # Zeroed, not freed: grads must stay views into the flat buffer (see flat_parameters).
    params = _params(optimizer)
    if len(params) == 1 and params[0].grad is not None:
        return params[0].grad.zero_  # what zero_grad does, without its per-call bookkeeping
    return partial(optimizer.zero_grad, set_to_none=False)


def optimizer_step(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """`optimizer.step`; for a plain Adam/AdamW over one CPU tensor, the same arithmetic leaner.

    torch's single-tensor Adam allocates two parameter-sized temporaries per step and runs
    its bookkeeping in Python; `_adam_step` reuses one buffer, with bit-identical weights and
    state (the state stays torch's, so checkpoints are unchanged). Neither of torch's own fast
    paths replaces it: on one tensor `foreach=True` saves nothing, and `fused=True` rounds
    differently (the article's losses would change). tests/test_step.py fails if a torch
    upgrade makes torch's Adam differ from this copy.
    """
    groups = optimizer.param_groups
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or len(groups) != 1:
        return optimizer.step
    (param, *more) = groups[0]["params"]
    if more or param.device.type != "cpu" or param.dtype != torch.float32:
        return optimizer.step
    decoupled = isinstance(optimizer, torch.optim.AdamW)
    return partial(_adam_step, optimizer, param, decoupled, torch.empty_like(param))


def _lean_step_replicates(group: dict) -> bool:
    """True when an Adam param group asks for nothing beyond what `_adam_step` replicates."""
    return not (
        group["amsgrad"]
        or group["maximize"]
        or group.get("foreach")
        or group.get("fused")
        or group.get("capturable")
        or group.get("differentiable")
        or any(isinstance(group[k], Tensor) for k in ("lr", "weight_decay", "eps"))
        or any(isinstance(b, Tensor) for b in group["betas"])
    )


def _has_step_hooks(optimizer: torch.optim.Optimizer) -> bool:
    # Optimizer.step runs these; the lean step would skip them, so it steps aside.
    return bool(
        getattr(optimizer, "_optimizer_step_pre_hooks", None)
        or getattr(optimizer, "_optimizer_step_post_hooks", None)
        or getattr(torch_optimizer, "_global_optimizer_pre_hooks", None)
        or getattr(torch_optimizer, "_global_optimizer_post_hooks", None)
    )


@torch.no_grad()
def _adam_step(
    optimizer: torch.optim.Optimizer, param: Tensor, decoupled: bool, denom: Tensor
) -> None:
    # torch.optim.adam._single_tensor_adam's non-capturable branch, op for op. The group and the
    # state are looked up per call: load_state_dict replaces both.
    group, state = optimizer.param_groups[0], optimizer.state[param]
    covered = state and param.grad is not None and _lean_step_replicates(group)
    if not covered or _has_step_hooks(optimizer):
        optimizer.step()  # e.g. the first step, which creates the state exactly as torch does
        return
    lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    grad, exp_avg, exp_avg_sq, step_t = (
        param.grad, state["exp_avg"], state["exp_avg_sq"], state["step"]
    )  # fmt: skip
    step_t += 1
    if weight_decay != 0:
        if decoupled or group.get("decoupled_weight_decay"):
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step = step_t.item()
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    torch.sqrt(exp_avg_sq, out=denom)
    denom.div_(bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
