"""What tests share: synthetic datasets in the real IDX format, running cnnlab's commands as a
user does, reading a store, and real components: an `mlflow server` on loopback, and a proxy in
front of it that can hang or ask for a password, as a sick or protected team server would."""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import os
import pickle
import resource
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from cnnlab.bench.procs import free_port  # noqa: F401 - tests import it from here
from cnnlab.bench.servers import MlflowServer, Proxy, wait_healthy  # noqa: F401 - see below
from cnnlab.data.catalog import FILES

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data"  # real MNIST beside the checkout (CI, benchmarks)
BIN = Path(sys.executable).parent  # console scripts of the environment running the tests
# MlflowServer (`mlflow server` on loopback, stopped by its process group), Proxy (in front of
# it: delays, hangs, asks for a password) and wait_healthy are cnnlab.bench.servers': one
# implementation, shared with cnnlab-bench's tracking section. Tests import them from here.


def unavailable(component: str, why: str):
    """Skip a test whose real component (SLURM, Ray, PostgreSQL) cannot start on this machine;
    under CI (CI set) fail instead: `.ci/run` installs every component, so a skip there would
    hide a broken set-up. CI=0, false or no counts as unset."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{component} is required in CI but could not start: {why}")
    pytest.skip(f"{component} unavailable here: {why}")


# ------------------------------------------------------------------------------------ datasets
def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array as an IDX file: magic (0, 0, type, ndim), big-endian dims, data. uint8
    arrays become type 0x08 (ubyte), integer ones 0x0C (big-endian int32, QMNIST's labels)."""
    ints = array.dtype != np.uint8
    header = bytes([0, 0, 0x0C if ints else 0x08, array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(">i4" if ints else np.uint8).tobytes()


def synthetic_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n 28x28 images whose class is a bright 6x6 square at one of ten places, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 5)
        images[i, 4 + row * 12 : 10 + row * 12, 2 + col * 5 : 8 + col * 5] = 255
    return images, labels


def write_dataset(
    raw_dir: Path,
    n_train: int = 600,
    n_test: int = 200,
    gz: bool = False,
    files: dict[str, str] = FILES,
    qmnist_labels: bool = False,
    transposed: bool = False,
) -> dict[str, str]:
    """Write the four IDX files into raw_dir (under `files`' names: EMNIST's, QMNIST's, ...);
    return their md5s keyed like conf/data md5. qmnist_labels: labels as QMNIST writes them,
    idx2-int (N, 8) with the class in column 0 and NIST's metadata after it. transposed: each
    image stored with rows and columns swapped, as EMNIST's files hold them."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    train_x, train_y = synthetic_split(n_train, seed=1)
    test_x, test_y = synthetic_split(n_test, seed=2)
    if transposed:
        train_x, test_x = train_x.transpose(0, 2, 1), test_x.transpose(0, 2, 1)
    if qmnist_labels:
        train_y, test_y = (
            np.column_stack([y.astype(np.int32), np.arange(len(y))[:, None] + np.arange(7) * 1000])
            for y in (train_y, test_y)
        )
    arrays = {
        "train_images": train_x, "train_labels": train_y,
        "test_images": test_x, "test_labels": test_y,
    }  # fmt: skip
    md5 = {}
    for key, array in arrays.items():
        blob = idx_bytes(array)
        md5[key] = hashlib.md5(blob).hexdigest()
        name = files[key] + (".gz" if gz else "")
        (raw_dir / name).write_bytes(gzip.compress(blob) if gz else blob)
    return md5


class _Python2Pickler(pickle._Pickler):
    """Pickles bytes as Python 2's str (SHORT_BINSTRING/BINSTRING), as CIFAR's batches were
    written: Python 3 reads them back with encoding="latin1", keys as str, as torchvision does."""

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        head = (
            pickle.SHORT_BINSTRING + bytes([n])
            if n < 256
            else pickle.BINSTRING + struct.pack("<i", n)
        )
        self.write(head + obj)
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes}


def python2_pickle(obj: object) -> bytes:
    """`obj` pickled (protocol 2) the way Python 2 wrote CIFAR's files."""
    out = io.BytesIO()
    _Python2Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


def cifar_split(n: int, seed: int, num_classes: int) -> tuple[np.ndarray, list[int]]:
    """n CIFAR rows: (n, 3072) uint8 (the R plane, then G, then B, 32x32 each) and labels."""
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        [int(v) for v in rng.integers(0, num_classes, size=n)],
    )


