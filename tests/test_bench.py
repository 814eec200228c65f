"""cnnlab-bench's sections, each run for real on tiny settings: every figure line is printed and
holds numbers. Sections that take seconds run in this process; those that start servers,
processes, torchrun, Ray or sweeps run as `cnnlab-bench` does, as integration tests. Also the
pieces the sections rely on: TimedTracker, and the shared mlflow-server proxy."""

from __future__ import annotations

import http.server
import re
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from cnnlab import CnnlabError
from cnnlab.bench import harness
from cnnlab.bench.article import section_article
from cnnlab.bench.batch_sizes import section_batch_sizes
from cnnlab.bench.harness import load_data
from cnnlab.bench.run import SECTIONS, run_bench
from cnnlab.bench.servers import Proxy
from cnnlab.bench.tracking import TimedTracker, timed_epoch
from cnnlab.config.compose import CONF_DIR
from cnnlab.tracking.run import NullTracker, Tracker
from helpers import cnnlab, data_overrides, write_dataset

CPU = torch.device("cpu")
NUM = r"\d+(?:\.\d+)?(?:e[-+]\d+)?"  # a printed figure: 123, 0.45, 1.2e-07 (never nan)
PCT = rf"[-+]?{NUM}%"
TINY = ["hardware=cpu", "bench.rounds=1", "bench.batches=20", "train.log_every=10"]


def matches(lines: list[str], *patterns: str) -> None:
    """Each pattern matches one of `lines` whole (NUM and PCT stand for figures)."""
    for pattern in patterns:
        regex = re.compile(pattern.format(NUM=NUM, PCT=PCT))
        assert any(regex.fullmatch(line) for line in lines), (pattern, lines)


@pytest.fixture
def bench_cfg(tiny_data, tmp_path):
    """cnnlab-bench's composed config on the tiny set: 1 round of 20 mini-batches."""

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("bench", [
                *data_overrides(*tiny_data), *TINY, f"tracking.uri=sqlite:///{tmp_path}/m.db",
                f"tracking.pending_dir={tmp_path / 'pending'}", *overrides,
            ])  # fmt: skip

    return _compose


# ---------------------------------------------------------- sections that take seconds
def test_article_section(bench_cfg):
    cfg = bench_cfg()
    lines = section_article(cfg, load_data(cfg), CPU)
    assert lines[0] == "article loop vs cnnlab default (20 mini-batches of 10, cpu):"
    matches(
        lines,
        r"  article +{NUM} samples/s   article's 5 epochs +{NUM} s",
        r"  cnnlab +{NUM} samples/s   article's 5 epochs +{NUM} s   ratio {NUM}x",
        r" +losses every 10 batches: max \|difference\| {NUM} over 2 values",
    )


