"""cnnlab-bench: how fast cnnlab trains, measured against the article's own loop.

    cnnlab-bench data.root=../shared/data                 # every section, on this machine
    cnnlab-bench bench.sections=[article] hardware=cuda   # one section, on a GPU

Each comparison alternates its sides for bench.rounds rounds in one process, so machine noise
hits both alike; it reports each side's median and the median of the per-round ratios. The
article's side is its script's loop: torchvision MNIST with ToTensor, a shuffled DataLoader with
one worker, Adam, a .item() per step.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from cnnlab import CLUSTER_EXTRA, CnnlabError
from cnnlab import train as train_module
from cnnlab.config.compose import CONF_DIR, compose_config, launch_path
from cnnlab.config.validate import validate
from cnnlab.data.load import data_arguments, load_dataset
from cnnlab.data.preprocess import FLOAT_BUDGET, on_device, to_float
from cnnlab.data.splits import Dataset, Split
from cnnlab.models import article as reference
from cnnlab.models.article import article_training
from cnnlab.models.networks import ConvNet, build_network
from cnnlab.tracking.figures import prediction_figures
from cnnlab.tracking.provenance import flatten
from cnnlab.tracking.queries import find_runs, metric_history, run_record, sweep_children
from cnnlab.tracking.run import Tracker, closing_run, create_run
from cnnlab.tracking.store import check_reachable
from cnnlab.train import train
from cnnlab.training.fit import build_model, training_step
from cnnlab.training.hardware import setup_hardware
from cnnlab.training.loop import predicted, train_one_epoch
from cnnlab.training.step import flat_parameters, optimizer_step


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
    _sync(device)
    start = time.perf_counter()
    model, optimizer = build_model(cfg, data, device)
    losses = []
    step = training_step(cfg, model, optimizer, train_split)
    for batch, loss in train_one_epoch(step, cfg.train.log_every):
        losses.append(loss)
        if batch >= batches:
            break
    _sync(device)
    return losses, time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quiet() -> contextlib.AbstractContextManager:
    """Silence stdout while a measured run prints its progress."""
    return contextlib.redirect_stdout(io.StringIO())


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


# ------------------------------------------------------------------------------------- sections
def section_article(cfg: DictConfig, data: Dataset, device: torch.device) -> list[str]:
    """Samples/s of the article's loop against cnnlab's default loop, same batches.

    On a GPU a third side replays cnnlab's step as a CUDA graph (hardware.cuda_graphs=true).
    """
    batches = cfg.bench.batches - cfg.bench.batches % cfg.train.log_every or cfg.train.log_every
    seen: dict[str, list[float]] = {}

    def side(name: str, fn: Callable[[], tuple[list[float], float]]) -> Callable[[], float]:
        def measure() -> float:
            losses, seconds = fn()
            seen[name] = losses
            return batches * 10 / seconds

        return measure

    root = launch_path(cfg.data.root)
    runs = {
        "article": lambda: article_training(root, batches, 500, device),
        "cnnlab": lambda: cnnlab_training(cfg, data, batches, device),
    }
    if device.type == "cuda" and not cfg.hardware.cuda_graphs:
        graphed = OmegaConf.merge(cfg, {"hardware": {"cuda_graphs": True}})
        runs["cnnlab + CUDA graph"] = lambda: cnnlab_training(graphed, data, batches, device)
    sides = {name: side(name, run) for name, run in runs.items()}
    rounds = alternate(cfg.bench.rounds, sides)
    epochs_5 = 5 * len(data.train)  # the article's whole run
    lines = [
        f"article loop vs cnnlab default ({batches} mini-batches of 10, {device}):",
        f"  {'article':20s} {rounds.median('article'):9.0f} samples/s"
        f"   article's 5 epochs {epochs_5 / rounds.median('article'):7.1f} s",
    ]
    for name in list(sides)[1:]:
        diff = max(abs(a - b) for a, b in zip(seen["article"], seen[name], strict=True))
        lines += [
            f"  {name:20s} {rounds.median(name):9.0f} samples/s   article's 5 epochs "
            f"{epochs_5 / rounds.median(name):7.1f} s   ratio {rounds.ratio(name, 'article'):.2f}x",
            f"  {'':20s} losses every 500 batches: max |difference| {diff:.2e} "
            f"over {len(seen[name])} values",
        ]
    return lines


def section_step(cfg: DictConfig, data: Dataset, device: torch.device) -> list[str]:
    """Steps/s of the article's training step as each of cnnlab's fast paths is added, and of
    torch's own Adam fast paths; for each, whether the weights stay the article's bit for bit.

    Every side trains the article's network with Adam 1e-4 on the same batches from the same
    seed, in the same plain loop, so only the model and the optimizer differ.
    """
    batch, steps = cfg.train.batch_size, cfg.bench.batches
    images, labels = to_float(data.train.images.to(device)), data.train.labels.to(device)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0)).to(device)
    weights: dict[str, list[torch.Tensor]] = {}

    def side(name: str, network: type, flat: bool, adam: dict, lean: bool) -> Callable[[], float]:
        def measure() -> float:
            torch.manual_seed(cfg.train.seed)
            model = network().to(device)
            params = [flat_parameters(model)] if flat else model.parameters()
            optimizer = torch.optim.Adam(params, lr=1e-4, **adam)
            update = optimizer_step(optimizer) if lean else optimizer.step
            _sync(device)
            start = time.perf_counter()
            for i in range(steps):
                idx = order[(i * batch) % (len(order) - batch + 1) :][:batch]
                optimizer.zero_grad(set_to_none=not flat)  # flat: grads must stay views
                F.cross_entropy(model(images[idx]), labels[idx]).backward()
                update()
            _sync(device)
            seconds = time.perf_counter() - start
            weights[name] = [p.detach().clone() for p in model.parameters()]
            return steps / seconds

        return measure

    base = "article's step"
    variants = [  # name, network, flat parameter, Adam's fast-path flags, cnnlab's lean update
        (base, reference.ConvNet, False, {}, False),
        ("+ in-place ReLU", ConvNet, False, {}, False),
        ("+ flat parameter", ConvNet, True, {}, False),
        ("+ lean Adam (cnnlab)", ConvNet, True, {}, True),
        ("flat, foreach=True", ConvNet, True, {"foreach": True}, False),
        ("flat, fused=True", ConvNet, True, {"fused": True}, False),
    ]
    rounds = alternate(cfg.bench.rounds, {name: side(name, *how) for name, *how in variants})
    lines = [f"Training step, article's network and Adam, batch {batch}, {steps} steps, {device}:"]
    for name, *_ in variants:
        diff = max(
            (a - b).abs().max().item() for a, b in zip(weights[name], weights[base], strict=True)
        )
        same = "bit-identical" if diff == 0 else f"max |difference| {diff:.1e}"
        lines.append(
            f"  {name:22s} {rounds.median(name):7.0f} steps/s  "
            f"{rounds.ratio(name, base):5.2f}x   weights vs the article's: {same}"
        )
    return lines


def one_epoch_run(cfg: DictConfig, tracking: dict[str, Any]) -> float:
    """Seconds of a quiet 1-epoch cnnlab-train run of `cfg` with these tracking.* settings."""
    run_cfg = OmegaConf.merge(cfg, {"train": {"epochs": 1}, "tracking": tracking})
    start = time.perf_counter()
    with _quiet():
        train(run_cfg)
    return time.perf_counter() - start


def section_tracking(cfg: DictConfig, data: Dataset, device: torch.device) -> list[str]:
    """Wall time of a 1-epoch run with MLflow logging on and off; how long the training thread
    waits on logging, against a local store and against a tracking server that answers each
    request in 200 ms."""
    folder = Path(tempfile.mkdtemp(prefix="cnnlab-bench-"))
    local = f"sqlite:///{folder / 'mlflow.db'}"
    waits: list[dict[str, float]] = []

    def one_epoch(enabled: bool, uri: str = local) -> Callable[[], float]:
        def measure() -> float:
            with time_on_training_thread() as spent:
                seconds = one_epoch_run(cfg, {"enabled": enabled, "uri": uri,
                                              "pending_dir": str(folder / "pending")})  # fmt: skip
            if enabled:
                waits.append(spent)
            return seconds

        return measure

    with _quiet():  # the store first: no run pays its creation
        create_run(local, cfg.tracking.experiment, "store", {}, folder / "pending").end("FINISHED")
    one_epoch(True)()
    first = waits.pop()  # includes torch.export's one-off set-up, paid once per process
    seconds = alternate(cfg.bench.rounds, {"on": one_epoch(True), "off": one_epoch(False)})
    steady = {k: statistics.median(w[k] for w in waits) for k in waits[0]}
    waits.clear()
    with slow_tracking_server(folder / "server", delay=0.2) as slow_uri:
        slow_seconds = one_epoch(True, slow_uri)()
    slow = waits.pop()
    off = seconds.median("off")
    in_loop = "log_metrics + log_checkpoint"
    batches = len(data.train) // cfg.train.batch_size
    return [
        f"MLflow logging, 1-epoch run (params, {batches // cfg.train.log_every} losses, test "
        "metrics, checkpoint, model):",
        f"  tracking off {off:7.2f} s",
        f"  tracking on  {seconds.median('on'):7.2f} s   "
        f"overhead {seconds.ratio('on', 'off') - 1:+.1%} (on vs off)",
        "  time the training thread spent in logging calls (local SQLite store, steady state):",
        f"    in the epoch loop ({in_loop}) {steady['loop']:.3f} s = {steady['loop'] / off:.2%}"
        f" of the run; max {steady['loop_max'] * 1000:.1f} ms for one call",
        f"    run start + params {steady['start']:.2f} s, model export {steady['model']:.2f} s, "
        f"end (wait for delivery) {steady['end']:.2f} s; total {steady['total']:.2f} s = "
        f"{steady['total'] / off:.1%}",
        f"    a process's first run: total {first['total']:.2f} s = {first['total'] / off:.1%}"
        " (the model's first torch.export)",
        "  the same run against an mlflow server on loopback answering each request in 200 ms:",
        f"    in the epoch loop ({in_loop}) {slow['loop']:.3f} s; max "
        f"{slow['loop_max'] * 1000:.1f} ms for one call (a blocking call would wait >= 200 ms)",
        f"    end (wait for delivery) {slow['end']:.2f} s; whole run {slow_seconds:.2f} s",
    ]


def section_ui(cfg: DictConfig, data: Dataset, device: torch.device) -> list[str]:
    """What the UI's extras add to a 1-epoch tracked run: the figures (predictions on the test
    split, three PNGs) and the system metrics (a sample every tracking.system_metrics_interval
    seconds), each alone against a run with neither; and the figures' own time."""
    folder = Path(tempfile.mkdtemp(prefix="cnnlab-bench-ui-"))
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
    neither = seconds.median("neither")
    return [
        f"MLflow UI extras, 1-epoch tracked run ({len(data.test)} test images):",
        f"  neither          {neither:7.2f} s",
        f"  figures          {seconds.median('figures'):7.2f} s   overhead "
        f"{seconds.ratio('figures', 'neither') - 1:+.1%}; making them alone "
        f"{statistics.median(times):.2f} s (test-split predictions + 3 PNGs)",
        f"  system metrics   {seconds.median('system metrics'):7.2f} s   overhead "
        f"{seconds.ratio('system metrics', 'neither') - 1:+.1%}; {samples} samples in the last "
        f"run (every {cfg.tracking.system_metrics_interval:g} s)",
    ]


