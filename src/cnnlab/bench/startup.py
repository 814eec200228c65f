"""cnnlab-bench's startup section: what a user waits for, in fresh processes, from the command
to the first training step; and that first step's start-up, phase by phase."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cnnlab.bench.harness import alternate, data_overrides, last_line, load_data, quiet, started
from cnnlab.config.compose import compose_config
from cnnlab.data.preprocess import on_device
from cnnlab.data.splits import Dataset
from cnnlab.tracking.provenance import flatten
from cnnlab.tracking.run import closing_run, create_run
from cnnlab.training.fit import build_model, training_step

_BIG_IMPORTS = ("import torch", "import torchvision", "import mlflow")

# Run with `python -c` in a fresh interpreter, so each import is timed from a cold start; it
# imports nothing before the first mark. argv: store path, the data overrides (JSON). Prints
# seconds per phase.
_STARTUP_PROBE = """
import json, sys, time
marks, last = {}, time.perf_counter()
def mark(name):
    global last
    now = time.perf_counter(); marks[name] = now - last; last = now
import torch; mark("import torch")
import torchvision; mark("import torchvision")
import mlflow; mark("import mlflow")
from cnnlab.bench.startup import probe_first_step; mark("import cnnlab+hydra")
probe_first_step(sys.argv[1], json.loads(sys.argv[2]), mark)
print(json.dumps(marks))
"""


def section_startup(cfg: DictConfig, data: Dataset, device: torch.device) -> list[str]:
    """What a user waits for, in fresh processes: `cnnlab-train --help`, a config error and the
    default run's first training step, beside `python -c "import torch"`; then the first
    step's start-up by phase."""
    lines = startup_commands(cfg)
    lines.append("Start-up, process start to first training step, by phase (seconds):")
    with tempfile.TemporaryDirectory(prefix="cnnlab-bench-") as tmp:
        folder = Path(tmp)
        env = dict(os.environ, XDG_CACHE_HOME=str(folder / "cache"))  # no pre-migrated store yet
        for label, store in (
            ("new store, first ever", "a.db"),
            ("new store, template cached", "b.db"),
            ("existing store", "b.db"),
        ):
            probe = started(
                [sys.executable, "-c", _STARTUP_PROBE, folder / store,
                 json.dumps(data_overrides(cfg))], env=env,
            )  # fmt: skip
            phases = json.loads(last_line(probe, "the start-up probe"))
            beyond = sum(v for k, v in phases.items() if k not in _BIG_IMPORTS)
            lines.append(
                f"  {label:27s} "
                + "  ".join(f"{k} {v:.2f}" for k, v in phases.items())
                + f"  | beyond torch/torchvision/mlflow imports {beyond:.2f}"
            )
    return lines


def startup_commands(cfg: DictConfig) -> list[str]:
    """Wall seconds of whole commands, medians of bench.rounds alternating rounds, each round in
    a new launch folder: the first step is the default run's (train.log_every=1 makes it print
    a loss after its first mini-batch; the data cached, the store new), stopped there."""
    script = Path(sys.executable).with_name("cnnlab-train")
    train = [str(script)] if script.exists() else [sys.executable, "-m", "cnnlab.commands.train"]
    first_step = first_step_seconds([*train, *data_overrides(cfg), "train.log_every=1"])
    first_step()  # once untimed: the data decoded and cached, the store template made
    timed = alternate(
        cfg.bench.rounds,
        {
            "import torch": wall_seconds(sys.executable, "-c", "import torch"),
            "cnnlab-train --help": wall_seconds(*train, "--help"),
            "config error": wall_seconds(*train, "train.batch_size=-1"),
            "first training step": first_step,
        },
    )
    return [
        f"Start-up of whole commands (seconds, median of {cfg.bench.rounds}; fresh processes):",
        *(f"  {side:22s} {timed.median(side):6.2f}" for side in timed),
    ]


def wall_seconds(*command: str) -> Callable[[], float]:
    """A side: the wall seconds of `command`, run in a new folder."""

    def timed() -> float:
        with tempfile.TemporaryDirectory(prefix="cnnlab-bench-") as folder:
            start = time.perf_counter()
            subprocess.run(command, cwd=folder, capture_output=True, check=False)
            return time.perf_counter() - start

    return timed


def first_step_seconds(command: list[str]) -> Callable[[], float]:
    """A side: seconds from starting cnnlab-train `command`, in a new folder, to its first loss
    line; the run is stopped there (NaN if it ended without one)."""

    def timed() -> float:
        with tempfile.TemporaryDirectory(prefix="cnnlab-bench-") as folder:
            start = time.perf_counter()
            run = subprocess.Popen(
                command, cwd=folder, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
            )
            seconds = math.nan
            for line in run.stdout:
                if line.startswith("Loss after mini-batch"):
                    seconds = time.perf_counter() - start
                    break
            run.send_signal(signal.SIGTERM)  # the run ends KILLED, as on Ctrl-C
            run.communicate(timeout=120)
            return seconds

    return timed


def probe_first_step(store: str, overrides: list[str], mark: Callable[[str], None]) -> None:
    """cnnlab-train's start-up, phase by phase, up to the end of the first training step: run
    by section_startup's probe, with the bench's data `overrides`."""
    cfg = compose_config([*overrides, "hardware=cpu"])
    mark("compose")
    uri, pending_dir = f"sqlite:///{store}", Path(store).parent / "pending"
    with quiet(), closing_run(create_run(uri, "startup", None, {}, pending_dir)) as run:
        run.log_params(flatten(OmegaConf.to_container(cfg)))
        mark("store+run")
        data = load_data(cfg)
        train_split = on_device(data.train, torch.device("cpu"))
        mark("data")
        model, optimizer = build_model(cfg, data, torch.device("cpu"))
        training_step(cfg, model, optimizer, train_split)(torch.arange(cfg.train.batch_size))
        mark("first step")
