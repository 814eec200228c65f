"""cnnlab-bench's ui section: what the MLflow UI's extras (the figures of a run's predictions,
the system metrics) add to a tracked run."""

from __future__ import annotations

import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

from cnnlab.bench.harness import alternate, one_epoch_run
from cnnlab.data.preprocess import on_device
from cnnlab.data.splits import Dataset
from cnnlab.tracking.figures import prediction_figures
from cnnlab.tracking.queries import find_runs, metric_history
from cnnlab.training.fit import build_model
from cnnlab.training.loop import predicted


def section_ui(cfg: DictConfig, data: Dataset, device: torch.device) -> list[str]:
    """What the UI's extras add to a 1-epoch tracked run: the figures (predictions on the test
    split, three PNGs) and the system metrics (a sample every tracking.system_metrics_interval
    seconds), each alone against a run with neither; and the figures' own time."""
    with tempfile.TemporaryDirectory(prefix="cnnlab-bench-ui-") as tmp:
        folder = Path(tmp)
        uri = f"sqlite:///{folder / 'mlflow.db'}"

        def one_epoch(name: str, figures: bool, system: bool) -> Callable[[], float]:
            return lambda: one_epoch_run(cfg, {
                "enabled": True, "uri": uri, "pending_dir": str(folder / "pending"),
                "log_figures": figures, "system_metrics": system, "run_name": name,
            })  # fmt: skip

        one_epoch("warm-up", False, False)()  # the store, torch.export's first model: paid once
        seconds = alternate(cfg.bench.rounds, {
            "neither": one_epoch("neither", False, False),
            "figures": one_epoch("figures", True, False),
            "system metrics": one_epoch("system", False, True),
        })  # fmt: skip
        system_run = find_runs(uri, cfg.tracking.experiment, "mlflow.runName", "system")[0]
        samples = len(metric_history(uri, system_run, "system/cpu_utilization_percentage"))
    making = figure_seconds(cfg, data, device)
    neither = seconds.median("neither")
    return [
        f"MLflow UI extras, 1-epoch tracked run ({len(data.test)} test images):",
        f"  neither          {neither:7.2f} s",
        f"  figures          {seconds.median('figures'):7.2f} s   overhead "
        f"{seconds.ratio('figures', 'neither') - 1:+.1%}; making them alone "
        f"{making:.2f} s (test-split predictions + 3 PNGs)",
        f"  system metrics   {seconds.median('system metrics'):7.2f} s   overhead "
        f"{seconds.ratio('system metrics', 'neither') - 1:+.1%}; {samples} samples in the last "
        f"run (every {cfg.tracking.system_metrics_interval:g} s)",
    ]


def figure_seconds(cfg: DictConfig, data: Dataset, device: torch.device) -> float:
    """Median seconds, over bench.rounds, of making a run's figures: an untrained model's
    predictions on the test split, drawn and saved as PNGs."""
    model, _ = build_model(cfg, data, device)
    test = on_device(data.test, device)
    times = []
    for _ in range(cfg.bench.rounds):
        start = time.perf_counter()
        guesses = predicted(model, test, cfg.train.eval_batch_size)
        for figure in prediction_figures(data.test.images, data.test.labels, guesses,
                                         data.classes).values():  # fmt: skip
            figure.savefig(io.BytesIO(), format="png", dpi=100)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