@contextlib.contextmanager
def time_on_training_thread() -> Iterator[dict[str, float]]:
    """Seconds the caller's thread spends in cnnlab's logging calls while inside, by kind.

    Wraps the Tracker's methods for the duration (the benchmark's own instrument: training code
    keeps no clocks): `loop` is what the epoch loop calls, `loop_max` its slowest call.
    """
    spent = {"start": 0.0, "loop": 0.0, "loop_max": 0.0, "model": 0.0, "end": 0.0}
    kinds = {
        "log_metrics": "loop", "log_checkpoint": "loop", "log_model": "model", "end": "end",
        "log_params": "start", "log_dict": "start", "log_artifacts": "start",
    }  # fmt: skip
    originals = {name: getattr(Tracker, name) for name in kinds}
    original_create = train_module.create_run

    def timed(fn: Callable[..., Any], kind: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - start
                spent[kind] += took
                if kind == "loop":
                    spent["loop_max"] = max(spent["loop_max"], took)

        return wrapper

    for name, kind in kinds.items():
        setattr(Tracker, name, timed(originals[name], kind))
    train_module.create_run = timed(original_create, "start")
    try:
        yield spent
    finally:
        for name, fn in originals.items():
            setattr(Tracker, name, fn)
        train_module.create_run = original_create
        spent["total"] = spent["start"] + spent["loop"] + spent["model"] + spent["end"]


@contextlib.contextmanager
def slow_tracking_server(folder: Path, delay: float) -> Iterator[str]:
    """An `mlflow server` on loopback behind a proxy that holds every request `delay` seconds."""
    folder.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "artifacts")],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    proxy = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_delaying_proxy, args=(proxy, port, delay), daemon=True).start()
    uri = f"http://127.0.0.1:{proxy.getsockname()[1]}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                check_reachable(uri, timeout=2)
                break
            except CnnlabError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise CnnlabError("the benchmark's mlflow server did not start") from None
                time.sleep(0.5)
        yield uri
    finally:
        proxy.close()
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker
        server.wait(timeout=60)


