"""cnnlab-bench's command line: Hydra composes conf/bench.yaml, then `cnnlab.bench` measures.

Light, like cnnlab.train_cli: `cnnlab-bench --help` and a config error answer before torch loads.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from cnnlab import CnnlabError
from cnnlab.commands.cli import run_cli
from cnnlab.config.compose import CONF_DIR
from cnnlab.config.validate import validate


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="bench")
def hydra_main(cfg: DictConfig) -> None:
    """The Hydra task behind cnnlab-bench."""
    try:
        validate(cfg)  # before torch is imported: a bad value is one line, at once
        from cnnlab.bench.run import run_bench

        run_bench(cfg)
    except CnnlabError as exc:
        sys.exit(f"cnnlab-bench: error: {exc}")


def main() -> None:
    """Console entry point of cnnlab-bench."""
    run_cli("cnnlab-bench", hydra_main)


if __name__ == "__main__":
    main()
