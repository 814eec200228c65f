"""cnnlab-bench's sweep and search sections: a small sweep on each launcher, where its time
goes; and the shipped hyperparameter search, with and without pruning, and on two workers."""

from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

from cnnlab import CLUSTER_EXTRA, CnnlabError
from cnnlab.bench.harness import alternate, data_overrides
from cnnlab.data.splits import Dataset
from cnnlab.tracking.queries import find_runs, run_record, sweep_children

JOBS = 4  # jobs of the sweep section's sweep
# A sweep's times, from its child runs (see section_sweep): start-up, mean run, per job, tail.
Times = tuple[float, float, float, float]


def section_sweep(cfg: DictConfig, data: Dataset, device: torch.device) -> list[str]:
    """A 4-job sweep (1 epoch each, tracked) on each launcher: wall time, split into what the
    engine costs once and what it costs per job beyond the job's own run.

    From the child runs' MLflow start and end: `start-up` = command start to the first run's
    start (imports, compose, parent run, starting or joining the engine, submission, the first
    job's process, its data); `tail` = the last run's end to the command's exit (summary,
    engine shutdown); `per job` = ((last end - first start) x slots - the runs' summed time) /
    jobs: the slot-seconds each later job spends outside its run (a process, imports, data).
    SLURM is measured where a cluster answers `sinfo` (e.g. `python tests/slurm.py start DIR`);
    Ray starts a Ray of its own unless bench.ray_address names a running head.
    """
    engines = launchers(cfg.bench.ray_address)
    missing = {name: why for name in engines if (why := _engine_missing(name))}
    stats: dict[str, list[Times]] = {name: [] for name in engines}
    common = [
        f"train.seed={','.join(str(seed) for seed in range(1, JOBS + 1))}", "train.epochs=1",
        *data_overrides(cfg), f"hardware.device={device}",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="cnnlab-bench-", ignore_cleanup_errors=True) as tmp:

        def sweep(name: str) -> Callable[[], float]:
            overrides, slots = engines[name]
            return lambda: timed_launcher(name, [*common, *overrides], slots, Path(tmp), stats)

        available = [name for name in engines if name not in missing]
        seconds = alternate(cfg.bench.rounds, {name: sweep(name) for name in available})
    lines = [
        f"Sweep of {JOBS} jobs (1 epoch each, tracked), per launcher; seconds:",
        "  launcher  slots    wall  start-up  mean run  per job  tail",
    ]
    for name, (_, slots) in engines.items():
        if name in missing:
            lines.append(f"  {name:<8}  not measured: {missing[name]}")
            continue
        first, run, per_job, tail = (statistics.median(s) for s in zip(*stats[name], strict=True))
        lines.append(
            f"  {name:<8}  {slots:>5}  {seconds.median(name):6.1f}  {first:8.1f}  "
            f"{run:8.1f}  {per_job:7.1f}  {tail:4.1f}"
        )
    return lines


def launchers(ray_address: str | None) -> dict[str, tuple[list[str], int]]:
    """Each launcher's overrides and slots (jobs it runs at once)."""
    slots = min(2, os.cpu_count() or 1)
    if ray_address:
        ray = ["hydra/launcher=ray", f"hydra.launcher.ray.init.address={ray_address}"]
    else:  # "local": a new Ray even where $RAY_ADDRESS or a `ray start` cluster exists
        ray = ["hydra/launcher=ray", "hydra.launcher.ray.init.address=local",
               f"+hydra.launcher.ray.init.num_cpus={slots}"]  # fmt: skip
    return {
        "basic": ([], 1),
        "joblib": (["hydra/launcher=joblib", f"hydra.launcher.n_jobs={slots}"], slots),
        "slurm": (["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1"], slots),
        "ray": (ray, _ray_cpus(ray_address) if ray_address else slots),
    }


def timed_launcher(
    name: str, overrides: list[str], slots: int, folder: Path, stats: dict[str, list[Times]]
) -> float:
    """Wall seconds of the sweep on launcher `name`; its Times appended to stats[name]."""
    uri, start, wall = timed_sweep(f"the {name} sweep", overrides, folder)
    runs = [(c["start"], c["end"]) for c in sweep_children(uri, "cnnlab") if c["end"]]
    if len(runs) != JOBS:
        raise CnnlabError(f"the {name} sweep logged {len(runs)} finished runs of {JOBS}")
    first, last = min(s for s, _ in runs), max(e for _, e in runs)
    in_runs = sum(e - s for s, e in runs)
    per_job = ((last - first) * slots - in_runs) / JOBS
    stats[name].append((first - start, in_runs / JOBS, per_job, start + wall - last))
    return wall


