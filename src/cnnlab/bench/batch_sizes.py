"""cnnlab-bench's batch_sizes section: cnnlab's samples/s at several batch sizes, and what
fraction of the CPU's arithmetic peak that is."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from cnnlab.bench.harness import alternate, cpu_peak_flops, flops_per_sample, training_rate
from cnnlab.data.splits import Dataset


def section_batch_sizes(cfg: DictConfig, data: Dataset, device: torch.device) -> list[str]:
    """Samples/s at several batch sizes and the fraction of the CPU's arithmetic peak."""
    flops = flops_per_sample(cfg, data.in_shape, data.num_classes)
    peak, how = cpu_peak_flops() if device.type == "cpu" else (float("nan"), "n/a on GPU")
    lines = [
        f"Batch sizes ({flops / 1e6:.2f} MFLOP per training sample, fwd+bwd; "
        f"peak {peak / 1e9:.0f} GFLOP/s = {how}):"
    ]
    samples = cfg.bench.batches * 10

    for batch_size in cfg.bench.batch_sizes:
        run_cfg = OmegaConf.merge(cfg, {"train": {"batch_size": batch_size}})
        side = training_rate(run_cfg, data, max(samples // batch_size, 1), device)
        rate = alternate(cfg.bench.rounds, {"x": side}).median("x")
        lines.append(
            f"  batch {batch_size:4d}  {rate:9.0f} samples/s  "
            f"{rate * flops / 1e9:7.2f} GFLOP/s  {rate * flops / peak:6.1%} of peak"
        )
    return lines
