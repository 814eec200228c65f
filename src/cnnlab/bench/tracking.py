"""cnnlab-bench's tracking section: what MLflow logging costs a run, and how long the training
thread waits on it, against a local store and a slow tracking server; and TimedTracker, the
run writer's stand-in that clocks those waits."""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from cnnlab.bench.harness import Rounds, alternate, one_epoch_run, quiet
from cnnlab.bench.servers import MlflowServer, Proxy
from cnnlab.data.splits import Dataset
from cnnlab.tracking.lifecycle import AnyTracker
from cnnlab.tracking.run import create_run

# The writer's methods that are timed, by kind: `loop` is what the epoch loop calls, `start`
# what logs the new run's params and config, `model` the model's export, `end` the run's close
# (it waits until the store has every write).
KINDS = {
    "log_metrics": "loop", "log_checkpoint": "loop", "log_model": "model", "end": "end",
    "log_params": "start", "log_dict": "start", "log_artifacts": "start",
}  # fmt: skip


class TimedTracker:
    """A run's writer (Tracker or NullTracker) that adds the seconds the training thread spends
    in its KINDS methods to `spent` (by kind, and `loop_max`: the epoch loop's slowest call).

    Made by cnnlab.train.train's `wrap_run` hook, on the training thread, right after the run is
    created (or attached): run creation itself is not seen. Every attribute is the wrapped
    writer's (__getattr__); calls from other threads (the system-metrics sampler's) are passed
    on untimed, as they do not hold up training. The benchmark's own instrument: training code
    keeps no clocks.
    """

    def __init__(self, run: AnyTracker, spent: dict[str, float]) -> None:
        self._run, self._spent = run, spent
        self._thread = threading.get_ident()

    @property
    def __class__(self) -> type:
        # isinstance() falls back on __class__: checks such as system_metrics' isinstance(run,
        # Tracker) see the wrapped writer's class, so wrapping changes what a run does in nothing.
        return type(self._run)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._run, name)
        kind = KINDS.get(name)
        if kind is None or not callable(attr):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != self._thread:
                return attr(*args, **kwargs)
            start = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                took = time.perf_counter() - start
                self._spent[kind] += took
                if kind == "loop":  # the last is the last epoch's checkpoint
                    self._spent["loop_max"] = max(self._spent["loop_max"], took)
                    self._spent["last_loop_at"] = time.perf_counter()
                elif kind == "end":  # the run is FINISHED when end returns
                    self._spent["ended_at"] = time.perf_counter()

        return timed


def timed_epoch(
    cfg: DictConfig, folder: Path, uri: str, enabled: bool = True
) -> tuple[float, dict[str, float]]:
    """(seconds, logging seconds by kind and `total`) of a quiet 1-epoch run logging to `uri`
    (`enabled` false: tracking off, nothing wrapped); its unsent writes wait in `folder`."""
    spent = dict.fromkeys(("start", "loop", "loop_max", "model", "end"), 0.0)
    tracking = {"enabled": enabled, "uri": uri, "pending_dir": str(folder / "pending")}
    wrap = (lambda run: TimedTracker(run, spent)) if enabled else None
    seconds = one_epoch_run(cfg, tracking, wrap)
    spent["total"] = spent["start"] + spent["loop"] + spent["model"] + spent["end"]
    # From the last epoch's checkpoint to FINISHED: the model, the figures, the last deliveries.
    spent["after_training"] = spent.pop("ended_at", 0.0) - spent.pop("last_loop_at", 0.0)
    return seconds, spent


