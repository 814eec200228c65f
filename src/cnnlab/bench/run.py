"""cnnlab-bench's table: a header that says where it ran, then each section of
bench.sections, in order.

Each comparison alternates its sides for bench.rounds rounds in one process, so machine noise
hits both alike; it reports each side's median and the median of the per-round ratios. The
article's side is its script's loop: torchvision MNIST with ToTensor, a shuffled DataLoader with
one worker, Adam, a .item() per step.
"""

from __future__ import annotations

import os
import platform

import torch
from omegaconf import DictConfig

from cnnlab import CnnlabError
from cnnlab.bench.article import section_article
from cnnlab.bench.batch_sizes import section_batch_sizes
from cnnlab.bench.datasets import section_datasets
from cnnlab.bench.ddp import section_ddp
from cnnlab.bench.harness import Section, cpu_info, load_data
from cnnlab.bench.parallel import section_parallel
from cnnlab.bench.startup import section_startup
from cnnlab.bench.step import section_step
from cnnlab.bench.sweeps import section_search, section_sweep
from cnnlab.bench.tracking import section_tracking
from cnnlab.bench.ui import section_ui
from cnnlab.config.validate import validate
from cnnlab.training.hardware import setup_hardware

SECTIONS: dict[str, Section] = {
    "article": section_article,
    "step": section_step,
    "tracking": section_tracking,
    "startup": section_startup,
    "batch_sizes": section_batch_sizes,
    "parallel": section_parallel,
    "datasets": section_datasets,
    "sweep": section_sweep,
    "search": section_search,
    "ui": section_ui,
    "ddp": section_ddp,
}


def run_bench(cfg: DictConfig) -> None:
    """Print the benchmark table for the sections in cfg.bench.sections."""
    validate(cfg)
    unknown = set(cfg.bench.sections) - set(SECTIONS)
    if unknown:
        raise CnnlabError(f"bench.sections has {sorted(unknown)}; choose from {list(SECTIONS)}")
    device = setup_hardware(cfg.hardware)
    data = load_data(cfg)
    cpu = next((p["model name"] for p in cpu_info() if "model name" in p), platform.processor())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    print(f"cnnlab-bench: {where}; {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    print(
        f"torch {torch.__version__}, data {data.source}, "
        f"medians of {cfg.bench.rounds} rounds (ratios: of the per-round ratios)"
    )
    for name in cfg.bench.sections:
        print()
        for line in SECTIONS[name](cfg, data, device):
            print(line, flush=True)