def test_run_bench_prints_its_header_then_the_step_section(bench_cfg, capsys):
    run_bench(bench_cfg("bench.sections=[step]", "bench.batches=5"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cnnlab-bench: ") and "torch threads" in lines[0]
    assert "medians of 1 rounds" in lines[1]
    assert lines[3] == "Training step, article's network and Adam, batch 10, 5 steps, cpu:"
    assert len(lines) == 4 + 6  # the header, a blank line, the section's title, 6 variants
    matches(
        lines,
        r"  article's step +{NUM} steps/s +1\.00x   weights vs the article's: bit-identical",
        r"  \+ lean Adam \(cnnlab\) +{NUM} steps/s +{NUM}x   weights vs the article's: .+",
        r"  flat, fused=True +{NUM} steps/s +{NUM}x   weights vs the article's: .+",
    )


def test_run_bench_refuses_an_unknown_section(bench_cfg):
    with pytest.raises(CnnlabError, match=r"bench.sections has \['nope'\]; choose from"):
        run_bench(bench_cfg("bench.sections=[step,nope]"))


def test_batch_sizes_section(bench_cfg):
    cfg = bench_cfg("bench.batch_sizes=[10,64]")
    lines = section_batch_sizes(cfg, load_data(cfg), CPU)
    assert lines[0].startswith("Batch sizes (") and "MFLOP per training sample" in lines[0]
    assert len(lines) == 3
    for size in (10, 64):
        matches(lines, rf"  batch +{size}  +{{NUM}} samples/s +{{NUM}} GFLOP/s +{{PCT}} of peak")


def test_every_section_in_conf_is_one_the_bench_has():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        assert set(compose("bench").bench.sections) == set(SECTIONS)


# ---------------------------------------------------------------- what sections rely on
def test_timed_tracker_times_the_training_threads_calls_and_changes_nothing(bench_cfg, tmp_path):
    # log_model off: torch.export's seconds are the tracking section's, not this test's.
    cfg = bench_cfg("tracking.log_model=false", "tracking.log_figures=false")
    uri = f"sqlite:///{tmp_path / 'timed.db'}"
    seconds, spent = timed_epoch(cfg, tmp_path, uri)
    assert seconds > 0
    assert spent["start"] > 0 and spent["loop"] > 0 and spent["end"] > 0
    assert 0 < spent["loop_max"] <= spent["loop"] and spent["model"] == 0
    assert spent["total"] == pytest.approx(spent["start"] + spent["loop"] + spent["end"])
    # The run is what it would have been unwrapped: finished, with its losses.
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 6


def test_timed_tracker_is_taken_for_the_writer_it_wraps(tmp_path):
    # system_metrics samples only into a Tracker (isinstance): a wrapped one must still be one.
    tracker = Tracker(None, "sqlite:///unused.db", "run-id", "0", tmp_path)
    spent = dict.fromkeys(("start", "loop", "loop_max", "model", "end"), 0.0)
    timed = TimedTracker(tracker, spent)
    assert isinstance(timed, Tracker) and not isinstance(timed, NullTracker)
    assert timed.run_id == "run-id" and timed.ended is None


def test_timed_tracker_passes_everything_else_through():
    spent = dict.fromkeys(("start", "loop", "loop_max", "model", "end"), 0.0)
    run = TimedTracker(NullTracker(), spent)
    assert isinstance(run, NullTracker) and run.run_id is None
    run.log_metrics({"loss": 1.0}, step=1)
    run.set_tags({"a": "b"})  # not a timed kind: the writer's own method
    assert spent["loop"] > 0 and spent["start"] == 0

    other = threading.Thread(target=run.log_metrics, args=({"x": 1.0}, 2))
    before = spent["loop"]
    other.start()
    other.join()
    assert spent["loop"] == before  # another thread's calls don't hold up training


def test_data_overrides_outside_cnnlab_bench_name_the_data_root(bench_cfg, tiny_data):
    assert harness.data_overrides(bench_cfg()) == [f"data.root={tiny_data[0]}"]


@pytest.fixture
def http_server():
    """A plain HTTP server on loopback that answers every GET with b"ok"."""

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_proxy_delays_each_request_and_can_ask_for_a_password(http_server):
    with Proxy(http_server, delay=0.3, keep_requests=False) as slow:
        start = time.monotonic()
        with urllib.request.urlopen(f"{slow.url}/x", timeout=10) as answer:
            assert answer.read() == b"ok"
        assert time.monotonic() - start >= 0.3
        assert slow.seen == []
    with Proxy(http_server, credentials=("alice", "s3cret")) as guarded:
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(f"{guarded.url}/x", timeout=10)
        assert guarded.seen and guarded.seen[0].startswith(b"GET /x")


# --------------------------------------- sections that start processes, servers, sweeps
# What each section prints, line by line (a line may stand for several: the patterns each
# match one whole line). `not measured` is allowed only where the machine may lack a part.
EXPECTED = {
    "tracking": [
        r"MLflow logging, 1-epoch run \(params, 6 losses, test metrics, checkpoint, model\):",
        r"  tracking off +{NUM} s",
        r"  tracking on +{NUM} s   overhead {PCT} \(on vs off\)",
        r"  time the training thread spent in logging calls \(local SQLite store, steady state\):",
        r"    in the epoch loop \(log_metrics \+ log_checkpoint\) {NUM} s = {PCT} of the run; "
        r"max {NUM} ms for one call",
        r"    params \+ config {NUM} s, model export {NUM} s, end \(wait for delivery\) {NUM} s; "
        r"total {NUM} s = {PCT}",
        r"    a process's first run: total {NUM} s = {PCT} \(the model's first torch.export\)",
        r"  the same run against an mlflow server on loopback answering each request after a "
        r"delay:",
        r"    local store +whole run +{NUM} s; last epoch to FINISHED +{NUM} s",
        *(
            rf"    {delay} s a request +whole run +{{NUM}} s = {{NUM}}x; last epoch to FINISHED "
            rf"+{{NUM}} s; epoch loop max {{NUM}} ms for one call"
            for delay in ("0.1", "0.3")
        ),
    ],
    "ui": [
        r"MLflow UI extras, 1-epoch tracked run \(200 test images\):",
        r"  neither +{NUM} s",
        r"  figures +{NUM} s   overhead {PCT}; making them alone {NUM} s \(test-split "
        r"predictions \+ 3 PNGs\)",
        r"  system metrics +{NUM} s   overhead {PCT}; {NUM} samples in the last run \(every 2 s\)",
    ],
    "startup": [
        r"Start-up of whole commands \(seconds, median of 1; fresh processes\):",
        *(
            rf"  {side} +{{NUM}}"
            for side in (
                "import torch",
                "cnnlab-train --help",
                "config error",
                "first training step",
            )
        ),
        *(
            rf"  {label} +import torch {{NUM}}  import torchvision {{NUM}}  import mlflow {{NUM}}  "
            rf"import cnnlab\+hydra {{NUM}}  compose {{NUM}}  store\+run {{NUM}}  data {{NUM}}  "
            rf"first step {{NUM}}  \| beyond torch/torchvision/mlflow imports {{NUM}}"
            for label in ("new store, first ever", "new store, template cached", "existing store")
        ),
        r"Start-up, process start to first training step, by phase \(seconds\):",
    ],  # fmt: skip
    "parallel": [
        r"Parallel jobs \(1 torch thread each, 20 mini-batches of 10\):",
        r"  one job +{NUM} samples/s",
        r"  two jobs +{NUM} samples/s together   {NUM}x",
    ],
    "datasets": [
        r"Datasets \(cpu; samples/s over 20 mini-batches unless said\):",
        r"  MNIST, article's settings +float32 held +{NUM}   uint8 converted per batch +{NUM}   "
        r"ratio {NUM}x",
        # The tiny set's Fashion-MNIST fails conf/data/fashion_mnist.yaml's md5s.
        r"  Fashion-MNIST +not measured: .*corrupt or truncated.*",
        r"  CIFAR-shaped, ResNet-18 \(resnet18, batch 128, 3 steps\)   crop 4 \+ flip +{NUM}   "
        r"none +{NUM}   ratio {NUM}x",
    ],
    "ddp": [
        r"Data-parallel training under torchrun \(1 thread each, global batch split over the "
        r"processes\), samples/s:",
        r"  batch  10: 1 process +{NUM}   2 processes +{NUM}   {NUM}x",
        r"  batch 256: 1 process +{NUM}   2 processes +{NUM}   {NUM}x",
    ],
    "sweep": [
        r"Sweep of 4 jobs \(1 epoch each, tracked\), per launcher; seconds:",
        r"  launcher  slots    wall  start-up  mean run  per job  tail",
        r"  basic +1 +{NUM} +{NUM} +{NUM} +-?{NUM} +{NUM}",
        r"  joblib +2 +{NUM} +{NUM} +{NUM} +-?{NUM} +{NUM}",
        r"  slurm +(2 +{NUM} +{NUM} +{NUM} +-?{NUM} +{NUM}|not measured: .+)",
        r"  ray +(2 +{NUM} +{NUM} +{NUM} +-?{NUM} +{NUM}|not measured: .+)",
    ],
    "search": [
        r"Search: hparams_search=optuna_convnet \(20 trials of 1 epoch, TPE seed 42\):",
        r"  search               mini-batches  pruned    wall  best val acc  its test acc",
        *(
            rf"  {side} +{{NUM}} +{{NUM}} +{{NUM}} s +{{PCT}} +{{PCT}}"
            for side in ("no pruning", "median pruner", r"joblib x2, batched", "joblib x2, no wait")
        ),
        r"  pruned / unpruned mini-batches: {NUM} \(target <= 0.33\); pruned best val acc "
        r"[-+]{NUM} points from the unpruned best \(target >= -0.5\)",
        r"  joblib x2: batched / no-wait wall time: {NUM}",
    ],  # fmt: skip
}
SLOW = {  # marks beyond integration: a server, a Ray of the bench's own
    "tracking": [pytest.mark.server],
    "sweep": [pytest.mark.cluster, pytest.mark.xdist_group("ray")],
}


@pytest.mark.integration
@pytest.mark.parametrize(
    "section", [pytest.param(name, marks=SLOW.get(name, [])) for name in EXPECTED]
)
def test_section_as_cnnlab_bench_runs_it(section, tmp_path):
    root = tmp_path / "data"
    md5 = write_dataset(root / "MNIST" / "raw")
    write_dataset(root / "FashionMNIST" / "raw")  # present: nothing is fetched
    # A search holds out data.val_size images to select on; the tiny set has 600.
    extra = ["data.val_size=100"] if section == "search" else []
    if section == "tracking":  # the slow servers, faster: the lines are what is tested
        extra = ["bench.server_delays=[0.1,0.3]"]
    done = cnnlab(
        "bench", f"bench.sections=[{section}]", *TINY, *data_overrides(root, md5), *extra,
        cwd=tmp_path, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("cnnlab-bench: ")
    section_lines = lines[lines.index("") + 1 :]
    matches(section_lines, *EXPECTED[section])
    assert len(section_lines) == len(EXPECTED[section]), "\n".join(section_lines)
