"""The process's hardware settings for a run: device, torch threads, determinism.

Jobs of a joblib sweep need no thread arithmetic here: joblib's loky workers start with
OMP_NUM_THREADS/MKL_NUM_THREADS = cores // jobs, which torch follows.
"""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig

from cnnlab import CnnlabError
from cnnlab.step import check_cuda_graphs

_DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, before any job changes it


def setup_hardware(hardware: DictConfig) -> torch.device:
    """Apply hardware.threads (0: torch's default) and determinism; the device to train on."""
    # Set both ways every time: jobs of a sweep share this process.
    torch.set_num_threads(hardware.threads or _DEFAULT_THREADS)
    if hardware.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; harmless on the CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(bool(hardware.deterministic))
    name = hardware.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CnnlabError(
            f"hardware.device={name} but no CUDA GPU is visible; use hardware=cpu or hardware=auto"
        )
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # streams, graphs and libraries then use this GPU too
    if hardware.cuda_graphs:
        check_cuda_graphs(device)  # now, not after the data is read and the run created
    return device
