"""cnnlab-sync: deliver the logs a run kept locally while its tracking store was unreachable.

    cnnlab-sync                       # every run waiting in ./cnnlab-pending
    cnnlab-sync cnnlab-pending/<run_id> [...]

A run whose store failed until its end keeps its params, metrics, artifacts and model in
tracking.pending_dir (default cnnlab-pending/<run_id>) and exits non-zero; once the store is
back, this sends them in their original order and closes the run with the status it ended with.
Credentials come from MLFLOW_TRACKING_USERNAME/PASSWORD, as for cnnlab-train.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cnnlab import CnnlabError
from cnnlab.commands.cli import command
from cnnlab.config.compose import launch_dir


def sync_folders(folders: list[Path]) -> int:
    """Deliver each folder's pending logs; return how many could not be delivered."""
    from cnnlab.tracking.journal import sync

    if not folders:
        pending = launch_dir() / "cnnlab-pending"
        folders = sorted(p for p in pending.glob("*") if (p / "journal.jsonl").is_file())
        if not folders:
            raise CnnlabError("no pending logs in ./cnnlab-pending; give the folder of a run")
    failed = 0
    for folder in folders:
        try:
            if not (folder / "journal.jsonl").is_file():
                raise CnnlabError(f"{folder} holds no pending logs")
            uri, run_id, count = sync(folder)
        except CnnlabError as exc:
            print(f"cnnlab-sync: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{folder}: delivered {count} item(s) to run {run_id} in {uri}")
    return failed


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folders", nargs="*", type=Path, help="cnnlab-pending/<run_id> folders")


def main() -> None:
    """Console entry point of cnnlab-sync."""
    command("cnnlab-sync", __doc__, _arguments, lambda args: sync_folders(args.folders))
