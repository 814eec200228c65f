"""Where the configs are, and composing one: cnnlab-train's config for the commands that need
it (eval, predict, reproduce, ui, tests), resolved from the launch directory."""

from __future__ import annotations

import warnings
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cnnlab.config.validate import register, validate

# An installed wheel carries conf/ inside the package; a source checkout (pip install -e) reads
# the top-level conf/ so that edits there take effect at once.
_PACKAGED_CONF = Path(__file__).parents[1] / "conf"
CONF_DIR = str(_PACKAGED_CONF if _PACKAGED_CONF.is_dir() else Path(__file__).parents[3] / "conf")

register()  # conf/*.yaml extend the typed schemas: every command composes with them

# conf/hydra/launcher/submitit_local.yaml (and ray.yaml, where hydra-ray-launcher is installed)
# shadow the plugins' presets of the same names on purpose; Hydra 1.3 then merges each file onto
# the plugin's schema and warns on every run that such matching is deprecated. The files carry
# all their keys themselves.
warnings.filterwarnings(
    "ignore",
    r"\s*'hydra/launcher/(ray|submitit_local)' is validated against ConfigStore schema",
    UserWarning,
)


def launch_dir() -> Path:
    """The folder the command was started in, also inside a job run with hydra.job.chdir=true.

    Relative paths (the default store, data.root, tracking.pending_dir) are taken from here, so
    every job of a run or sweep shares one store and one data folder.
    """
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.cwd)
    return Path.cwd()


def launch_path(path: str) -> Path:
    """`path` (data.root, tracking.pending_dir) taken from the launch directory if relative."""
    return launch_dir() / Path(path).expanduser()


def resolve_uri(uri: str | None, launch_dir: Path) -> str:
    """The absolute tracking URI: None means the SQLite store mlflow.db in `launch_dir`."""
    if uri is None:
        return f"sqlite:///{(launch_dir / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # A relative SQLite path would follow the process's cwd; pin it to the launch directory.
        return f"sqlite:///{(launch_dir / uri[len('sqlite:///') :]).resolve()}"
    return uri


def compose_config(overrides: list[str]) -> DictConfig:
    """cnnlab-train's config with key=value `overrides`, checked the same way."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    validate(cfg)
    return cfg


def store_uri(cfg: DictConfig) -> str:
    """The absolute tracking URI `cfg` names (tracking.uri, $MLFLOW_TRACKING_URI, ./mlflow.db)."""
    return resolve_uri(cfg.tracking.uri, launch_dir())