def section_search(cfg: DictConfig, data: Dataset, device: torch.device) -> list[str]:
    """hparams_search=optuna_convnet as shipped (20 TPE trials, sampler seed 42, over lr,
    batch size and optimizer; 1 epoch each; 5000 training images held out to select on),
    untracked models, once per side: without pruning and with the median pruner, mini-batches
    trained, wall time, the best trial's validation accuracy and its test accuracy. Then the
    pruned search on joblib with 2 workers, trials launched in blocking pairs (as
    hydra-optuna-sweeper does) and each as soon as a slot frees: wall time.

    Each search runs once (a search is minutes; its trials are its own repetitions).
    """
    joblib = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    sides = {
        "no pruning": ["hydra.sweeper.pruner=none"],
        "median pruner": ["hydra.sweeper.pruner=median"],
        "joblib x2, batched": [*joblib, "hydra.sweeper.batched=true"],
        "joblib x2, no wait": joblib,
    }
    common = [
        "hparams_search=optuna_convnet", *data_overrides(cfg), f"hardware.device={device}",
        f"hardware.threads={cfg.hardware.threads}", "tracking.log_model=false",
    ]  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory(prefix="cnnlab-bench-", ignore_cleanup_errors=True) as tmp:
        for name, overrides in sides.items():
            uri, _, wall = timed_sweep(f"the {name} search", [*common, *overrides], Path(tmp))
            [parent] = find_runs(uri, "cnnlab", "cnnlab.role", "sweep")
            results[name] = (run_record(uri, parent)["metrics"], wall)
    return search_lines(results)


def search_lines(results: dict[str, tuple[dict[str, float], float]]) -> list[str]:
    """The search section's lines from each side's (search metrics, wall seconds)."""
    lines = [
        "Search: hparams_search=optuna_convnet (20 trials of 1 epoch, TPE seed 42):",
        "  search               mini-batches  pruned    wall  best val acc  its test acc",
    ]
    for name, (m, wall) in results.items():
        lines.append(
            f"  {name:<20} {m['search_minibatches']:12.0f}  {m['search_pruned']:6.0f}  "
            f"{wall:5.0f} s  {m['best_val_accuracy']:11.2%}  {m['best_test_accuracy']:12.2%}"
        )
    full, pruned = results["no pruning"][0], results["median pruner"][0]
    share = pruned["search_minibatches"] / full["search_minibatches"]
    gap = (pruned["best_val_accuracy"] - full["best_val_accuracy"]) * 100
    waits = results["joblib x2, batched"][1] / results["joblib x2, no wait"][1]
    return [
        *lines,
        f"  pruned / unpruned mini-batches: {share:.2f} (target <= 0.33); pruned best val acc "
        f"{gap:+.2f} points from the unpruned best (target >= -0.5)",
        f"  joblib x2: batched / no-wait wall time: {waits:.2f}",
    ]


def timed_sweep(what: str, overrides: list[str], parent: Path) -> tuple[str, float, float]:
    """Run `cnnlab-train -m overrides` in a new folder in `parent`, into a new SQLite store
    there: (the store's URI, start time, wall seconds); a CnnlabError naming `what` if it
    fails."""
    folder = Path(tempfile.mkdtemp(prefix="sweep-", dir=parent))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    command = [Path(sys.executable).with_name("cnnlab-train"), "-m", *overrides,
               f"tracking.uri={uri}"]  # fmt: skip
    start = time.time()
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    if done.returncode:
        raise CnnlabError(f"{what} failed: {done.stderr.strip()[-500:]}{_first_job_error(uri)}")
    return uri, start, time.time() - start


def _first_job_error(uri: str) -> str:
    """ "; a job failed: <its cnnlab.error>" from the sweep's store at `uri`, or "" (the store
    goes with the bench's scratch folder: the error is said here or nowhere)."""
    try:
        errors = [c["error"] for c in sweep_children(uri, "cnnlab") if c["error"]]
    except Exception:  # no store, or no sweep in it: the command's own error says why
        return ""
    return f"; a job failed: {errors[0][:1000]}" if errors else ""


def _ray_cpus(address: str) -> int:
    """The CPUs of the Ray cluster at `address`: the jobs it runs at once (1 CPU each)."""
    import ray  # only for this question; cnnlab-bench does not need Ray otherwise

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        return int(ray.cluster_resources().get("CPU", 1))
    finally:
        ray.shutdown()


def _engine_missing(name: str) -> str | None:
    """Why launcher `name` can't be measured here, or None."""
    needs = {"slurm": "hydra_plugins.hydra_submitit_launcher", "ray": "ray"}
    if name in needs and importlib.util.find_spec(needs[name]) is None:
        return f"not installed: {CLUSTER_EXTRA}"
    if name == "slurm":
        try:
            state = subprocess.run(
                ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"no SLURM cluster answers sinfo ({type(exc).__name__})"
        if state.returncode or not {"idle", "mix"} & set(state.stdout.split()):
            return "no idle SLURM node (sinfo); start one: python tests/slurm.py start DIR"
    return None
