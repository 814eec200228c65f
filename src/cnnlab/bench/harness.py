"""What every cnnlab-bench section uses: cnnlab's loop timed alone, rounds that alternate the
sides of a comparison, this CPU's arithmetic peak, stand-in data, and the processes a section
starts (the bench's data settings handed on, the last line they print)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from cnnlab import CnnlabError
from cnnlab.config.compose import launch_path
from cnnlab.data.load import data_arguments, load_dataset
from cnnlab.data.preprocess import FLOAT_BUDGET, on_device
from cnnlab.data.splits import Dataset, Split
from cnnlab.models.networks import build_network
from cnnlab.tracking.lifecycle import AnyTracker
from cnnlab.tracking.provenance import command_line_overrides
from cnnlab.train import train
from cnnlab.training.fit import build_model, training_step
from cnnlab.training.loop import train_one_epoch

# A section: (config, the bench's data, device) -> the lines it prints.
Section = Callable[[DictConfig, Dataset, torch.device], list[str]]


# ----------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence a measured run's progress: what it prints, and cnnlab's notices it logs (the
    bench logs to stdout too, hydra/job_logging=stdout); its warnings still show."""
    notices = logging.getLogger("cnnlab")  # the parent of every cnnlab module's logger
    level = notices.level
    notices.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        notices.setLevel(level)


class Rounds(dict):
    """Each side's result (samples/s or seconds) per round, in the order the rounds ran."""

    def median(self, side: str) -> float:
        """The side's median result."""
        return statistics.median(self[side])

    def ratio(self, side: str, other: str) -> float:
        """Median over rounds of side / other. The two ran back to back in each round, so a
        slow spell of the machine (shared VMs have them, lasting minutes) hits both alike."""
        return statistics.median(a / b for a, b in zip(self[side], self[other], strict=True))


def alternate(rounds: int, sides: dict[str, Callable[[], float]]) -> Rounds:
    """Run each side once per round, in turn; every other round in reverse order (ABBA), so
    that going first or second (a warm cache, a just-freed heap) favours no side."""
    results = Rounds({name: [] for name in sides})
    for round_ in range(rounds):
        order = list(sides.items())
        for name, side in order if round_ % 2 == 0 else reversed(order):
            results[name].append(side())
    return results


def cnnlab_training(
    cfg: DictConfig,
    data: Dataset,
    batches: int,
    device: torch.device,
    budget: int = FLOAT_BUDGET,
) -> tuple[list[float], float]:
    """cnnlab-train's loop with `cfg` for `batches` mini-batches: (mean losses, seconds).
    `budget`: preprocess.on_device's (0: images stay uint8, converted per batch)."""
    train_split = on_device(data.train, device, budget)
    synchronize(device)
    start = time.perf_counter()
    model, optimizer = build_model(cfg, data, device)
    losses = []
    step = training_step(cfg, model, optimizer, train_split)
    for batch, loss in train_one_epoch(step, cfg.train.log_every):
        losses.append(loss)
        if batch >= batches:
            break
    synchronize(device)
    return losses, time.perf_counter() - start


def training_rate(
    cfg: DictConfig, data: Dataset, batches: int, device: torch.device, budget: int = FLOAT_BUDGET
) -> Callable[[], float]:
    """A side that times cnnlab's loop: samples/s over `batches` mini-batches of
    cfg.train.batch_size, with one loss read-back, at the end: nothing but training is timed."""
    run_cfg = OmegaConf.merge(cfg, {"train": {"log_every": batches}})
    size = run_cfg.train.batch_size
    return lambda: batches * size / cnnlab_training(run_cfg, data, batches, device, budget)[1]


def one_epoch_run(
    cfg: DictConfig,
    tracking: dict[str, Any],
    wrap_run: Callable[[AnyTracker], AnyTracker] | None = None,
) -> float:
    """Seconds of a quiet 1-epoch cnnlab-train run of `cfg` with these tracking.* settings;
    `wrap_run` as cnnlab.train.train's."""
    run_cfg = OmegaConf.merge(cfg, {"train": {"epochs": 1}, "tracking": tracking})
    start = time.perf_counter()
    with quiet():
        train(run_cfg, wrap_run=wrap_run)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------ the machine
def flops_per_sample(cfg: DictConfig, in_shape: tuple[int, ...], num_classes: int) -> float:
    """Forward + backward FLOPs of one training sample, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_network(cfg.model, in_shape, num_classes)
    x, y = torch.rand(8, *in_shape), torch.randint(0, num_classes, (8,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / 8


def cpu_info() -> list[dict[str, str]]:
    """/proc/cpuinfo as one {field: value} per logical processor; [] where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return [
        {
            key.strip(): value.strip()
            for key, _, value in (ln.partition(":") for ln in block.splitlines())
        }
        for block in text.strip().split("\n\n")
    ]


def cpu_peak_flops() -> tuple[float, str]:
    """This CPU's fp32 peak: cores x 2 FMA units x SIMD lanes x 2 FLOPs x clock."""
    processors = cpu_info()
    flags = processors[0].get("flags", "").split() if processors else []
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    mhz = [float(p["cpu MHz"]) for p in processors if "cpu MHz" in p]
    ghz = (max(mhz) if mhz else 2000.0) / 1000
    cores = os.cpu_count() or 1
    peak = cores * 2 * lanes * 2 * ghz * 1e9
    return peak, f"{cores} cores x 2 FMA x {lanes} fp32 lanes x 2 FLOPs x {ghz:.2f} GHz"


# ------------------------------------------------------------------------------------- data
def load_data(cfg: DictConfig) -> Dataset:
    """The dataset `cfg.data` names, as cnnlab-train loads it."""
    return load_dataset(**data_arguments(cfg.data, launch_path(cfg.data.root)))


def synthetic_dataset(n: int, shape: tuple[int, int, int], num_classes: int) -> Dataset:
    """`n` random uint8 images of `shape` with random labels: a stand-in of a real set's size."""
    g = torch.Generator().manual_seed(0)
    split = Split(
        torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g),
        torch.randint(0, num_classes, (n,), generator=g),
    )
    classes = [str(c) for c in range(num_classes)]
    return Dataset(split, split, num_classes, classes, Path("synthetic"), "synthetic")


# -------------------------------------------------------------------- processes it starts
def data_overrides(cfg: DictConfig) -> list[str]:
    """The bench's data as overrides for the cnnlab processes a section starts: each data
    override given to cnnlab-bench (data=..., data.md5.*=...), then data.root made absolute."""
    given = [
        o for o in command_line_overrides()
        if (key := o.lstrip("+~").partition("=")[0]) == "data"
        or (key.startswith("data.") and key != "data.root")
    ]  # fmt: skip
    return [*given, f"data.root={launch_path(cfg.data.root)}"]


def started(command: Sequence[str | Path], **popen: Any) -> subprocess.Popen:
    """`command` running, its stdout and stderr piped as text, for `last_line`."""
    return subprocess.Popen(
        [str(arg) for arg in command],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,
    )  # fmt: skip


def last_line(proc: subprocess.Popen, what: str) -> str:
    """The last line `proc` (from `started`) prints, once it ends; a CnnlabError naming `what`
    and ending with its stderr's end if it fails."""
    out, err = proc.communicate()
    lines = out.strip().splitlines()
    if proc.returncode or not lines:
        raise CnnlabError(f"{what} failed (exit status {proc.returncode}): {err.strip()[-500:]}")
    return lines[-1]
