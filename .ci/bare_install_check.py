"""After the README's Quickstart train command, on the bare install it prescribes (no extras):

- the command trained one run, FINISHED, into ./mlflow.db;
- every console script answers --help;
- every module of cnnlab and of its Hydra plugins imports (Hydra imports every hydra_plugins
  module at each start), but those that are the optional features themselves;
- each feature of the cluster extra, asked for, is refused in one line naming the extra.

A runtime import that only an extra satisfies fails here, not on a user's machine.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import sqlite3
import subprocess
import sys
from pathlib import Path

# Modules that are an extra's feature (the cluster extra's Ray launcher), imported only when it
# is asked for; the plugin class Hydra loads says in one line which extra to install.
EXTRA_ONLY = {"cnnlab.sweeps.ray_launcher"}

# Each feature of the cluster extra, as a user asks for it (tracking off: nothing is logged).
NEEDS_CLUSTER_EXTRA = [
    ["-m", "hydra/launcher=slurm", "tracking.enabled=false"],
    ["-m", "hydra/launcher=submitit_local", "tracking.enabled=false"],
    ["-m", "hydra/launcher=ray", "tracking.enabled=false"],
    ["tracking.uri=postgresql://cnnlab@127.0.0.1:9/cnnlab"],
]


def main() -> None:
    with sqlite3.connect(Path("mlflow.db")) as db:
        runs = db.execute("SELECT status FROM runs").fetchall()
    assert runs == [("FINISHED",)], f"expected one FINISHED run in ./mlflow.db, found {runs}"

    bin_dir = Path(sys.executable).parent
    scripts = sorted(
        e.name for e in importlib.metadata.distribution("cnnlab").entry_points
        if e.group == "console_scripts"
    )  # fmt: skip
    for script in scripts:
        subprocess.run([bin_dir / script, "--help"], check=True, stdout=subprocess.DEVNULL)

    from cnnlab import CLUSTER_EXTRA

    for args in NEEDS_CLUSTER_EXTRA:
        done = subprocess.run(
            [bin_dir / "cnnlab-train", *args], capture_output=True, text=True, check=False
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1 and CLUSTER_EXTRA in lines[0], (
            f"cnnlab-train {' '.join(args)}: exit {done.returncode}, stderr {done.stderr[-2000:]}"
        )

    import cnnlab
    import hydra_plugins

    modules = [
        m.name
        for package, prefix in ((cnnlab, "cnnlab."), (hydra_plugins, "hydra_plugins."))
        for m in pkgutil.walk_packages(package.__path__, prefix)  # every folder's modules too
        if m.name.startswith(("cnnlab", "hydra_plugins.cnnlab_"))
    ]
    for name in sorted(set(modules) - EXTRA_ONLY):
        importlib.import_module(name)
    print(
        f"bare install: 1 FINISHED run, {len(scripts)} console scripts answer --help, "
        f"{len(NEEDS_CLUSTER_EXTRA)} cluster features name their extra, "
        f"{len(set(modules) - EXTRA_ONLY)} modules import"
    )


if __name__ == "__main__":
    main()
