"""Data-parallel training under torchrun: the process group, each rank's share of a batch, and
what rank 0 tells the others.

    torchrun --standalone --nproc_per_node=2 --no-python cnnlab-train train.epochs=1

Every rank draws the same epoch order from the same seeded RNG and trains its slice of each
global batch (train.batch_size / world size samples); the gradients are summed over the ranks in
one all-reduce of the model's flat gradient buffer (step.flat_parameters), so each rank takes
the same optimizer step a single process takes on the whole batch. That is what
DistributedDataParallel does, in one bucket; DDP itself would wrap a module whose parameters it
flattens again, and it cannot see the flat buffer the lean optimizer steps on.

Rank 0 alone talks to the tracking store and writes Hydra's output folder; the others get the
config and checkpoint of a resumed run from it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cnnlab import CnnlabError
from cnnlab.training import checkpoint
from cnnlab.training.checkpoint import Progress


class RankFailure(CnnlabError):
    """Another rank of the torchrun job stopped (killed, crashed, its node lost)."""

    already_said = True  # each rank says it the moment it notices


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job; rank 0 of 1 outside one."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, checkpoints and evaluates."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()  # a process on its own


def world_from_env() -> World:
    """The torchrun job this process is a rank of (WORLD_SIZE, RANK, LOCAL_RANK), if any."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1 or "RANK" not in os.environ:  # (a WORLD_SIZE some scheduler left behind)
        return SINGLE
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def start(world: World, timeout_s: float = 4 * 3600) -> None:
    """Join the torchrun job's process group (nothing outside one): gloo for CPU tensors, and
    nccl for CUDA ones where there is a GPU, so rank 0 can hand the others a config or a
    checkpoint whatever the device.

    `timeout_s` bounds a collective's wait: long, since the others wait while rank 0 alone
    fetches the data or evaluates; a rank that dies is noticed at once anyway (its sockets
    close)."""
    if not world.distributed or dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as exc:
        raise CnnlabError(
            f"rank {world.rank} could not join the torchrun job ({backend}): "
            f"{str(exc).splitlines()[0]}; check --rdzv_endpoint and that every node can reach it"
        ) from exc


def stop() -> None:
    """Leave the process group (at the end of a run, also a failed one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device, world: World) -> torch.device:
    """The device this rank trains on: on GPUs, one per local rank (cuda:LOCAL_RANK)."""
    if device.type != "cuda" or not world.distributed:
        return device
    if world.local_rank >= torch.cuda.device_count():
        raise CnnlabError(
            f"local rank {world.local_rank} has no GPU of its own ({torch.cuda.device_count()} "
            "visible): give torchrun --nproc_per_node at most the number of GPUs"
        )
    device = torch.device("cuda", world.local_rank)
    torch.cuda.set_device(device)
    return device


def check_job(cfg: Any, world: World, in_sweep: bool) -> None:
    """What a torchrun job can't be: a sweep, a CUDA graph, a global batch that doesn't split."""
    if not world.distributed:
        return
    from cnnlab.config.schema import ConfigError

    if in_sweep:
        raise ConfigError(
            "a sweep (-m) can't run under torchrun: each job would be all the ranks' at once; "
            "sweep without torchrun, or run one torchrun per configuration"
        )
    if cfg.hardware.cuda_graphs:
        raise ConfigError(
            "hardware.cuda_graphs=true can't be combined with torchrun yet; set "
            "hardware.cuda_graphs=false"
        )
    if cfg.train.batch_size % world.size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is the global batch and must be divisible "
            f"by the {world.size} processes of this torchrun job; set train.batch_size to a "
            f"multiple of {world.size}"
        )


def _guarded(what: str, call: Any, *args: Any) -> Any:
    try:
        return call(*args)
    except (RuntimeError, dist.DistBackendError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        failure = RankFailure(f"{what} failed: another rank of the torchrun job stopped ({reason})")
        # Said now: torchrun stops this rank with SIGTERM moments later, and the run is closed
        # (FAILED, with this reason) while that signal waits.
        print(f"cnnlab-train: error: {failure}", file=sys.stderr, flush=True)
        raise failure from exc


def all_reduce_sum(tensor: torch.Tensor) -> None:
    """Sum `tensor` over the ranks, in place."""
    _guarded("summing over the ranks", dist.all_reduce, tensor)


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` (plain data: a config, checkpoint bytes), on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    _guarded("receiving from rank 0", dist.broadcast_object_list, box, 0)
    return box[0]


def barrier() -> None:
    """Wait until every rank gets here."""
    if dist.is_initialized():
        _guarded("waiting for the other ranks", dist.barrier)


@contextmanager
def in_turn(world: World) -> Iterator[None]:
    """Run the block on rank 0 first (it fetches and caches the data), then on each other
    node's local rank 0 (a node without a shared filesystem fetches its own copy), then on the
    rest (they read a cache): no two processes fetch into one folder at once."""
    turn = 0 if world.rank == 0 else 1 if world.local_rank == 0 else 2
    for _ in range(turn):
        barrier()
    yield
    for _ in range(turn, 2):
        barrier()


def same_rng(world: World) -> None:
    """Give every rank rank 0's CPU RNG: the next epoch's order must be the same on all of
    them, and a rank's own use of the RNG (dropout over its slice of a batch, a slice smaller
    than another's) would have moved its own."""
    if world.distributed:
        torch.set_rng_state(broadcast(torch.get_rng_state()))


def agreed(stop: Callable[[], Any], world: World) -> Callable[[], bool]:
    """`stop` asked on every rank after each mini-batch, answered for all: a signal reaches the
    ranks at different mini-batches, but they must stop after the same one."""
    if not world.distributed:
        return stop
    flag = torch.zeros((), dtype=torch.int32)

    def any_rank() -> bool:
        flag.fill_(1 if stop() else 0)
        _guarded("agreeing on a stop", dist.all_reduce, flag, dist.ReduceOp.MAX)
        return bool(flag.item())

    return any_rank


def same_start(
    world: World, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: Progress
) -> Progress:
    """Every rank at rank 0's weights, optimizer state, RNG and position (a resumed run's
    checkpoint only rank 0 has read from the store); the progress to continue from."""
    if not world.distributed:
        return progress
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "start.pt"
        if world.main:
            checkpoint.save(path, model, optimizer, progress)
        data = broadcast(path.read_bytes() if world.main else None)
        if world.main:
            return progress
        path.write_bytes(data)
        return checkpoint.load(path, model, optimizer, "rank 0's starting state")
