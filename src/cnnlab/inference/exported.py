"""A logged model read back without running anything from the store.

MLflow loads a PyTorch model with torch.load (a pickle) or torch.export.load, which unpickles
records and eval()s the graph's shape expressions: a crafted model runs code on the reader's
machine. Here the network is rebuilt from its run's logged config (models.build_network: only a
torch.nn.Module class, never from the standard library) and given the weights read out of the
model's pt2 archive as plain tensors.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from omegaconf.errors import OmegaConfBaseException

from cnnlab import CnnlabError
from cnnlab.config.validate import typed_config, validate
from cnnlab.models import networks as models


class ModelFileError(CnnlabError):
    """A logged model that cannot be loaded without running code from the store."""


TRUST_STORE_HINT = "pass --trust-store if you trust the store that wrote it"

# torch.export's ScalarType numbers (torch/_export/serde/schema.py): part of its archive format.
# The integers and bool are buffers, e.g. BatchNorm's num_batches_tracked (int64).
_EXPORT_DTYPES = {
    1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64,
    6: torch.float16, 7: torch.float32, 8: torch.float64, 12: torch.bool, 13: torch.bfloat16,
}  # fmt: skip


def signature_shapes(mlmodel: dict[str, Any], model_uri: str) -> tuple[tuple[int, ...], int]:
    """(C, H, W) of one image and the number of classes, from the MLmodel's tensor signature
    (inputs (-1, C, H, W), outputs (-1, classes))."""
    try:
        inputs, outputs = (
            json.loads(mlmodel["signature"][side])[0]["tensor-spec"]["shape"]
            for side in ("inputs", "outputs")
        )
        in_shape, num_classes = tuple(inputs[1:]), outputs[-1]
        if all(isinstance(n, int) and n > 0 for n in (*in_shape, num_classes)):
            return in_shape, num_classes
    except (KeyError, IndexError, TypeError, ValueError):
        pass
    raise ModelFileError(
        f"model {model_uri} has no tensor signature (-1, C, H, W) -> (-1, classes) in its MLmodel"
    )


def archive(local: Path, mlmodel: dict[str, Any], model_uri: str) -> Path:
    """The model's pt2 archive, or a one-line refusal for a format that runs code when loaded."""
    flavors = mlmodel.get("flavors")
    flavor = flavors.get("pytorch") if isinstance(flavors, dict) else None
    if not isinstance(flavor, dict) or not isinstance(flavor.get("model_data"), str):
        raise ModelFileError(f"model {model_uri} is not an MLflow PyTorch model")
    data = (local / flavor["model_data"]).resolve()
    if not data.is_relative_to(local.resolve()):
        raise ModelFileError(f"model {model_uri} points outside itself (model_data); not loaded")
    archive = data / "model.pt2"
    if data.is_file() or (data / "model.pth").exists():
        raise ModelFileError(
            f"model {model_uri} is stored as a pickle (torch.save), which can run code when "
            f"loaded; {TRUST_STORE_HINT}"
        )
    if not archive.is_file():
        raise ModelFileError(f"model {model_uri} has no {flavor['model_data']}/model.pt2 to load")
    return archive


def rebuilt_network(
    config: dict[str, Any],
    in_shape: tuple[int, ...],
    num_classes: int,
    archive: Path,
    model_uri: str,
) -> torch.nn.Module:
    """The logged config's model, built without memory (meta), given the archive's weights."""
    try:
        cfg = typed_config(config)  # typed keys; a _target_ that is no model is an error
        validate(cfg)
        network = _network_with(cfg, in_shape, num_classes, weights(archive))
    except (
        CnnlabError, OmegaConfBaseException, AttributeError, KeyError, TypeError, ValueError,
        RuntimeError, zipfile.BadZipFile,
    ) as exc:  # fmt: skip
        # load_state_dict's first line is a heading; the mismatch itself is on the second.
        reason = "; ".join(line.strip() for line in str(exc).strip().splitlines()[:2])
        raise ModelFileError(
            f"model {model_uri}: cannot rebuild it from its run's config and model.pt2 "
            f"({exc.__class__.__name__}: {reason}); {TRUST_STORE_HINT}"
        ) from exc
    return network.eval()


def _network_with(
    cfg: Any, in_shape: tuple[int, ...], num_classes: int, state: dict[str, torch.Tensor]
) -> torch.nn.Module:
    # Built on the meta device (no memory, no initialisation), then given the tensors: a config
    # whose shapes are not the stored weights' (model.conv_channels=[20000, 20000]) is refused
    # here, having allocated nothing. A class whose constructor cannot run on meta, or with a
    # buffer the state dict lacks (persistent=False), is built again on the CPU, and only if its
    # meta build (where there is one) holds no more numbers than the stored weights do.
    try:
        with torch.device("meta"):
            network = models.configured_network(cfg, in_shape, num_classes)
    except CnnlabError:
        raise
    except Exception:  # noqa: BLE001 - no meta build: the CPU build below says what is wrong
        network = None
    if network is not None:
        network.load_state_dict(state, strict=True, assign=True)  # a mismatch raises here
        if not any(t.is_meta for t in (*network.parameters(), *network.buffers())):
            return network
        stored = sum(t.numel() for t in state.values())
        built = sum(t.numel() for t in (*network.parameters(), *network.buffers()))
        if built > 2 * stored + 1_000_000:  # room for small non-persistent buffers only
            raise ValueError(f"the config builds {built} numbers but the model stores {stored}")
    network = models.configured_network(cfg, in_shape, num_classes)
    network.load_state_dict(state, strict=True)
    return network


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The parameters of a torch.export archive as raw tensors.

    torch.export.load would also unpickle records and eval() the graph's shape expressions
    (sympy), so it is never called.
    """
    with zipfile.ZipFile(path) as pt2:
        [config_name] = [
            n for n in pt2.namelist() if n.endswith("/data/weights/model_weights_config.json")
        ]
        root = config_name.removesuffix("data/weights/model_weights_config.json")
        if pt2.read(f"{root}byteorder").decode() != sys.byteorder:
            raise ValueError("the weights were written with another byte order")
        weights = {}
        for name, entry in json.loads(pt2.read(config_name))["config"].items():
            if entry["use_pickle"] is not False:
                raise ValueError(f"weight {name} is pickled")
            meta = entry["tensor_meta"]
            record = pt2.getinfo(f"{root}data/weights/{entry['path_name']}")
            if record.compress_type != zipfile.ZIP_STORED:  # no inflating: memory <= file size
                raise ValueError(f"weight {name} is compressed")
            flat = torch.frombuffer(
                bytearray(pt2.read(record)), dtype=_EXPORT_DTYPES[meta["dtype"]]
            )
            weights[name] = torch.as_strided(
                flat,
                [d["as_int"] for d in meta["sizes"]],
                [d["as_int"] for d in meta["strides"]],
                meta["storage_offset"]["as_int"],
            )
    return weights
