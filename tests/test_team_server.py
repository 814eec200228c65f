"""A team's tracking server, as deployed: `mlflow server` on a real PostgreSQL 15 with proxied
artifacts, behind a proxy that asks for a password. Sweeps, resume, reproduction, loading models
from other processes, and the database going away mid-run."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
from PIL import Image

from helpers import (
    Proxy,
    Running,
    Store,
    assert_complete,
    cli_env,
    cnnlab,
    data_overrides,
    synthetic_split,
)

pytestmark = [pytest.mark.integration, pytest.mark.server, pytest.mark.xdist_group("team-server")]

USER, SECRET = "alice", "t3am-Pa55word"
RUN_ID = re.compile(r"\(([0-9a-f]{32})\)")


@pytest.fixture(scope="module")
def gate(team_server):
    """The server behind a proxy that refuses requests without USER/SECRET (basic auth), as a
    reverse proxy in front of a team server does: its URL."""
    proxy = Proxy(team_server.port, credentials=(USER, SECRET))
    yield f"http://127.0.0.1:{proxy.port}"
    proxy.close()


def on(tiny_overrides: list[str], uri: str, *extra: str) -> list[str]:
    """tiny_overrides pointed at `uri` instead of the test's SQLite store."""
    kept = [o for o in tiny_overrides if not o.startswith("tracking.uri=")]
    return [*kept, f"tracking.uri={uri}", *extra]


def credentials_env() -> dict[str, str]:
    """A cnnlab process's environment with the team server's credentials."""
    return cli_env(MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=SECRET)


