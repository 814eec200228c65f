"""cnnlab-sync: deliver the logs a run kept locally while its tracking store was unreachable.

    cnnlab-sync                       # every run waiting in ./cnnlab-pending
    cnnlab-sync cnnlab-pending/<run_id> [...]

A run whose store failed until its end keeps its params, metrics, artifacts and model in
tracking.pending_dir (default cnnlab-pending/<run_id>) and exits non-zero; once the store is
back, this sends them in their original order and closes the run with the status it ended with.
Credentials come from MLFLOW_TRACKING_USERNAME/PASSWORD, as for cnnlab-train.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cnnlab import CnnlabError
from cnnlab.tracking import sync


def main() -> None:
    """Console entry point of cnnlab-sync."""
    args = sys.argv[1:]
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0)
    folders = [Path(a) for a in args] or sorted(
        p for p in Path("cnnlab-pending").glob("*") if (p / "journal.jsonl").is_file()
    )
    if not folders:
        sys.exit("cnnlab-sync: error: no pending logs here; give the folder a run named")
    failed = 0
    for folder in folders:
        if not (folder / "journal.jsonl").is_file():
            print(f"cnnlab-sync: error: {folder} holds no pending logs", file=sys.stderr)
            failed += 1
            continue
        try:
            uri, run_id, count = sync(folder)
        except CnnlabError as exc:
            print(f"cnnlab-sync: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{folder}: delivered {count} item(s) to run {run_id} in {uri}")
    sys.exit(1 if failed else 0)
