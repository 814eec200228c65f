"""A journal left in cnnlab-pending is data on disk that anyone who can write the launch folder
can edit: cnnlab-sync and train.resume deliver only what the journal itself staged, and refuse
anything else in one line, with nothing delivered and nothing deleted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

from cnnlab.tracking.journal import JournalError, sync
from cnnlab.tracking.store import TrackingError
from helpers import cnnlab, one_error_line, train_in_process


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> tuple:
    """A finished run, for the tests that leave its store as it was: (store, run id)."""
    folder = tmp_path_factory.mktemp("journal-store")
    return train_in_process(folder, tiny_data, "tracking.log_model=false")


@pytest.fixture
def logged(trained, tmp_path) -> tuple:
    """The run, and files of the user's in the test's folder that a journal names."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "secret.txt").write_text("not for the store")
    (victim / "other.txt").write_text("kept")
    return *trained, victim


def craft(pending: Path, uri: str, run_id: str, lines: list[str]) -> None:
    """A journal folder as a run leaves it, with `lines` after a first, harmless tag."""
    pending.mkdir(parents=True, exist_ok=True)
    (pending / "meta.json").write_text(json.dumps({"uri": uri, "run_id": run_id}))
    tag = json.dumps({"op": "batch", "metrics": [], "params": {}, "tags": {"crafted": "1"}})
    (pending / "journal.jsonl").write_text("\n".join([tag, *lines]) + "\n")


def file_op(src: str) -> str:
    return json.dumps({"op": "file", "src": src, "dir": "stolen"})


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (file_op("{victim}/secret.txt"), "not a file the journal staged"),  # absolute
        (file_op("../../victim/secret.txt"), "not a file the journal staged"),
        (file_op("files/000001/../../../victim/secret.txt"), "not a file the journal staged"),
        (file_op("files/000001/link"), "symbolic link"),  # staged-looking, but a link out
        (json.dumps({"op": "dir", "src": "files/000001/tree", "dir": "x"}), "symbolic link"),
        ("{not json", "is not a JSON line"),
        (json.dumps({"op": "rm", "src": "files/000001/x"}), "not one of a journal's ops"),
    ],
)
def test_a_crafted_journal_is_refused_and_nothing_is_delivered_or_deleted(
    logged, tmp_path, line, says
):
    store, run_id, victim = logged
    pending = tmp_path / "cnnlab-pending" / run_id
    (pending / "files" / "000001" / "tree").mkdir(parents=True)
    (pending / "files" / "000001" / "link").symlink_to(victim / "secret.txt")
    (pending / "files" / "000001" / "tree" / "inner").symlink_to(victim)
    craft(pending, store.uri, run_id, [line.replace("{victim}", str(victim))])

    with pytest.raises(JournalError) as refused:  # cnnlab-sync's own work, in this process
        sync(pending)
    error = str(refused.value)
    assert error.startswith(f"{pending / 'journal.jsonl'} line 2 ")
    assert says in error and error.endswith("refused: nothing was delivered or deleted")
    # Nothing deleted: the user's files, the journal; nothing delivered, not even the tag first.
    assert sorted(p.name for p in victim.iterdir()) == ["other.txt", "secret.txt"]
    assert (pending / "journal.jsonl").exists() and (pending / "files" / "000001").is_dir()
    assert "crafted" not in store.client.get_run(run_id).data.tags
    assert store.client.list_artifacts(run_id, "stolen") == []


def test_sync_and_resume_refuse_a_crafted_journal_in_one_line(logged, tiny_data, tmp_path):
    # train.resume delivers a run's left journal first: the same refusal, the run as it was.
    _, _, victim = logged
    store, run_id = train_in_process(tmp_path, tiny_data, "tracking.log_model=false")
    pending = tmp_path / "cnnlab-pending" / run_id  # the run's tracking.pending_dir
    craft(pending, store.uri, run_id, [file_op(str(victim / "secret.txt"))])
    error = one_error_line(cnnlab("sync", pending, cwd=tmp_path))
    assert error.startswith(f"cnnlab-sync: error: {pending / 'journal.jsonl'} line 2 names ")
    error = one_error_line(cnnlab("train", f"train.resume={run_id}", cwd=tmp_path))
    assert error.startswith("cnnlab-train: error: ") and "not a file the journal staged" in error
    assert sorted(p.name for p in victim.iterdir()) == ["other.txt", "secret.txt"]
    assert (pending / "journal.jsonl").exists()
    assert store.only_run().info.status == "FINISHED"


