"""cnnlab-bench's ddp section: data-parallel training under torchrun, one process against
two (or, on a GPU machine, one GPU against all)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

from cnnlab.bench.harness import (
    alternate,
    data_overrides,
    last_line,
    load_data,
    started,
    synchronize,
)
from cnnlab.config.compose import compose_config
from cnnlab.data.preprocess import on_device
from cnnlab.data.splits import Dataset
from cnnlab.training import distributed
from cnnlab.training.fit import build_model, training_step
from cnnlab.training.loop import train_one_epoch

# argv: the data overrides (JSON), device type, global batch size, mini-batches.
_PROBE = "from cnnlab.bench.ddp import ddp_probe; ddp_probe()"


def section_ddp(cfg: DictConfig, data: Dataset, device: torch.device) -> list[str]:
    """Training samples/s of one process against two under torchrun (one torch thread each;
    on a GPU machine, one GPU against all), at a small and a large global batch."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    wide = max(2, gpus)
    overrides = json.dumps(data_overrides(cfg))

    def torchrun(nproc: int, batch_size: int) -> Callable[[], float]:
        batches = max(20, 30_000 // batch_size)  # ~30k samples: seconds, half an epoch
        command = [
            Path(sys.executable).with_name("torchrun"), "--standalone",
            f"--nproc_per_node={nproc}", "--no-python", sys.executable, "-c", _PROBE, overrides,
            device.type, batch_size, batches,
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return lambda: float(last_line(started(command, env=env), "torchrun"))

    lines = [
        f"Data-parallel training under torchrun ({'1 GPU each' if gpus else '1 thread each'}, "
        "global batch split over the processes), samples/s:",
    ]
    for batch_size in (10, 256):
        rates = alternate(cfg.bench.rounds, {
            "one": torchrun(1, batch_size), "all": torchrun(wide, batch_size),
        })  # fmt: skip
        lines.append(
            f"  batch {batch_size:>3}: 1 process {rates.median('one'):8.0f}   {wide} processes "
            f"{rates.median('all'):8.0f}   {rates.ratio('all', 'one'):.2f}x"
        )
    return lines


def ddp_probe() -> None:
    """Run by section_ddp in each torchrun process: rank 0 prints the job's samples/s."""
    overrides, device_type = json.loads(sys.argv[1]), sys.argv[2]
    batch_size, batches = int(sys.argv[3]), int(sys.argv[4])
    world = distributed.world_from_env()
    distributed.start(world)
    cfg = compose_config([
        *overrides, f"hardware.device={device_type}", "hardware.threads=1",
        f"train.batch_size={batch_size}",
    ])  # fmt: skip
    device = distributed.rank_device(torch.device(device_type), world)
    with distributed.in_turn(world):
        data = load_data(cfg)
    train_split = on_device(data.train, device)
    batches = min(batches, -(-len(train_split) // batch_size))  # at most one epoch
    model, optimizer = build_model(cfg, data, device)
    step = training_step(cfg, model, optimizer, train_split, world)
    distributed.barrier()
    synchronize(device)
    start = time.perf_counter()
    for _ in train_one_epoch(step, batches, batches=batches):
        pass  # the one log point is the last batch: its loss summed over the ranks syncs them
    synchronize(device)
    seconds = time.perf_counter() - start
    if world.main:
        print(batches * batch_size / seconds)
    distributed.stop()