def _delaying_proxy(listener: socket.socket, port: int, delay: float) -> None:
    # Each connection relayed both ways; a chunk that starts an HTTP request waits `delay` first.
    def relay(client: socket.socket) -> None:
        try:
            with client, socket.create_connection(("127.0.0.1", port)) as upstream:
                while True:
                    readable, _, _ = select.select([client, upstream], [], [], 30)
                    chunks = [(sock, sock.recv(65536)) for sock in readable]
                    if not chunks or not all(chunk for _, chunk in chunks):
                        return  # idle, or one side closed
                    for sock, chunk in chunks:
                        if sock is upstream:
                            client.sendall(chunk)
                            continue
                        if chunk.split(b" ", 1)[0] in (b"GET", b"POST", b"PUT", b"DELETE"):
                            time.sleep(delay)
                        upstream.sendall(chunk)
        except OSError:
            client.close()  # the server is not up yet, or went away: the client sees a reset

    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=relay, args=(client,), daemon=True).start()


_BIG_IMPORTS = ("import torch", "import torchvision", "import mlflow")


def section_startup(cfg: DictConfig, data: Dataset, device: torch.device) -> list[str]:
    """What a user waits for, in fresh processes: `cnnlab-train --help`, a config error and the
    default run's first training step, beside `python -c "import torch"`; then the first
    step's start-up by phase."""
    lines = startup_commands(cfg)
    folder = Path(tempfile.mkdtemp(prefix="cnnlab-bench-"))
    env = dict(os.environ, XDG_CACHE_HOME=str(folder / "cache"))  # no pre-migrated store yet
    lines.append("Start-up, process start to first training step, by phase (seconds):")
    for label, store in (
        ("new store, first ever", "a.db"),
        ("new store, template cached", "b.db"),
        ("existing store", "b.db"),
    ):
        probe = subprocess.run(
            [sys.executable, "-c", _STARTUP_PROBE, str(folder / store),
             str(launch_path(cfg.data.root))],
            capture_output=True, text=True, env=env, check=True,
        )  # fmt: skip
        phases = json.loads(probe.stdout.strip().splitlines()[-1])
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
    train = [str(script)] if script.exists() else [sys.executable, "-m", "cnnlab.train_cli"]
    root = f"data.root={launch_path(cfg.data.root)}"

    def wall(*args: str) -> Callable[[], float]:
        def timed() -> float:
            with tempfile.TemporaryDirectory(prefix="cnnlab-bench-") as folder:
                start = time.perf_counter()
                subprocess.run(args, cwd=folder, capture_output=True, check=False)
                return time.perf_counter() - start

        return timed

    def first_step() -> float:
        with tempfile.TemporaryDirectory(prefix="cnnlab-bench-") as folder:
            start = time.perf_counter()
            run = subprocess.Popen(
                [*train, root, "train.log_every=1"], cwd=folder, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            seconds = math.nan
            for line in run.stdout:
                if line.startswith("Loss after mini-batch"):
                    seconds = time.perf_counter() - start
                    break
            run.send_signal(signal.SIGTERM)  # the run ends KILLED, as on Ctrl-C
            run.communicate(timeout=120)
            return seconds

    first_step()  # once untimed: the data decoded and cached, the store template made
    timed = alternate(
        cfg.bench.rounds,
        {
            "import torch": wall(sys.executable, "-c", "import torch"),
            "cnnlab-train --help": wall(*train, "--help"),
            "config error": wall(*train, "train.batch_size=-1"),
            "first training step": first_step,
        },
    )
    return [
        f"Start-up of whole commands (seconds, median of {cfg.bench.rounds}; fresh processes):",
        *(f"  {side:22s} {timed.median(side):6.2f}" for side in timed),
    ]


# Run with `python -c` in a fresh interpreter, so each import is timed from a cold start; it
# imports nothing before the first mark. argv: store path, data root. Prints seconds per phase.
_STARTUP_PROBE = """
import json, sys, time
marks, last = {}, time.perf_counter()
def mark(name):
    global last
    now = time.perf_counter(); marks[name] = now - last; last = now
import torch; mark("import torch")
import torchvision; mark("import torchvision")
import mlflow; mark("import mlflow")
from cnnlab.bench import probe_first_step; mark("import cnnlab+hydra")
probe_first_step(sys.argv[1], sys.argv[2], mark)
print(json.dumps(marks))
"""


def probe_first_step(store: str, data_root: str, mark: Callable[[str], None]) -> None:
    """cnnlab-train's start-up, phase by phase, up to the end of the first training step."""

    cfg = compose_config([f"data.root={data_root}", "hardware=cpu"])
    mark("compose")
    spool = Path(store).parent / "pending"
    with _quiet(), closing_run(create_run(f"sqlite:///{store}", "startup", None, {}, spool)) as run:
        run.log_params(flatten(OmegaConf.to_container(cfg)))
        mark("store+run")
        data = load_dataset(**data_arguments(cfg.data, launch_path(cfg.data.root)))
        train_split = on_device(data.train, torch.device("cpu"))
        mark("data")
        model, optimizer = build_model(cfg, data, torch.device("cpu"))
        training_step(cfg, model, optimizer, train_split)(torch.arange(cfg.train.batch_size))
        mark("first step")


def section_batch_sizes(cfg: DictConfig, data: Dataset, device: torch.device) -> list[str]:
    """Samples/s at several batch sizes and the fraction of the CPU's arithmetic peak."""
    flops = flops_per_sample(cfg, data.in_shape, data.num_classes)
    peak, how = cpu_peak_flops() if device.type == "cpu" else (float("nan"), "n/a on GPU")
    lines = [
        f"Batch sizes ({flops / 1e6:.2f} MFLOP per training sample, fwd+bwd; "
        f"peak {peak / 1e9:.0f} GFLOP/s = {how}):"
    ]
    samples = cfg.bench.batches * 10

    def rate_at(batch_size: int) -> Callable[[], float]:
        batches = max(samples // batch_size, 1)
        # One loss read-back at the end: nothing but training is timed.
        run_cfg = OmegaConf.merge(cfg, {"train": {"batch_size": batch_size, "log_every": batches}})
        return lambda: batches * batch_size / cnnlab_training(run_cfg, data, batches, device)[1]

    for batch_size in cfg.bench.batch_sizes:
        rate = alternate(cfg.bench.rounds, {"x": rate_at(batch_size)}).median("x")
        lines.append(
            f"  batch {batch_size:4d}  {rate:9.0f} samples/s  "
            f"{rate * flops / 1e9:7.2f} GFLOP/s  {rate * flops / peak:6.1%} of peak"
        )
    return lines


def section_datasets(cfg: DictConfig, data: Dataset, device: torch.device) -> list[str]:
    """Training samples/s per dataset, each with its own recipe, same steps as cnnlab-train.

    MNIST runs the article's settings twice: images held as float32 (as cnnlab-train holds any
    split that fits preprocess.FLOAT_BUDGET), against uint8 converted per batch on the device
    (how a split over the budget trains). Fashion-MNIST is fetched as a first run would where
    data.root has none; a CIFAR-shaped synthetic set (50,000 3x32x32 uint8) trains ResNet-18 as
    experiment=cifar10_resnet does, with and without its crop + flip augmentation.
    """
    batches = cfg.bench.batches

    def rate(
        run_cfg: DictConfig, dataset: Dataset, n: int, budget: int = FLOAT_BUDGET
    ) -> Callable[[], float]:
        run_cfg = OmegaConf.merge(run_cfg, {"train": {"log_every": n}})  # one read-back
        return lambda: (
            n * run_cfg.train.batch_size / cnnlab_training(run_cfg, dataset, n, device, budget)[1]
        )

    # cnnlab-train holds MNIST as float32 (its copy fits preprocess.FLOAT_BUDGET); a set over
    # the budget stays uint8 and converts each batch: what that costs, on MNIST's steps.
    uint8 = alternate(
        cfg.bench.rounds,
        {"held": rate(cfg, data, batches), "uint8": rate(cfg, data, batches, budget=0)},
    )
    lines = [
        f"Datasets ({device}; samples/s over {batches} mini-batches unless said):",
        f"  MNIST, article's settings      float32 held {uint8.median('held'):8.0f}   uint8 "
        f"converted per batch {uint8.median('uint8'):8.0f}   ratio "
        f"{uint8.ratio('uint8', 'held'):.3f}x",
    ]
    # Inside cnnlab-bench's own Hydra app: compose the training config beside it.
    fashion_cfg = hydra.compose("config", ["data=fashion_mnist"])
    root = launch_path(cfg.data.root)
    with tempfile.TemporaryDirectory(prefix="cnnlab-bench-") as scratch:
        # Where data.root has no Fashion-MNIST (and may be read-only), it is fetched the way a
        # user's first run fetches it, into a folder of the benchmark's own.
        if not (root / fashion_cfg.data.dataset).is_dir():
            root = Path(scratch)
        try:
            fashion = load_dataset(**data_arguments(fashion_cfg.data, root))
        except CnnlabError as exc:
            lines.append(f"  Fashion-MNIST                  not measured: {exc}")
        else:
            speed = alternate(cfg.bench.rounds, {"x": rate(cfg, fashion, batches)}).median("x")
            lines.append(f"  Fashion-MNIST, article's settings {speed:8.0f}")
    resnet_cfg = OmegaConf.merge(
        hydra.compose("config", ["experiment=cifar10_resnet"]), {"hardware": cfg.hardware}
    )
    cifar = synthetic_dataset(50_000, (3, 32, 32), 10)
    steps = max(batches // 300, 3)  # a ResNet step is ~1000x an article step on a CPU
    plain = OmegaConf.merge(
        resnet_cfg, {"data": {"preprocess": {"crop_padding": 0, "flip": False}}}
    )
    resnet = alternate(
        cfg.bench.rounds,
        {"augmented": rate(resnet_cfg, cifar, steps), "plain": rate(plain, cifar, steps)},
    )
    pre = resnet_cfg.data.preprocess
    lines.append(
        f"  CIFAR-shaped, ResNet-18 ({resnet_cfg.model.name}, batch {resnet_cfg.train.batch_size}, "
        f"{steps} steps)   crop {pre.crop_padding} + flip {resnet.median('augmented'):7.1f}   "
        f"none {resnet.median('plain'):7.1f}   ratio {resnet.ratio('augmented', 'plain'):.3f}x"
    )
    return lines


def synthetic_dataset(n: int, shape: tuple[int, int, int], num_classes: int) -> Dataset:
    """`n` random uint8 images of `shape` with random labels: a stand-in of a real set's size."""
    g = torch.Generator().manual_seed(0)
    split = Split(
        torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g),
        torch.randint(0, num_classes, (n,), generator=g),
    )
    classes = [str(c) for c in range(num_classes)]
    return Dataset(split, split, num_classes, classes, Path("synthetic"), "synthetic")


def section_parallel(cfg: DictConfig, data: Dataset, device: torch.device) -> list[str]:
    """Throughput of two single-threaded training processes at once against one alone."""
    batches = cfg.bench.batches
    code = (
        "import sys, torch; torch.set_num_threads(1); from cnnlab.bench import parallel_probe; "
        "parallel_probe()"
    )

    def jobs(n: int) -> float:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(launch_path(cfg.data.root)), str(batches)],
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for _ in range(n)
        ]
        return sum(float(p.communicate()[0].strip().splitlines()[-1]) for p in procs)

    rates = alternate(cfg.bench.rounds, {"one": lambda: jobs(1), "two": lambda: jobs(2)})
    return [
        f"Parallel jobs (1 torch thread each, {batches} mini-batches of 10):",
        f"  one job   {rates.median('one'):9.0f} samples/s",
        f"  two jobs  {rates.median('two'):9.0f} samples/s together   "
        f"{rates.ratio('two', 'one'):.2f}x",
    ]