@pytest.mark.parametrize("write", ["000001", "1000000"])  # the millionth write on: 7 digits
def test_a_journal_of_staged_files_is_still_delivered(tiny_data, tmp_path, write):
    store, run_id = train_in_process(tmp_path, tiny_data, "tracking.log_model=false")
    pending = tmp_path / "cnnlab-pending" / run_id
    (pending / "files" / write).mkdir(parents=True)
    (pending / "files" / write / "notes.txt").write_text("staged by the run")
    craft(pending, store.uri, run_id, [file_op(f"files/{write}/notes.txt")])
    done = cnnlab("sync", pending, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert store.client.get_run(run_id).data.tags["crafted"] == "1"
    assert [a.path for a in store.client.list_artifacts(run_id, "stolen")] == ["stolen/notes.txt"]
    assert not pending.exists()  # delivered: the journal's own folder is removed


def test_a_journal_naming_a_store_that_is_not_there_creates_none(logged, tmp_path):
    store, run_id, _ = logged
    pending = tmp_path / "cnnlab-pending" / run_id
    elsewhere = tmp_path / "elsewhere" / "mlflow.db"
    elsewhere.parent.mkdir()
    craft(pending, f"sqlite:///{elsewhere}", run_id, [])
    error = one_error_line(cnnlab("sync", pending, cwd=tmp_path))
    assert error == (
        f"cnnlab-sync: error: no MLflow store at {elsewhere}: train a run first (cnnlab-train), "
        "or point tracking.uri at a store"
    )
    assert list(elsewhere.parent.iterdir()) == [] and (pending / "journal.jsonl").exists()


def replay_state(client, run_id: str) -> dict:
    """What a replay must leave unchanged: metric histories, params, tags, dataset inputs, the
    run's model outputs and the experiment's logged models."""
    run = client.get_run(run_id)
    experiment = run.info.experiment_id
    return {
        "metrics": {
            key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            for key in run.data.metrics
        },
        "params": run.data.params,
        "tags": run.data.tags,
        "inputs": sorted(d.dataset.digest for d in run.inputs.dataset_inputs),
        "outputs": sorted(o.model_id for o in run.outputs.model_outputs),
        "models": sorted(m.model_id for m in client.search_logged_models([experiment])),
    }


def test_a_journal_replayed_after_a_crash_changes_nothing(tiny_data, tmp_path):
    # A crash between "done on the server" and "marked delivered" leaves a journal whose ops
    # the store has already taken: delivering them again must change nothing.
    store, run_id = train_in_process(tmp_path / "store", tiny_data, "tracking.log_figures=false")
    client = store.client
    run = client.get_run(run_id)
    before = replay_state(client, run_id)
    model_id = run.data.tags["cnnlab.model_uri"].removeprefix("models:/")
    pending = tmp_path / "cnnlab-pending" / run_id
    staged = pending / "files" / "000003"
    staged.mkdir(parents=True)
    # The model's files as the first delivery staged them (its MLmodel since rewritten).
    location = client.get_logged_model(model_id).artifact_location
    shutil.copytree(urlparse(location).path if "://" in location else location, staged / "model")
    (staged / "model_id").write_text(model_id)  # as the first delivery left it
    points = [
        [key, m.value, m.timestamp, m.step]
        for key in run.data.metrics
        for m in client.get_metric_history(run_id, key)
    ]
    ops = [
        {"op": "batch", "metrics": points, "params": run.data.params, "tags": {"kept": "1"}},
        {
            "op": "inputs",
            "datasets": [
                {"context": d.tags[0].value, "dataset": dict(d.dataset)}
                for d in run.inputs.dataset_inputs
            ],
        },  # fmt: skip
        {"op": "model", "src": "files/000003/model", "experiment_id": run.info.experiment_id},
        {"op": "file", "src": "files/000002/config.yaml", "dir": "config"},  # delivered, deleted
    ]
    client.set_tag(run_id, "kept", "1")  # the batch's tag, delivered the first time
    before["tags"]["kept"] = "1"
    (pending / "meta.json").write_text(json.dumps({"uri": store.uri, "run_id": run_id}))
    (pending / "journal.jsonl").write_text("".join(json.dumps(op) + "\n" for op in ops))

    assert sync(pending) == (store.uri, run_id, len(ops))
    assert replay_state(client, run_id) == before
    assert not pending.exists()

    # An edited journal of another run whose model_id file names this run's model: refused,
    # the model untouched (its files would have been overwritten with the staged ones).
    other = client.create_run(run.info.experiment_id).info.run_id
    pending = tmp_path / "cnnlab-pending" / other
    (pending / "files" / "000001").mkdir(parents=True)
    shutil.copytree(urlparse(location).path if "://" in location else location,
                    pending / "files" / "000001" / "model")  # fmt: skip
    (pending / "files" / "000001" / "model_id").write_text(model_id)
    op = {"op": "model", "src": "files/000001/model", "experiment_id": run.info.experiment_id}
    (pending / "meta.json").write_text(json.dumps({"uri": store.uri, "run_id": other}))
    (pending / "journal.jsonl").write_text(json.dumps(op) + "\n")
    with pytest.raises(TrackingError, match="names model .* of another run"):
        sync(pending)
    assert replay_state(client, run_id) == before
    assert client.get_logged_model(model_id).source_run_id == run_id