def section_tracking(cfg: DictConfig, data: Dataset, device: torch.device) -> list[str]:
    """Wall time of a 1-epoch run with MLflow logging on and off; how long the training thread
    waits on logging, against a local store and against a tracking server that answers each
    request in 200 ms."""
    with tempfile.TemporaryDirectory(prefix="cnnlab-bench-") as tmp:
        folder = Path(tmp)
        local = f"sqlite:///{folder / 'mlflow.db'}"
        waits: list[dict[str, float]] = []

        def one_epoch(enabled: bool) -> Callable[[], float]:
            def measure() -> float:
                seconds, spent = timed_epoch(cfg, folder, local, enabled)
                if enabled:
                    waits.append(spent)
                return seconds

            return measure

        with quiet():  # the store first: no run pays its creation
            create_run(local, cfg.tracking.experiment, "store", {}, folder / "pending").end(
                "FINISHED"
            )
        first = timed_epoch(cfg, folder, local)[1]  # with torch.export's one-off set-up
        seconds = alternate(cfg.bench.rounds, {"on": one_epoch(True), "off": one_epoch(False)})
        steady = {k: statistics.median(w[k] for w in waits) for k in waits[0]}
        slow = {}  # server delay -> (whole run's seconds, logging seconds by kind)
        with MlflowServer(folder / "server") as server:
            for delay in cfg.bench.server_delays:
                with Proxy(server.port, delay=delay, keep_requests=False) as slow_server:
                    slow[delay] = timed_epoch(cfg, folder, slow_server.url)
    batches = len(data.train) // cfg.train.batch_size
    return [
        *tracking_lines(cfg, batches, seconds, steady, first),
        *slow_server_lines(seconds.median("on"), steady, slow),
    ]


def tracking_lines(
    cfg: DictConfig,
    batches: int,
    seconds: Rounds,
    steady: dict[str, float],
    first: dict[str, float],
) -> list[str]:
    """The tracking section's lines on the local store: `seconds` of the runs with tracking "on"
    and "off", the logging waits of the steady state and of the process's first run."""
    off = seconds.median("off")
    in_loop = "log_metrics + log_checkpoint"
    return [
        f"MLflow logging, 1-epoch run (params, {batches // cfg.train.log_every} losses, test "
        "metrics, checkpoint, model):",
        f"  tracking off {off:7.2f} s",
        f"  tracking on  {seconds.median('on'):7.2f} s   "
        f"overhead {seconds.ratio('on', 'off') - 1:+.1%} (on vs off)",
        "  time the training thread spent in logging calls (local SQLite store, steady state):",
        f"    in the epoch loop ({in_loop}) {steady['loop']:.3f} s = {steady['loop'] / off:.2%}"
        f" of the run; max {steady['loop_max'] * 1000:.1f} ms for one call",
        # `start` no longer holds creating the run (one request to the store, made before
        # train() hands the writer to TimedTracker): only the params and config logged after.
        f"    params + config {steady['start']:.2f} s, model export {steady['model']:.2f} s, "
        f"end (wait for delivery) {steady['end']:.2f} s; total {steady['total']:.2f} s = "
        f"{steady['total'] / off:.1%}",
        f"    a process's first run: total {first['total']:.2f} s = {first['total'] / off:.1%}"
        " (the model's first torch.export)",
    ]


def slow_server_lines(
    local: float, steady: dict[str, float], slow: dict[float, tuple[float, dict[str, float]]]
) -> list[str]:
    """The same run against an mlflow server that answers each request after `delay` seconds:
    its wall time against the local store's (`local`), its last epoch to FINISHED, and the
    longest the epoch loop waited on one logging call."""
    lines = [
        "  the same run against an mlflow server on loopback answering each request after a delay:",
        f"    local store      whole run {local:7.2f} s; last epoch to FINISHED "
        f"{steady['after_training']:6.2f} s",
    ]
    for delay, (seconds, spent) in slow.items():
        lines.append(
            f"    {delay:g} s a request{' ' * max(0, 5 - len(f'{delay:g}'))}whole run "
            f"{seconds:7.2f} s = {seconds / local:.1f}x; last epoch to FINISHED "
            f"{spent['after_training']:6.2f} s; epoch loop max {spent['loop_max'] * 1000:.1f} ms "
            "for one call"
        )
    return lines
