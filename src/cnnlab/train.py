"""cnnlab-train: compose the config, train the model, log the run to MLflow.

cnnlab-train                                  # the article's run
cnnlab-train optimizer=sgd train.epochs=2     # any key can be overridden
cnnlab-train -m optimizer.lr=1e-3,1e-4        # a sweep, under multirun/
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cnnlab import CnnlabError, __version__, checkpoint, schema, sweep
from cnnlab.checkpoint import Progress
from cnnlab.data import Dataset, Split, load_dataset
from cnnlab.loop import TrainingInterrupted, evaluate, train_one_epoch
from cnnlab.step import TrainStep, check_cuda_graphs, flat_parameters
from cnnlab.sweep import failure_is_a_value, in_sweep, job_tags
from cnnlab.tracking import (
    NullTracker,
    Tracker,
    attach_run,
    check_reachable,
    closing_run,
    resolve_uri,
    run_config,
    start_run,
)

# An installed wheel carries conf/ inside the package; a source checkout (pip install -e) reads
# the top-level conf/ so that edits there take effect at once.
_PACKAGED_CONF = Path(__file__).with_name("conf")
CONF_DIR = str(_PACKAGED_CONF if _PACKAGED_CONF.is_dir() else Path(__file__).parents[2] / "conf")

schema.register()
_DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, before any job changes it


def train(cfg: DictConfig, extra_tags: dict[str, str] | None = None) -> float:
    """Train the configured model and log the run; return the final test accuracy."""
    uri = resolve_uri(cfg.tracking.uri, Path.cwd())
    if cfg.tracking.enabled or cfg.train.resume:
        check_reachable(uri)  # seconds, not a whole epoch, to learn the server is down
    if cfg.train.resume:
        cfg = resumed_config(cfg.train.resume, uri)  # the run's own config, not today's conf/
    schema.validate(cfg)
    # hardware.threads=0 keeps torch's default, which in a joblib launcher's worker is already
    # cores // parallel jobs: joblib's loky workers start with OMP_NUM_THREADS set to it.
    device = setup_hardware(cfg.hardware, cfg.hardware.threads)

    data = load_dataset(**cfg.data)
    train_split, test_split = data.train.to(device), data.test.to(device)

    model, optimizer = build_model(cfg, data, device)

    with open_run(cfg, uri, device, data.checksum, extra_tags, model, optimizer) as (run, at):
        accuracy = fit(cfg, model, optimizer, train_split, test_split, run, at)
        if cfg.tracking.log_model:
            example = data.test.images[:2].numpy()  # (2, C, H, W): the input the model expects
            model_uri = run.log_model(model, example, requirements())
            run.set_tags({"cnnlab.model_uri": model_uri})
    print("Training process has finished.")
    return accuracy


def build_model(
    cfg: DictConfig, data: Dataset, device: torch.device
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The seeded model on `device`, and its optimizer over one flat parameter buffer."""
    torch.manual_seed(cfg.train.seed)  # the article seeds right before the model initialises
    model = instantiate(cfg.model, in_shape=data.in_shape, num_classes=data.num_classes)
    model = model.to(device)
    optimizer = instantiate(cfg.optimizer, _convert_="all")([flat_parameters(model)])
    return model, optimizer


