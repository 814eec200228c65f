"""System metrics (CPU, memory, GPU) sampled into the run while it trains."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from cnnlab.tracking.run import NullTracker, Tracker
from cnnlab.tracking.store import (
    TrackingError,
)


class SystemMetrics:
    """Samples the machine into the run every `interval` seconds, as `system/<name>` at steps
    `start`, `start` + 1, ...: what the UI's System metrics tab plots.

    MLflow's own collectors take the samples (CPU, memory, disk, network; NVIDIA or AMD GPUs
    where their libraries see one), so the names are the ones the UI knows. Unlike MLflow's
    monitor, which writes to the store itself and gives up when a request fails, the samples go
    through the run's journal, so a slow or lost store delays them like any other metric.
    """

    def __init__(self, run: Tracker, interval: float, start: int = 0) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # Only its collectors are used (the constructor contacts no store): never start()ed.
        self._collectors = SystemMetricsMonitor(run.run_id, tracking_uri=run.uri)
        self.run, self.interval, self.step = run, interval, start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_forever, daemon=True)
        self._thread.start()

    def _sample(self) -> dict[str, float]:
        self._collectors.collect_metrics()
        metrics = self._collectors.aggregate_metrics()
        for collector in self._collectors.monitors:
            collector.clear_metrics()
        return metrics

    def _sample_forever(self) -> None:
        # CPU use is measured from one sample to the next, per thread (psutil): the first
        # sample only starts the clock.
        self._sample()
        while not self._stop.wait(self.interval):
            metrics = self._sample()
            try:
                self.run.log_metrics({f"system/{k}": v for k, v in metrics.items()}, self.step)
            except TrackingError:  # the journal's disk is full: training says so, not this
                return
            self.step += 1

    def stop(self) -> None:
        """Take no more samples (the last one, if being taken, is logged first)."""
        self._stop.set()
        self._thread.join()


@contextmanager
def system_metrics(
    run: Tracker | NullTracker, interval: float | None, resumed: bool = False
) -> Iterator[None]:
    """Sample the machine into `run` every `interval` seconds while the block runs (None: not
    at all); a resumed run's samples continue its steps."""
    if interval is None or not isinstance(run, Tracker):
        yield
        return
    sampler = SystemMetrics(run, interval, run.next_step("system/") if resumed else 0)
    try:
        yield
    finally:
        sampler.stop()
