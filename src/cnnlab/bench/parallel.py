"""cnnlab-bench's parallel section: the throughput of two single-threaded training processes
at once against one alone."""

from __future__ import annotations

import json
import sys

import torch
from omegaconf import DictConfig

from cnnlab.bench.harness import (
    alternate,
    cnnlab_training,
    data_overrides,
    last_line,
    load_data,
    started,
)
from cnnlab.config.compose import compose_config
from cnnlab.data.splits import Dataset

# argv: the data overrides (JSON), mini-batches.
_PROBE = (
    "import sys, torch; torch.set_num_threads(1); from cnnlab.bench.parallel import "
    "parallel_probe; parallel_probe()"
)


def section_parallel(cfg: DictConfig, data: Dataset, device: torch.device) -> list[str]:
    """Throughput of two single-threaded training processes at once against one alone."""
    batches = cfg.bench.batches
    command = [sys.executable, "-c", _PROBE, json.dumps(data_overrides(cfg)), str(batches)]

    def jobs(n: int) -> float:
        procs = [started(command) for _ in range(n)]
        return sum(float(last_line(p, "a parallel training job")) for p in procs)

    rates = alternate(cfg.bench.rounds, {"one": lambda: jobs(1), "two": lambda: jobs(2)})
    return [
        f"Parallel jobs (1 torch thread each, {batches} mini-batches of 10):",
        f"  one job   {rates.median('one'):9.0f} samples/s",
        f"  two jobs  {rates.median('two'):9.0f} samples/s together   "
        f"{rates.ratio('two', 'one'):.2f}x",
    ]


def parallel_probe() -> None:
    """Run by section_parallel in its own process: print this job's samples/s."""
    overrides, batches = json.loads(sys.argv[1]), int(sys.argv[2])
    cfg = compose_config([*overrides, "hardware=cpu"])
    data = load_data(cfg)
    _, seconds = cnnlab_training(cfg, data, batches, torch.device("cpu"))
    print(batches * cfg.train.batch_size / seconds)
