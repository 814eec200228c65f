"""The MLflow store and checkpoints in it: a store is created whole or not at all, and a store or
checkpoint that can't be used is refused in one line, with what it holds left as it was."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnlab.tracking.run import create_run
from helpers import Store, cli_env, cnnlab, file_size_limit, one_error_line, train_in_process


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """XDG_CACHE_HOME for these tests, so the user's cached empty store is never touched."""
    return tmp_path_factory.mktemp("xdg-cache")


def cnnlab_train(
    args: list[str], cwd: Path, cache: Path, max_file_bytes: int | None = None
) -> subprocess.CompletedProcess:
    return cnnlab(
        "train", *args, cwd=cwd, env=cli_env(XDG_CACHE_HOME=str(cache)),
        preexec_fn=file_size_limit(max_file_bytes) if max_file_bytes else None,
    )  # fmt: skip


def one_line(done: subprocess.CompletedProcess) -> str:
    """The failure's single stderr line, from cnnlab-train."""
    line = one_error_line(done)
    assert line.startswith("cnnlab-train: error: ")
    return line


def store_with_a_run(db: Path, cache: Path, monkeypatch) -> str:
    """Create the store `db` holding one finished run (the cached template makes this fast)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    uri = f"sqlite:///{db}"
    create_run(uri, "cnnlab", "kept", {}, db.parent / "cnnlab-pending").end("FINISHED")
    return uri


@pytest.mark.integration  # a real failure mid-run, then recovery
def test_a_full_disk_leaves_no_half_store_and_the_next_run_succeeds(
    tiny_overrides, tmp_path, cache, monkeypatch
):
    store_with_a_run(tmp_path / "other" / "mlflow.db", cache, monkeypatch)  # caches the template
    # An empty migrated store is about 1 MB: with a 64 KiB file-size limit its copy fails midway.
    done = cnnlab_train(tiny_overrides, tmp_path, cache, max_file_bytes=64 * 1024)
    line = one_line(done)
    assert f"cannot create the MLflow store {tmp_path / 'mlflow.db'}" in line
    assert "nothing was left behind: free some space" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "outputs"]  # no partial file

    done = cnnlab_train([*tiny_overrides, "tracking.log_model=false"], tmp_path, cache)
    assert done.returncode == 0, done.stderr
    [run] = Store(f"sqlite:///{tmp_path / 'mlflow.db'}").runs()
    assert run.info.status == "FINISHED"


def truncate(db: Path) -> None:
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])


def damage_the_schema(db: Path) -> None:
    blob = bytearray(db.read_bytes())
    blob[100:112] = b"\xff" * 12  # the b-tree header of page 1, which holds the schema
    db.write_bytes(bytes(blob))


def overwrite_with_text(db: Path) -> None:
    db.write_text("not a database\n" * 1000)


@pytest.mark.parametrize(
    "spoil,says",
    [
        (truncate, "is truncated"),
        (damage_the_schema, "is corrupt"),
        (overwrite_with_text, "is not a SQLite database"),
    ],
)
def test_a_truncated_or_corrupt_store_is_refused_and_kept(
    tiny_overrides, tmp_path, cache, monkeypatch, spoil, says
):
    db = tmp_path / "mlflow.db"
    store_with_a_run(db, cache, monkeypatch)
    spoil(db)
    spoiled = db.read_bytes()
    line = one_line(cnnlab_train(tiny_overrides, tmp_path, cache))
    assert f"{db} {says}" in line
    assert "move it aside (keep it to recover its runs) and run again to start a new store" in line
    assert db.read_bytes() == spoiled  # left for recovery, not repaired or replaced


def test_another_programs_sqlite_file_is_refused_not_migrated(tiny_overrides, tmp_path, cache):
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE notes (text TEXT)")
        connection.execute("INSERT INTO notes VALUES ('mine')")
    connection.close()
    before = db.read_bytes()
    line = one_line(cnnlab_train(tiny_overrides, tmp_path, cache))
    assert f"{db} is another program's SQLite database (tables notes; none of MLflow's)" in line
    assert "set tracking.uri to another file" in line
    assert db.read_bytes() == before  # no MLflow tables added


def test_a_file_named_mlartifacts_is_refused_and_the_store_kept(
    tiny_overrides, tmp_path, cache, monkeypatch
):
    uri = store_with_a_run(tmp_path / "mlflow.db", cache, monkeypatch)
    (tmp_path / "mlartifacts").write_text("someone's notes\n")
    line = one_line(cnnlab_train(tiny_overrides, tmp_path, cache))
    assert f"{tmp_path / 'mlartifacts'} is a file" in line and "move the file aside" in line
    assert [r.info.run_name for r in Store(uri).runs()] == ["kept"]  # no new, failed run beside it
    assert (tmp_path / "mlartifacts").read_text() == "someone's notes\n"


# ----------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> tuple[Path, str, str]:
    """(folder, store URI, run id) of a real one-epoch run, with its checkpoints/last.pt."""
    folder = tmp_path_factory.mktemp("trained")
    store, run_id = train_in_process(folder, tiny_data, "tracking.log_model=false")
    return folder, store.uri, run_id


class Crafted:
    """Unpickled by plain pickle, this creates the file `marker`: code run from a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def crafted_checkpoint(path: Path, marker: Path) -> None:
    torch.save({"model": Crafted(marker), "optimizer": {}, "epoch": 0, "batch": 0}, path)