def write_cifar(folder: Path, dataset: str = "CIFAR10", n_train: int = 50, n_test: int = 20):
    """CIFAR-10 (five data_batch_N, test_batch, batches.meta) or CIFAR-100 (train, test, meta)
    in their real format: Python 2 pickles of dicts with b"data" (N, 3072) uint8 and b"labels"
    (CIFAR-100: b"fine_labels" and b"coarse_labels"). Returns (md5 by file name, arrays)."""
    folder.mkdir(parents=True, exist_ok=True)
    if dataset == "CIFAR10":
        classes = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog",
                   b"horse", b"ship", b"truck"]  # fmt: skip
        train_x, train_y = cifar_split(n_train, seed=1, num_classes=10)
        test_x, test_y = cifar_split(n_test, seed=2, num_classes=10)
        step = -(-n_train // 5)
        batches = {
            f"data_batch_{i + 1}": (train_x[i * step : (i + 1) * step],
                                    train_y[i * step : (i + 1) * step])
            for i in range(5)
        }  # fmt: skip
        batches["test_batch"] = (test_x, test_y)
        contents = {
            name: {b"batch_label": name.encode(), b"labels": y, b"data": x,
                   b"filenames": [f"img_{j}.png".encode() for j in range(len(y))]}
            for name, (x, y) in batches.items()
        }  # fmt: skip
        contents["batches.meta"] = {b"num_cases_per_batch": step, b"label_names": classes,
                                    b"num_vis": 3072}  # fmt: skip
    else:
        classes = [f"class_{i:02d}".encode() for i in range(100)]
        train_x, train_y = cifar_split(n_train, seed=1, num_classes=100)
        test_x, test_y = cifar_split(n_test, seed=2, num_classes=100)
        contents = {
            name: {b"filenames": [b"x.png"] * len(y), b"batch_label": name.encode(),
                   b"fine_labels": y, b"coarse_labels": [v // 5 for v in y], b"data": x}
            for name, (x, y) in (("train", (train_x, train_y)), ("test", (test_x, test_y)))
        }  # fmt: skip
        contents["meta"] = {
            b"fine_label_names": classes,
            b"coarse_label_names": [f"super_{i}".encode() for i in range(20)],
        }
    md5 = {}
    for name, content in contents.items():
        blob = python2_pickle(content)
        (folder / name).write_bytes(blob)
        md5[name] = hashlib.md5(blob).hexdigest()
    return md5, {"train": (train_x, train_y), "test": (test_x, test_y),
                 "classes": [c.decode() for c in classes]}  # fmt: skip


def write_image(path: Path, size: tuple[int, int], mode: str, value: int) -> None:
    """A PNG of `size` (W, H) in PIL `mode` (L, RGB, RGBA, P, I;16), a gradient plus `value`."""
    from PIL import Image

    width, height = size
    ramp = (np.arange(width)[None, :] + np.arange(height)[:, None] + value) % 256
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        image = Image.fromarray((ramp * 257).astype(np.uint16))  # full 16-bit range
    elif mode == "L":
        image = Image.fromarray(ramp.astype(np.uint8))
    else:
        rgb = np.stack([ramp, (ramp + 80) % 256, (ramp + 160) % 256], axis=-1).astype(np.uint8)
        image = Image.fromarray(rgb)
        if mode == "RGBA":
            image.putalpha(200)
        elif mode == "P":
            image = image.quantize(16)
    image.save(path)


def write_image_folder(root: Path, layout: dict[str, dict[str, int]]) -> None:
    """An ImageFolder tree: layout {"train/cat": 3, "test/cat": 1} or {"cat": 5}: that many
    PNGs per class folder, of mixed sizes and modes (L, RGB, RGBA, P, 16-bit grey)."""
    modes = ["RGB", "L", "RGBA", "P", "I;16"]
    for folder, count in layout.items():
        for i in range(count):
            size = (20 + 7 * i, 16 + 5 * (i % 3))
            write_image(root / folder / f"img{i:03d}.png", size, modes[i % len(modes)], 13 * i)


def data_overrides(root: Path, md5: dict[str, str]) -> list[str]:
    """Overrides that point data=mnist at a synthetic set and switch fetching off."""
    return [
        f"data.root={root}",
        *(f"data.md5.{key}={value}" for key, value in md5.items()),
        "data.mirrors=[]",
        "data.npm_package=null",
        "data.download=false",
    ]


# ------------------------------------------------------------------------- commands and stores
def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a cnnlab subprocess: the test's own, minus user tracking settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "CNNLAB_DATA_ROOT", "MLFLOW_TRACKING_USERNAME",
                     "MLFLOW_TRACKING_PASSWORD")
    }  # fmt: skip
    env.update(extra)
    return env


def cnnlab(command: str, *args: str, cwd: Path, timeout: float = 300, **kw):
    """Run a cnnlab console script (train, sync, eval, ...) as a user does; its output captured."""
    return subprocess.run(
        [BIN / f"cnnlab-{command}", *map(str, args)], cwd=cwd, capture_output=True, text=True,
        env=kw.pop("env", None) or cli_env(), timeout=timeout, **kw,
    )  # fmt: skip


def train_in_process(folder: Path, tiny_data, *overrides: str) -> tuple[Store, str]:
    """Train a tiny run in this process into a new store in `folder`: (store, run id).

    For tests that need a logged run but do not test cnnlab-train's command line.
    """
    from cnnlab.config.compose import compose_config
    from cnnlab.train import train

    store = Store(f"sqlite:///{folder / 'mlflow.db'}")
    cfg = compose_config([
        *data_overrides(*tiny_data), "train.epochs=1", "train.log_every=20", "hardware=cpu",
        f"tracking.uri={store.uri}", f"tracking.pending_dir={folder / 'cnnlab-pending'}",
        *overrides,
    ])  # fmt: skip
    train(cfg)
    [run] = store.runs()
    return store, run.info.run_id


class Running:
    """A cnnlab command (cnnlab-train unless `command` says) started in the background;
    `wait_for` reads its stdout up to a line.

    `wait_for` reads the pipe itself (select, then os.read), so that it can give up at a
    deadline, and decodes as the pipe's text stream would (universal newlines).
    """

    def __init__(
        self,
        args: list[str],
        cwd: Path,
        env: dict[str, str] | None = None,
        command: str = "train",
        launcher: Sequence[str | Path] = (),
    ) -> None:
        # launcher: what runs the command, e.g. torchrun and its options (`--no-python`).
        self.proc = subprocess.Popen(
            [*launcher, BIN / f"cnnlab-{command}", *map(str, args)], cwd=cwd,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or cli_env(),
        )  # fmt: skip
        self.lines: list[str] = []
        self.times: dict[str, float] = {}
        stdout = self.proc.stdout
        decoder = codecs.getincrementaldecoder(stdout.encoding)(errors=stdout.errors)
        self._decoder = io.IncrementalNewlineDecoder(decoder, translate=True)
        self._partial = ""  # read from the pipe, not yet a whole line

    def wait_for(self, prefix: str, timeout: float = 120) -> str:
        """Read stdout until a line starts with `prefix`; that line. Fails, with the lines seen
        so far and stderr, if the run ends first or no such line comes within `timeout` s (the
        process is killed then)."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            while "\n" in self._partial:
                line, _, self._partial = self._partial.partition("\n")
                self.lines.append(line + "\n")
                if line.startswith(prefix):
                    self.times[prefix] = time.monotonic()
                    return line + "\n"
            left = deadline - time.monotonic()
            if left <= 0:
                self.proc.kill()
                raise self._failure(f"no line {prefix!r} within {timeout:.0f} s (killed)")
            if not select.select([fd], [], [], left)[0]:
                continue
            chunk = os.read(fd, 65536)
            self._partial += self._decoder.decode(chunk, final=not chunk)
            if not chunk:  # the end of stdout: the run ended
                line, self._partial = self._partial, ""
                if line:
                    self.lines.append(line)
                    if line.startswith(prefix):
                        self.times[prefix] = time.monotonic()
                        return line
                raise self._failure(f"no line {prefix!r}")

    def _failure(self, why: str) -> AssertionError:
        """`why`, the stdout seen and the end of stderr (read for at most 30 s)."""
        try:
            out, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # something still holds the pipes open
            out, err = "", "(unread: the pipe is still open)"
        seen = "".join(self.lines) + self._partial + out
        return AssertionError(f"{why}; stdout: {seen[-3000:]}; stderr: {err[-3000:]}")

    def finish(self, timeout: float = 240) -> tuple[int, str]:
        """(exit status, stderr) once the process ends; stdout lines are kept in `lines`."""
        out, err = self.proc.communicate(timeout=timeout)
        out = self._partial + self._decoder.decode(b"", final=True) + out
        self._partial = ""
        self.lines += out.splitlines(keepends=True)
        self.times["end"] = time.monotonic()
        return self.proc.returncode, err


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The single stderr line of a command that failed as cnnlab promises: no traceback."""
    assert done.returncode not in (0, None), done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("cnnlab-")
    return lines[0]


def file_size_limit(limit: int):
    """A preexec_fn: no file the child writes may grow past `limit` bytes, as on a full disk.

    A write past it then fails with EFBIG, as one on a full disk fails with ENOSPC, instead of
    SIGXFSZ killing the process.
    """

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


class Store:
    """A tracking store as tests read it."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        """A client of the store, made at first use (making one creates a SQLite store)."""
        if self._client is None:
            self._client = MlflowClient(self.uri)
        return self._client

    def runs(self, experiment: str = "cnnlab", where: str = "") -> list:
        """The runs of `experiment` (optionally filtered), newest first."""
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return []
        return self.client.search_runs([found.experiment_id], filter_string=where)

    def sweep(self, experiment: str = "cnnlab") -> tuple:
        """(parent, children) of the experiment's one sweep; every child names that parent."""
        runs = self.runs(experiment)
        [parent] = [r for r in runs if r.data.tags.get("cnnlab.role") == "sweep"]
        children = [r for r in runs if r is not parent]
        assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
        return parent, children

    def only_run(self, experiment: str = "cnnlab"):
        """The experiment's one run (fails when there are more or none)."""
        [run] = self.runs(experiment)
        return run

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of one metric, in logging order."""
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]


def assert_complete(store: Store, run, steps: list[int], epochs: int) -> None:
    """FINISHED, with every train_loss step, the test metrics, the resume checkpoint and a
    READY model."""
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert [step for step, _ in store.history(run_id, "train_loss")] == steps
    for key in ("test_loss", "test_accuracy", "epoch"):
        assert len(store.history(run_id, key)) == epochs, key
    client = store.client
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {"checkpoints/last.pt"}
    model_id = run.data.tags["cnnlab.model_uri"].removeprefix("models:/")
    assert client.get_logged_model(model_id).status == LoggedModelStatus.READY