def fit(
    cfg: DictConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_split: Split,
    test_split: Split,
    run: Tracker | NullTracker,
    at: Progress,
) -> float:
    """Train the epochs from `at` on, logging as it goes; checkpoint each epoch and on a stop."""
    batches_per_epoch = -(-len(train_split) // cfg.train.batch_size)
    accuracy = math.nan
    if at.epoch >= cfg.train.epochs:  # a resumed run that had trained every epoch already
        accuracy = evaluate(model, test_split, cfg.train.eval_batch_size)[1]
    show_bar = sys.stderr.isatty()
    step = TrainStep(model, optimizer, train_split, cfg.train.batch_size, cfg.hardware.cuda_graphs)
    with stop_requests() as stop, tempfile.TemporaryDirectory() as tmp:
        last = Path(tmp) / "last.pt"
        for epoch in range(at.epoch, cfg.train.epochs):
            resuming = f" (resuming at mini-batch {at.batch + 1})" if at.batch else ""
            print(f"Starting epoch {epoch + 1}{resuming}")
            torch.set_rng_state(at.rng)  # an epoch cut short re-draws the same order
            try:
                for batch, loss in train_one_epoch(
                    step, cfg.train.log_every, show_bar, at.batch, at.running, stop
                ):
                    print(f"Loss after mini-batch {batch:5d}: {loss:.3f}")
                    run.log_metrics({"train_loss": loss}, step=epoch * batches_per_epoch + batch)
            except TrainingInterrupted as cut:
                checkpoint.save(last, model, optimizer, Progress(epoch, *cut.args_for_resume()))
                run.log_checkpoint(last)
                raise KeyboardInterrupt from None  # the run ends KILLED, resumable
            test_loss, accuracy = evaluate(model, test_split, cfg.train.eval_batch_size)
            print(f"Epoch {epoch + 1}: test loss {test_loss:.4f}, test accuracy {accuracy:.2%}")
            run.log_metrics(
                {"test_loss": test_loss, "test_accuracy": accuracy, "epoch": epoch + 1},
                step=(epoch + 1) * batches_per_epoch,
            )
            at = Progress(epoch + 1)  # next epoch from its first batch, RNG as it is now
            checkpoint.save(last, model, optimizer, at)
            run.log_checkpoint(last)
    return accuracy


@contextmanager
def open_run(
    cfg: DictConfig,
    uri: str,
    device: torch.device,
    data_checksum: str,
    extra_tags: dict[str, str] | None,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> Iterator[tuple[Tracker | NullTracker, Progress]]:
    """A new run with its params and config logged, or the resumed run at its checkpoint."""
    if cfg.train.resume:
        run = attach_run(uri, cfg.train.resume)
        with tempfile.TemporaryDirectory() as tmp:
            path = run.download("checkpoints/last.pt", Path(tmp))
            if path is None:
                raise CnnlabError(f"run {run.run_id} has no checkpoint to resume from")
            at = checkpoint.load(path, model, optimizer)
        if at.epoch >= cfg.train.epochs and run.status() == "FINISHED":
            raise CnnlabError(f"run {run.run_id} already trained all {cfg.train.epochs} epochs")
        # (Killed after its last epoch, e.g. while logging the model: fit has nothing left to
        # train, and the run is finished below.)
        run.skip_logged_steps(["train_loss", "test_loss", "test_accuracy", "epoch"])
        run.set_running()  # also after a SIGKILL left it RUNNING
        with closing_run(run):
            yield run, at
        return
    tags = {**run_tags(cfg, device, data_checksum), **(extra_tags or {})}
    sweep_tags, job_name = job_tags()
    tags.update(sweep_tags)
    run_name = cfg.tracking.run_name or job_name
    with start_run(uri, cfg.tracking.experiment, run_name, tags, cfg.tracking.enabled) as run:
        run.log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
        log_config_artifacts(run, cfg)
        yield run, Progress()  # RNG state now: right after the model's initialisation


# What a resume may change of the logged config: where it runs and where the data is.
_RESUME_MAY_CHANGE = ("hardware.", "data.root=", "tracking.uri=", "train.resume=")


def resumed_config(run_id: str, uri: str) -> DictConfig:
    """The config run `run_id` logged, set to continue that run in the store at `uri`."""
    # hardware=cpu (a group) means hardware.device=cpu: the options are named after devices.
    overrides = [
        o.replace("hardware=", "hardware.device=", 1) if o.startswith("hardware=") else o
        for o in command_line_overrides()
    ]
    other = [o for o in overrides if not o.startswith(_RESUME_MAY_CHANGE)]
    if other:
        raise CnnlabError(
            f"train.resume continues the logged config; {other[0]} can't change it (only "
            "hardware.*, data.root and tracking.uri can); use cnnlab-reproduce for a new run"
        )
    kept = [o for o in overrides if not o.startswith(("tracking.uri=", "train.resume="))]
    cfg = schema.typed_config(run_config(uri, run_id), kept)
    cfg.train.resume = run_id
    cfg.tracking.uri = uri
    return cfg


@contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
    """Ctrl-C and SIGTERM ask training to stop at the next mini-batch and checkpoint.

    A second Ctrl-C stops at once. Outside the main thread signals can't be caught; then
    nothing is installed and stops are never requested.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    requested: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        print("Stopping after this mini-batch to save a checkpoint...", file=sys.stderr)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(requested)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def setup_hardware(hardware: DictConfig, threads: int = 0) -> torch.device:
    """Apply threads (0: torch's default) and determinism; return the device to train on."""
    # Set both ways every time: jobs of a sweep share this process.
    torch.set_num_threads(threads or _DEFAULT_THREADS)
    if hardware.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; harmless on the CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(bool(hardware.deterministic))
    name = hardware.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CnnlabError(
            f"hardware.device={name} but no CUDA GPU is visible; use hardware=cpu or hardware=auto"
        )
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # streams, graphs and libraries then use this GPU too
    if hardware.cuda_graphs:
        check_cuda_graphs(device)  # now, not after the data is read and the run created
    return device


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay whole values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def run_tags(cfg: DictConfig, device: torch.device, data_checksum: str) -> dict[str, str]:
    """Tags that say what ran: code version, libraries, device, data and overrides."""
    commit, dirty = git_state(Path(__file__).parent)
    return {
        "mlflow.source.git.commit": commit,
        "cnnlab.git_dirty": dirty,
        "cnnlab.version": __version__,
        "cnnlab.torch_version": torch.__version__,
        "cnnlab.device": str(device),
        "cnnlab.dataset": cfg.data.name,
        "cnnlab.dataset_md5": data_checksum,
        "cnnlab.overrides": " ".join(command_line_overrides()),
    }


def git_state(path: Path) -> tuple[str, str]:
    """(commit, "true"/"false" dirty) of the checkout holding `path`, or ("unknown", "unknown")."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        status = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    return commit, str(bool(status.strip())).lower()


def command_line_overrides() -> list[str]:
    """The overrides this job was launched with ([] outside a Hydra app, e.g. in tests)."""
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def log_config_artifacts(run: Any, cfg: DictConfig) -> None:
    """Resolved config, overrides and Hydra's own config: what a reproduction reads back."""
    run.log_dict(OmegaConf.to_container(cfg, resolve=True), "config/config.yaml")
    run.log_dict(command_line_overrides(), "config/overrides.yaml")
    if HydraConfig.initialized() and HydraConfig.get().output_subdir is not None:
        hydra_dir = Path(HydraConfig.get().runtime.output_dir) / HydraConfig.get().output_subdir
        if hydra_dir.is_dir():
            run.log_artifacts(hydra_dir, "hydra")


def requirements() -> list[str]:
    """What the logged model needs to load: the torch it was saved with."""
    return [f"torch=={torch.__version__.split('+')[0]}"]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    """The Hydra task: one job of a run or a sweep."""
    try:
        return train(cfg)
    except Exception as exc:
        if isinstance(exc.__cause__, CnnlabError):  # e.g. a model's error inside instantiate()
            exc = exc.__cause__
        if in_sweep():  # the run is already marked FAILED with the reason; the sweep goes on
            sweep.record_failure(exc)
            print(f"cnnlab-train: job failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            if failure_is_a_value():
                return float("nan")
            raise
        if isinstance(exc, CnnlabError):  # here, not in main(), so Hydra adds no report
            sys.exit(f"cnnlab-train: error: {exc}")
        raise


def run_cli(prog: str, hydra_task: Callable[[], Any]) -> None:
    """Run a @hydra.main task so that a config error ends with one line and exit status 1."""
    # Hydra would print its own multi-line report; let errors reach us to print one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_task()
        sweep.end_open_parent("FAILED")  # only if the sweep ended without its summary
        if failed := sweep.failed_jobs():
            sys.exit(
                f"{prog}: error: {len(failed)} sweep job(s) failed: {'; '.join(failed)}; "
                "the reasons are in their runs' cnnlab.error tag and the multirun folder"
            )
    except (HydraException, OmegaConfBaseException) as exc:
        sweep.end_open_parent("FAILED")
        sys.exit(f"{prog}: error: {schema.describe_config_error(exc)}")
    except KeyboardInterrupt:
        sweep.end_open_parent("KILLED")
        print(f"{prog}: interrupted; an open run is marked KILLED", file=sys.stderr)
        sys.exit(130)


def main() -> None:
    """Console entry point of cnnlab-train."""
    run_cli("cnnlab-train", hydra_main)


if __name__ == "__main__":
    main()