def assert_no_secret(*texts: str, folder: Path | None = None) -> None:
    """SECRET is in none of `texts` nor in any file under `folder`."""
    for text in texts:
        assert SECRET not in text
    for path in folder.rglob("*") if folder else ():
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_a_parallel_sweep_through_the_password_proxy_lands_whole(
    tiny_overrides, tiny_data, tmp_path, postgres, team_server, gate
):
    secret_uri = gate.replace("http://", f"http://{USER}:{SECRET}@")
    done = cnnlab(
        "train", "-m", *on(tiny_overrides, secret_uri, "tracking.experiment=team-sweep"),
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "train.seed=1,2,3,4",
        "train.log_every=10", cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    store = Store(team_server.url)  # read past the proxy
    parent, children = store.sweep("team-sweep")
    runs = [parent, *children]
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.params["train.seed"] for r in children) == ["1", "2", "3", "4"]
    for child in children:  # (store.sweep checked each names the parent)
        # 600 images in mini-batches of 10: 60 a epoch, a loss every 10th.
        assert_complete(store, child, steps=[10, 20, 30, 40, 50, 60], epochs=1)
        # Artifacts went through the server into its storage, not to the launching machine.
        assert child.info.artifact_uri.startswith("mlflow-artifacts:/")
    experiment = team_server.artifacts / parent.info.experiment_id  # the server is shared
    assert len(list(experiment.rglob("last.pt"))) == 4
    assert not {"mlflow.db", "mlruns", "mlartifacts"} & {p.name for p in tmp_path.rglob("*")}

    # The password was used (the proxy refuses requests without it) and written nowhere: not in
    # the output, Hydra's folders, the team's database, any run's params, tags or artifacts
    # (the logged config too).
    assert_no_secret(done.stdout, done.stderr, postgres.dump(), folder=tmp_path)
    assert_no_secret(folder=team_server.artifacts)  # the logged models' files too
    for run in runs:
        assert all(secret_uri not in v for v in run.data.params.values())
        assert_no_secret(*run.data.params.values(), *run.data.tags.values())
        local = store.client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl"))
        assert_no_secret(folder=Path(local))
    assert {p.name for p in (tmp_path / "dl" / "config").iterdir()} == {
        "config.yaml", "overrides.yaml",
    }  # fmt: skip
    assert children[0].data.params["tracking.uri"] == gate

    # Another process loads a child's model through the proxy, with the credentials in the
    # environment: the same accuracy on the same data as the run logged.
    child = children[0]
    evaluated = cnnlab(
        "eval", child.info.run_id, f"tracking.uri={gate}", *data_overrides(*tiny_data),
        cwd=tmp_path, env=credentials_env(),
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"test accuracy {child.data.metrics['test_accuracy']:.4%}" in evaluated.stdout
    images, _ = synthetic_split(1, seed=3)
    Image.fromarray(images[0]).save(tmp_path / "digit.png")
    predicted = cnnlab(
        "predict", child.info.run_id, "digit.png", f"tracking.uri={gate}", cwd=tmp_path,
        env=credentials_env(),
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    assert re.match(r"digit\.png: class (\d) \(\1 - \w+, p=", predicted.stdout)
    assert_no_secret(evaluated.stdout + evaluated.stderr, predicted.stdout + predicted.stderr)


def test_a_killed_run_is_resumed_and_reproduced_from_other_processes(
    tiny_overrides, tmp_path, team_server
):
    url = team_server.url
    args = on(tiny_overrides, url, "tracking.experiment=team-resume", "train.epochs=2",
              "train.log_every=5", "tracking.log_model=false")  # fmt: skip
    training = Running(args, tmp_path)
    run_id = RUN_ID.search(training.wait_for("MLflow run "))[1]
    training.wait_for("Loss after mini-batch    25")
    training.proc.send_signal(signal.SIGTERM)
    code, stderr = training.finish(timeout=120)
    assert code == 128 + signal.SIGTERM, stderr
    store = Store(url)
    assert store.client.get_run(run_id).info.status == "KILLED"

    resumed = cnnlab("train", f"train.resume={run_id}", f"tracking.uri={url}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert store.client.get_run(run_id).info.status == "FINISHED"
    assert [s for s, _ in store.history(run_id, "train_loss")] == list(range(5, 121, 5))

    # Rerun from what the server holds: the same 24 losses as the interrupted-and-resumed run.
    reproduced = cnnlab("reproduce", run_id, f"tracking.uri={url}", cwd=tmp_path)
    assert reproduced.returncode == 0, reproduced.stdout + reproduced.stderr
    assert "24 shared steps, 24 identical" in reproduced.stdout
    assert "result            IDENTICAL" in reproduced.stdout


def test_the_database_gone_mid_run_fails_in_one_line_and_sync_completes_the_run(
    tiny_overrides, tmp_path, team_server, gate, postgres
):
    args = on(tiny_overrides, gate, "tracking.experiment=team-db-down", "train.epochs=3",
              "train.log_every=5", "tracking.flush_timeout=5",
              "tracking.request_timeout=2")  # fmt: skip
    training = Running(args, tmp_path, env=credentials_env())
    run_id = RUN_ID.search(training.wait_for("MLflow run "))[1]
    training.wait_for("Starting epoch 1")  # the run and its params are in the database
    try:
        postgres.stop()  # the mlflow server runs on and answers 503 to anything needing it
        code, stderr = training.finish(timeout=120)
    finally:
        postgres.start()  # as the other tests expect it, whatever happened here
    assert code == 1
    assert "Traceback" not in stderr
    pending = tmp_path / "cnnlab-pending" / run_id
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"cnnlab-train: error: tracking store {gate} still fails")
    assert "answers HTTP 503" in last and "database" in last  # what is down, not just "503"
    assert f"cnnlab-sync {pending}" in last
    assert_no_secret("".join(training.lines), stderr, folder=pending)

    store = Store(team_server.url)
    assert store.client.get_run(run_id).info.status == "RUNNING"  # not falsely FINISHED
    synced = cnnlab("sync", pending, cwd=tmp_path, env=credentials_env(), timeout=120)
    assert synced.returncode == 0, synced.stderr
    assert f"to run {run_id}" in synced.stdout
    printed = [line for line in training.lines if line.startswith("Loss after mini-batch")]
    assert len(printed) == 36  # 3 epochs of 60 mini-batches, every 5th: all of them arrived
    assert_complete(store, store.client.get_run(run_id), list(range(5, 181, 5)), epochs=3)
    assert not pending.exists()
