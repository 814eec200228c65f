"""The process's hardware settings for a run: device, torch threads, determinism.

hardware.threads=0 means "the CPUs this job was given": a Ray task's CPU resources, a SLURM
job's cpus-per-task, else torch's default; under torchrun, that shared by the node's ranks
(torchrun sets OMP_NUM_THREADS=1 and warns that it should be tuned: this is the tuning). Jobs of
a joblib sweep need no arithmetic here: joblib's loky workers start with
OMP_NUM_THREADS/MKL_NUM_THREADS = cores // jobs, which torch follows.
"""

from __future__ import annotations

import logging
import os
import sys

import torch
from omegaconf import DictConfig

from cnnlab import CnnlabError
from cnnlab.training.step import check_cuda_graphs

_DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, before any job changes it

log = logging.getLogger(__name__)


def setup_hardware(hardware: DictConfig) -> torch.device:
    """Apply hardware.threads (0: the job's CPUs) and determinism; the device to train on."""
    # Set both ways every time: jobs of a sweep share this process.
    torch.set_num_threads(hardware.threads or job_threads() or _DEFAULT_THREADS)
    if hardware.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; harmless on the CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.are_deterministic_algorithms_enabled() != bool(hardware.deterministic):
        # Only on a change: the call imports torch's compiler stack (~1.5 s of start-up).
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


def job_threads() -> int | None:
    """Torch threads for hardware.threads=0: the CPUs a scheduler gave this job, or under
    torchrun this rank's share of them (or of the machine's); None: torch's default."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    # torchrun sets OMP_NUM_THREADS=1 where it was unset, and warns to tune it; any other value
    # is the user's, which torch's default already follows.
    if "RANK" not in os.environ or ranks < 1 or os.environ.get("OMP_NUM_THREADS", "1") != "1":
        return allotted_cpus()
    available = allotted_cpus(joblib_share=False) or len(os.sched_getaffinity(0))
    share = max(1, available // ranks)
    log.info(
        "torchrun: %d rank(s) on this node share %d CPUs: %d torch thread(s) each "
        "(hardware.threads=N sets another count)", ranks, available, share,
    )  # fmt: skip
    return share


def allotted_cpus(joblib_share: bool = True) -> int | None:
    """The CPUs a scheduler gave this job (Ray task, SLURM job), or None outside one.

    Without this a job uses one thread per core of the node and its neighbours' cores too:
    with TaskPlugin=task/none SLURM doesn't pin jobs, and Ray never does.
    """
    if "ray" in sys.modules:  # only a Ray worker has imported it; never import it here
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return max(1, int(cpus))
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if not slurm.isdigit() or int(slurm) == 0:
        return None
    # At most torch's default: a joblib worker inside an allocation shares its CPUs (loky set
    # OMP_NUM_THREADS = cores // jobs, which that default follows; torchrun's 1 is no share).
    return min(int(slurm), _DEFAULT_THREADS) if joblib_share else int(slurm)
