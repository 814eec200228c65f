"""The MLflow UI as a person browses it (issue 13): `cnnlab-train` writes one run and a two-job
sweep into the default store of a launch folder, `cnnlab-ui` serves it (a real `mlflow server`
on loopback), and Debian's Chromium, headless and driven by Playwright, opens it. The
assertions are on what the page shows; every wait is on an element, never a sleep (the app
polls, so the network is never idle).

Screenshots go to $CNNLAB_SCREENSHOTS when set (the README's come from
`CNNLAB_SCREENSHOTS=tests/screenshots`), else into the test's temp folder.

Selectors found by hand in MLflow 3.17's UI (see the README's "Browse the MLflow UI"): the
sidebar switch "GenAI | Model training", links named after experiments and runs, the run page's
tabs (role tab), chart cards titled by metric name, the artifact tree's file names.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest
from PIL import Image

from cnnlab.bench.procs import stop_group
from helpers import Running, Store, cli_env, cnnlab, data_overrides, free_port, unavailable

pytestmark = [pytest.mark.integration, pytest.mark.server, pytest.mark.xdist_group("ui")]

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright never downloads a browser
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync",
]  # fmt: skip
TIMEOUT_MS = 30_000  # one page or element; a first load of the app on a busy 2-core machine
RUN_NAME = "convnet-tiny"
SWEEP = ("optimizer.lr=3e-4,3e-3", ["optimizer.lr=0.0003", "optimizer.lr=0.003"])  # -m, children
FIGURES = ["confusion_matrix.png", "per_class_accuracy.png", "misclassified.png"]  # figures/


class Ui:
    """What the tests browse: the UI's URL, the link cnnlab-ui printed, the store it serves,
    where screenshots go."""

    def __init__(self, url: str, link: str, store: Store, shots: Path) -> None:
        self.url, self.link, self.store, self.shots = url, link, store, shots

    def shot(self, page, name: str) -> None:
        """Save a screenshot of the whole window as `name`.png."""
        page.screenshot(path=self.shots / f"{name}.png")


def require_browser() -> None:
    """Skip (fail under CI) where Debian's Chromium or Playwright is missing."""
    if not CHROMIUM.exists():
        unavailable("Chromium", f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        unavailable("Chromium", f"Playwright is not installed ({exc}; pip install -e '.[test]')")


@pytest.fixture(scope="module")
def ui(tiny_data, tmp_path_factory) -> Iterator[Ui]:
    """Train one run and a sweep as a user does (default store in the launch folder), then
    serve that store on loopback with `cnnlab-ui` (the README's command)."""
    require_browser()  # before half a minute of training
    folder = tmp_path_factory.mktemp("ui")
    common = [*data_overrides(*tiny_data), "train.epochs=1", "train.log_every=20", "hardware=cpu"]
    for args in (
        [*common, "optimizer.lr=1e-3", f"tracking.run_name={RUN_NAME}"],  # learns tiny data
        ["-m", *common, SWEEP[0]],
    ):
        done = cnnlab("train", *args, cwd=folder)
        assert done.returncode == 0, done.stderr[-3000:]
    store = Store(f"sqlite:///{folder / 'mlflow.db'}")

    port = free_port()
    env = cli_env(MLFLOW_DISABLE_TELEMETRY="true")
    serving = Running(["--port", port], cwd=folder, env=env, command="ui")
    try:
        line = serving.wait_for("Experiment cnnlab", timeout=180)
        serving.wait_for("Serving", timeout=60)
        runs, link = re.fullmatch(r"Experiment cnnlab \((\d+) runs\): (\S+)\n", line).groups()
        assert runs == "4", line  # the run, the sweep's parent and its two jobs
        shots = Path(os.environ.get("CNNLAB_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
        shots.mkdir(parents=True, exist_ok=True)
        yield Ui(f"http://127.0.0.1:{port}", link, store, shots)
    finally:
        stop_ui(serving, (folder / "mlflow.db").resolve())


def stop_ui(serving: Running, db: Path) -> None:
    """Ctrl-C to cnnlab-ui, which stops its `mlflow server`; a server it left (cnnlab-ui was
    killed, or broke) is found by its store's path and stopped by PID."""
    if serving.proc.poll() is None:
        serving.proc.send_signal(signal.SIGINT)
    try:
        serving.finish(timeout=60)
    except subprocess.TimeoutExpired:
        serving.proc.kill()
        serving.proc.wait()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with suppress(OSError):
            args = cmdline.read_bytes().split(b"\0")
            if b"server" in args and f"sqlite:///{db}".encode() in args:
                stop_group(int(cmdline.parent.name))


@pytest.fixture(scope="module")
def page(ui: Ui, tmp_path_factory):
    """One tab of headless Chromium, with an empty profile, for all the module's tests."""
    from playwright.sync_api import Error, expect, sync_playwright

    playwright = sync_playwright().start()
    try:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"), executable_path=CHROMIUM,
            headless=True, args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 800},
        )  # fmt: skip
    except Error as exc:
        playwright.stop()
        unavailable("Chromium", str(exc).splitlines()[0])
    context.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    # The "MLflow Assistant" chat opens beside every page on a first visit and would squeeze the
    # runs table; a person closes it once and the app remembers, as here.
    context.add_init_script(
        "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
        "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
    )
    tab = context.pages[0] if context.pages else context.new_page()
    yield tab
    context.close()
    playwright.stop()


def run_row(page, name: str):
    """The runs table's row of run `name`. The table (ag-grid) draws a row twice, the pinned
    name column and the rest, sharing one aria-rowindex: the locator matches both."""
    named = page.get_by_role("row").filter(has=page.get_by_role("link", name=name, exact=True))
    index = named.first.get_attribute("aria-rowindex")
    return page.locator(f'[role="row"][aria-rowindex="{index}"]')


def open_runs(page, ui: Ui) -> None:
    """As a new user: Home, the sidebar's "Model training" switch, then the experiment.

    MLflow 3.17 opens every experiment in the view of that switch (default GenAI: the traces
    overview), whatever its `mlflow.experimentKind` tag; the browser remembers the choice.
    """
    from playwright.sync_api import expect

    page.goto(f"{ui.url}/")
    page.get_by_text("Model training", exact=True).click()
    page.get_by_role("link", name="cnnlab", exact=True).click()
    expect(page).to_have_url(re.compile(r"#/experiments/\d+/runs"))


def open_run(page, ui: Ui, name: str = RUN_NAME) -> None:
    """The run page of run `name`, from the runs list."""
    from playwright.sync_api import expect

    open_runs(page, ui)
    page.get_by_role("link", name=name, exact=True).click()
    expect(page.get_by_role("heading", name=name)).to_be_visible()


def test_the_model_training_view_lists_the_run_with_its_datasets(ui: Ui, page):
    from playwright.sync_api import expect

    open_runs(page, ui)
    expect(page.get_by_role("heading", name="Runs")).to_be_visible()
    row = run_row(page, RUN_NAME)
    expect(row.get_by_role("link", name=RUN_NAME, exact=True)).to_be_visible()
    # Dataset column: "mnist-train (<digest>)" with its context; the test set follows (or
    # hides behind "+1" when the cell is narrow).
    expect(row.get_by_role("button", name=re.compile(r"^mnist-train \(\w+\)$"))).to_be_visible()
    expect(row.get_by_role("status").filter(has_text="training").first).to_be_visible()
    expect(row.get_by_text("cnnlab-train", exact=True)).to_be_visible()  # Source column


def test_the_link_cnnlab_ui_prints_opens_the_runs_list(ui: Ui, page):
    from playwright.sync_api import expect

    assert ui.link.endswith("?workflowType=machine_learning"), ui.link
    page.goto(ui.link)
    expect(page).to_have_url(re.compile(r"#/experiments/\d+/runs"))
    expect(page.get_by_role("link", name=RUN_NAME, exact=True)).to_be_visible()


def test_the_sweep_parent_expands_to_its_children(ui: Ui, page):
    from playwright.sync_api import expect

    open_runs(page, ui)
    parent_name = f"sweep {SWEEP[0]}"
    expect(page.get_by_role("link", name=parent_name, exact=True)).to_be_visible()
    children = [page.get_by_role("link", name=name, exact=True) for name in SWEEP[1]]
    for child in children:
        expect(child).to_have_count(0)  # folded under the parent
    # The expander is the icon button in front of the parent's name.
    name_cell = run_row(page, parent_name).locator('[col-id="attributes.`Run Name`"]')
    name_cell.get_by_role("button").click()
    for child in children:
        expect(child).to_be_visible()
    ui.shot(page, "runs")


def test_the_run_page_shows_description_datasets_and_charts(ui: Ui, page):
    from playwright.sync_api import expect

    open_run(page, ui)
    # Overview: the description cnnlab writes, the datasets section.
    expect(page.get_by_text("Description", exact=True)).to_be_visible()
    expect(page.get_by_text(re.compile(r"^Test accuracy: \d+\.\d\d%$"))).to_be_visible()
    expect(page.get_by_text(re.compile(r"^mnist-train \(\w+\)$"))).to_be_visible()
    # "Child runs" holds a placeholder until the app has found that the run has none.
    expect(page.get_by_text("Child runs", exact=True)).to_have_count(0)
    ui.shot(page, "run_overview")
    # One chart card per metric, titled by its name (the legend reads "<run> (train_loss)").
    page.get_by_role("tab", name="Model metrics").click()
    for metric in ("train_loss", "test_accuracy"):
        expect(page.get_by_text(metric, exact=True)).to_be_visible()
    ui.shot(page, "run_metrics")
    page.get_by_role("tab", name="System metrics").click()  # titles drop the "system/" prefix
    expect(page.get_by_text("cpu_utilization_percentage", exact=True)).to_be_visible()


def test_the_artifacts_view_previews_the_confusion_matrix(ui: Ui, page, tmp_path):
    from playwright.sync_api import expect

    open_run(page, ui)
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("figures", exact=True).click()
    for name in FIGURES:
        expect(page.get_by_text(name, exact=True)).to_be_visible()
    page.get_by_text(FIGURES[0], exact=True).click()
    expect(page.get_by_text(f"figures/{FIGURES[0]}", exact=True)).to_be_visible()
    # The preview is an <img> of the file the browser fetched and decoded: its pixel size is
    # the PNG's in the store.
    run = ui.store.runs(where=f"attributes.run_name = '{RUN_NAME}'")[0]
    local = ui.store.client.download_artifacts(
        run.info.run_id, f"figures/{FIGURES[0]}", str(tmp_path)
    )
    with Image.open(local) as png:
        size = list(png.size)
    preview = page.locator("img[src^='blob:']").first
    expect(preview).to_be_visible()
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=preview.element_handle()
    )
    assert preview.evaluate("img => [img.naturalWidth, img.naturalHeight]") == size
    ui.shot(page, "run_artifacts")