def another_models_checkpoint(path: Path, marker: Path) -> None:
    torch.save(
        {"model": {"weight": torch.zeros(3)}, "optimizer": {}, "epoch": 0, "batch": 0,
         "running": 0.0, "rng": torch.get_rng_state()},
        path,
    )  # fmt: skip


@pytest.mark.parametrize(
    "write,says",
    [
        (crafted_checkpoint, "holds more than tensors and numbers"),
        (another_models_checkpoint, "does not fit this model and optimizer (Missing key(s)"),
    ],
)
def test_a_bad_checkpoint_is_refused_in_one_line_and_the_run_left_as_it_was(
    trained, tmp_path, cache, write, says
):
    folder, uri, run_id = trained
    marker = tmp_path / "code-ran"
    write(tmp_path / "last.pt", marker)
    client = MlflowClient(uri)
    client.log_artifact(run_id, str(tmp_path / "last.pt"), "checkpoints")  # replaces the real one
    before = client.get_run(run_id)

    line = one_line(cnnlab_train([f"train.resume={run_id}", f"tracking.uri={uri}"], folder, cache))
    assert "last.pt" in line and says in line and "nothing in it was executed" in line
    assert "cnnlab-reproduce" in line
    assert not marker.exists()  # nothing in the file was executed
    after = client.get_run(run_id)
    assert after.info.status == before.info.status == "FINISHED"
    assert after.info.end_time == before.info.end_time
    assert after.data.metrics == before.data.metrics and "cnnlab.error" not in after.data.tags


def another_programs_database(db: Path) -> None:
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE notes (text TEXT)")
    connection.close()


# Commands that only read a store: what they are given on the command line, besides the store.
READERS = [
    ("eval", ["0" * 32]),
    ("predict", ["0" * 32, "digit.png"]),
    ("reproduce", ["0" * 32]),
]


@pytest.mark.parametrize(("command", "args"), READERS)
def test_reading_commands_never_create_a_store(tmp_path, command, args):
    done = cnnlab(command, *args, cwd=tmp_path)
    line = one_error_line(done)
    assert line == (
        f"cnnlab-{command}: error: no MLflow store at {tmp_path / 'mlflow.db'}: train a run "
        "first (cnnlab-train), or point tracking.uri at a store"
    )
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlartifacts


@pytest.mark.parametrize(
    ("command", "args", "spoil", "says"),
    [
        (*READERS[0], another_programs_database, "is another program's SQLite database"),
        (*READERS[1], overwrite_with_text, "is not a SQLite database"),
        (*READERS[2], another_programs_database, "is another program's SQLite database"),
    ],
)
def test_reading_commands_refuse_a_spoiled_store_and_leave_it(tmp_path, command, args, spoil, says):
    db = tmp_path / "mlflow.db"
    spoil(db)
    before = db.read_bytes()
    line = one_error_line(cnnlab(command, *args, cwd=tmp_path))
    assert line.startswith(f"cnnlab-{command}: error: {db} {says}")
    assert db.read_bytes() == before  # not migrated, not repaired, not replaced