def parallel_probe() -> None:
    """Run by section_parallel in its own process: print this job's samples/s."""
    data_root, batches = sys.argv[1], int(sys.argv[2])
    with hydra.initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra.compose("config", overrides=[f"data.root={data_root}", "hardware=cpu"])
    data = load_dataset(**data_arguments(cfg.data, launch_path(cfg.data.root)))
    _, seconds = cnnlab_training(cfg, data, batches, torch.device("cpu"))
    print(batches * cfg.train.batch_size / seconds)


def section_ddp(cfg: DictConfig, data: Dataset, device: torch.device) -> list[str]:
    """Training samples/s of one process against two under torchrun (one torch thread each;
    on a GPU machine, one GPU against all), at a small and a large global batch."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    wide = max(2, gpus)
    code = "from cnnlab.bench import ddp_probe; ddp_probe()"

    def torchrun(nproc: int, batch_size: int) -> Callable[[], float]:
        batches = max(20, 30_000 // batch_size)  # ~30k samples: seconds, half an epoch

        def measure() -> float:
            done = subprocess.run(
                [Path(sys.executable).with_name("torchrun"), "--standalone",
                 f"--nproc_per_node={nproc}", "--no-python", sys.executable, "-c", code,
                 str(launch_path(cfg.data.root)), str(device.type), str(batch_size),
                 str(batches)],
                capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
            )  # fmt: skip
            if done.returncode:
                raise CnnlabError(f"torchrun failed: {done.stderr.strip()[-500:]}")
            return float(done.stdout.strip().splitlines()[-1])

        return measure

    lines = [
        f"Data-parallel training under torchrun ({'1 GPU each' if gpus else '1 thread each'}, "
        "global batch split over the processes), samples/s:",
    ]
    for batch_size in (10, 256):
        rates = alternate(cfg.bench.rounds, {
            "one": torchrun(1, batch_size), "all": torchrun(wide, batch_size),
        })  # fmt: skip
        lines.append(
            f"  batch {batch_size:>3}: 1 process {rates.median('one'):8.0f}   {wide} processes "
            f"{rates.median('all'):8.0f}   {rates.ratio('all', 'one'):.2f}x"
        )
    return lines


def ddp_probe() -> None:
    """Run by section_ddp in each torchrun process: rank 0 prints the job's samples/s."""
    from cnnlab.training import distributed

    data_root, device_type, batch_size, batches = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:5])
    world = distributed.world_from_env()
    distributed.start(world)
    with hydra.initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra.compose("config", overrides=[
            f"data.root={data_root}", f"hardware.device={device_type}", "hardware.threads=1",
            f"train.batch_size={batch_size}",
        ])  # fmt: skip
    device = distributed.rank_device(torch.device(device_type), world)
    with distributed.in_turn(world):
        data = load_dataset(**data_arguments(cfg.data, launch_path(cfg.data.root)))
    train_split = on_device(data.train, device)
    batches = min(batches, -(-len(train_split) // batch_size))  # at most one epoch
    model, optimizer = build_model(cfg, data, device)
    step = training_step(cfg, model, optimizer, train_split, world)
    distributed.barrier()
    _sync(device)
    start = time.perf_counter()
    for _ in train_one_epoch(step, batches, batches=batches):
        pass  # the one log point is the last batch: its loss summed over the ranks syncs them
    _sync(device)
    seconds = time.perf_counter() - start
    if world.main:
        print(batches * batch_size / seconds)
    distributed.stop()


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
    jobs, slots = 4, min(2, os.cpu_count() or 1)
    ray_address = cfg.bench.ray_address
    ray_slots = _ray_cpus(ray_address) if ray_address else slots
    engines = {
        "basic": ([], 1),
        "joblib": (["hydra/launcher=joblib", f"hydra.launcher.n_jobs={slots}"], slots),
        "slurm": (["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1"], slots),
        "ray": (
            ["hydra/launcher=ray", f"hydra.launcher.ray.init.address={ray_address}"]
            if ray_address else
            # "local": a new Ray even where $RAY_ADDRESS or a `ray start` cluster exists
            ["hydra/launcher=ray", "hydra.launcher.ray.init.address=local",
             f"+hydra.launcher.ray.init.num_cpus={slots}"],
            ray_slots,
        ),
    }  # fmt: skip
    missing = {name: why for name in engines if (why := _engine_missing(name))}
    stats: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in engines}

    def sweep(name: str) -> Callable[[], float]:
        def measure() -> float:
            uri, start, wall = timed_sweep(f"the {name} sweep", [
                f"train.seed={','.join(str(seed) for seed in range(1, jobs + 1))}",
                "train.epochs=1", f"data.root={launch_path(cfg.data.root)}",
                f"hardware.device={device}", *engines[name][0],
            ])  # fmt: skip
            runs = [(c["start"], c["end"]) for c in sweep_children(uri, "cnnlab") if c["end"]]
            if len(runs) != jobs:
                raise CnnlabError(f"the {name} sweep logged {len(runs)} finished runs of {jobs}")
            first, last = min(s for s, _ in runs), max(e for _, e in runs)
            in_runs = sum(e - s for s, e in runs)
            per_job = ((last - first) * engines[name][1] - in_runs) / jobs
            stats[name].append((first - start, in_runs / jobs, per_job, start + wall - last))
            return wall

        return measure

    available = [name for name in engines if name not in missing]
    seconds = alternate(cfg.bench.rounds, {name: sweep(name) for name in available})
    lines = [
        f"Sweep of {jobs} jobs (1 epoch each, tracked), per launcher; seconds:",
        "  launcher  slots    wall  start-up  mean run  per job  tail",
    ]
    for name in engines:
        if name in missing:
            lines.append(f"  {name:<8}  not measured: {missing[name]}")
            continue
        first, run, per_job, tail = (statistics.median(s) for s in zip(*stats[name], strict=True))
        lines.append(
            f"  {name:<8}  {engines[name][1]:>5}  {seconds.median(name):6.1f}  {first:8.1f}  "
            f"{run:8.1f}  {per_job:7.1f}  {tail:4.1f}"
        )
    return lines


def section_search(cfg: DictConfig, data: Dataset, device: torch.device) -> list[str]:
    """hparams_search=optuna_convnet as shipped (20 TPE trials, sampler seed 42, over lr,
    batch size and optimizer; 1 epoch each; 5000 training images held out to select on),
    untracked models, once per side: without pruning and with the median pruner, mini-batches
    trained, wall time, the best trial's validation accuracy and its test accuracy. Then the
    pruned search on joblib with 2 workers, trials launched in blocking pairs (as
    hydra-optuna-sweeper does) and each as soon as a slot frees: wall time.

    Each search runs once (a search is minutes; its trials are its own repetitions).
    """
    root = launch_path(cfg.data.root)
    joblib = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    sides = {
        "no pruning": ["hydra.sweeper.pruner=none"],
        "median pruner": ["hydra.sweeper.pruner=median"],
        "joblib x2, batched": [*joblib, "hydra.sweeper.batched=true"],
        "joblib x2, no wait": joblib,
    }
    results = {}
    for name, overrides in sides.items():
        uri, _, wall = timed_sweep(f"the {name} search", [
            "hparams_search=optuna_convnet", f"data.root={root}", f"hardware.device={device}",
            f"hardware.threads={cfg.hardware.threads}", "tracking.log_model=false", *overrides,
        ])  # fmt: skip
        [parent] = find_runs(uri, "cnnlab", "cnnlab.role", "sweep")
        results[name] = (run_record(uri, parent)["metrics"], wall)
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
    lines += [
        f"  pruned / unpruned mini-batches: {share:.2f} (target <= 0.33); pruned best val acc "
        f"{gap:+.2f} points from the unpruned best (target >= -0.5)",
        f"  joblib x2: batched / no-wait wall time: {waits:.2f}",
    ]
    return lines


def timed_sweep(what: str, overrides: list[str]) -> tuple[str, float, float]:
    """Run `cnnlab-train -m overrides` in a new folder, into a new SQLite store there: (the
    store's URI, start time, wall seconds); a CnnlabError naming `what` if it fails."""
    folder = Path(tempfile.mkdtemp(prefix="cnnlab-bench-sweep-"))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    command = [Path(sys.executable).with_name("cnnlab-train"), "-m", *overrides,
               f"tracking.uri={uri}"]  # fmt: skip
    start = time.time()
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    if done.returncode:
        raise CnnlabError(f"{what} failed: {done.stderr.strip()[-500:]}")
    return uri, start, time.time() - start


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


SECTIONS = {
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
    data = load_dataset(**data_arguments(cfg.data, launch_path(cfg.data.root)))
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
