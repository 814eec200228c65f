"""hydra/launcher=ray: each job of a sweep runs as a Ray task, on a cluster or a Ray started here.

hydra-ray-launcher 1.2.2 can't be used as it is, so this is its launch loop on Ray's own API:
- It can't join a running cluster: it always passes object_store_memory (75 MB) to `ray.init`,
  which Ray 2 refuses when connecting to one. Here it goes only to a Ray started here.
- Its jobs run in the folder the worker's node ran `ray start` in, and Hydra puts the relative
  hydra.sweep.dir (multirun/...) there: jobs don't find cnnlab-sweep.json (no parent run), and
  their outputs and failure marks never reach the launching command. Here a job runs in the
  launch directory, as under the basic launcher; on a cluster that directory must be on a
  filesystem every node mounts at the same path.
What else cnnlab's jobs need:
- A Ray worker has its node's environment, not the launching shell's: MLFLOW_* and CNNLAB_*
  (the store, its credentials, the data root) go with each job.
- A job whose worker died (killed, out of memory, its node gone) or that a node could not run
  fails like a job that raised, and the sweep goes on. Ctrl-C stops the jobs as it stops one
  under the basic launcher (runs KILLED, resumable), where Ray would kill them, runs RUNNING.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import (
    JobReturn,
    configure_log,
    filter_overrides,
    run_job,
    setup_globals,
)
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from cnnlab import CnnlabError, one_line
from cnnlab.sweeps.jobs import lost_job

if TYPE_CHECKING:
    from hydra_plugins.cnnlab_ray_launcher import CnnlabRayLauncher

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE = 78_643_200  # bytes for a Ray started here; jobs pass configs, not tensors
# A Ray worker has its node's environment, not the launching shell's: the store's URI, its
# credentials (cnnlab.cli moves them out of the URI into the environment) and CNNLAB_DATA_ROOT
# travel with each job, so that parent and children use the same store.
FORWARDED_ENV = ("MLFLOW_", "CNNLAB_")
CANCEL_WAIT = 60.0  # s for jobs to close their runs after Ctrl-C (a checkpoint, the logs)
LOG_LAG = 1.0  # s; Ray's log monitor polls jobs' output files every 0.1 s when idle


def launch(
    launcher: CnnlabRayLauncher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> list[JobReturn]:
    """Start one Ray task per job and wait for all of them; a lost job is a failed job."""
    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    start_ray(launcher.ray_cfg.init)
    options = OmegaConf.to_container(launcher.ray_cfg.remote, resolve=True)
    job = ray.remote(**options)(cnnlab_job) if options else ray.remote(cnnlab_job)
    log.info(f"Ray: launching {len(job_overrides)} jobs, sweep output dir: {sweep_dir}")
    launched = []
    for num, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
        config = launcher.hydra_context.config_loader.load_sweep_config(
            launcher.config, list(overrides)
        )
        with open_dict(config):
            config.hydra.job.num = num
        ref = job.remote(
            str(Path.cwd()), cnnlab_environment(os.environ), launcher.hydra_context, config,
            launcher.task_function, Singleton.get_state(),
        )  # fmt: skip
        launched.append((config, overrides, ref))
    # Ray forwards the jobs' output with a lag, and would print its last lines after the sweep's
    # summary and cnnlab's error line, or drop them at exit: wait for them, then disconnect (a
    # Ray started here stops; a search sweeper's next batch starts or joins one again).
    try:
        results = [job_return(config, ovr, ref) for config, ovr, ref in launched]
        time.sleep(LOG_LAG)
    except KeyboardInterrupt:
        # Ctrl-C: Ray would kill the jobs when this process leaves, their runs left RUNNING.
        # Ray's cancel is a Ctrl-C in the job instead: its run ends KILLED, as under the basic
        # launcher, and can be resumed.
        refs = [ref for _, _, ref in launched]
        for ref in refs:
            ray.cancel(ref)
        ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT)
        time.sleep(LOG_LAG)
        raise
    finally:
        ray.shutdown()
    return results


def start_ray(init: DictConfig) -> None:
    """Join the cluster hydra.launcher.ray.init.address names, or start a Ray here.

    address null: $RAY_ADDRESS, else the cluster `ray start` last started on this machine, else
    a new Ray for this command only; "local": always a new one; "auto": this machine's cluster
    or an error; HOST:PORT: the cluster whose head is there.
    """
    if ray.is_initialized():  # a search sweeper's next batch
        return
    if not sys.stdout.isatty():  # jobs' output in a log file: no colour codes in Ray's prefixes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    kwargs: dict[str, Any] = OmegaConf.to_container(init, resolve=True)
    address = kwargs.get("address")
    setting = f"hydra.launcher.ray.init.address={address}"
    try:
        target = ray_address(address, kwargs.get("_temp_dir"))
        if target is None:
            kwargs.setdefault("object_store_memory", LOCAL_OBJECT_STORE)
        # A Ray Client address, or "auto" with no cluster on record: ray.init finds the head.
        elif target != "auto" and not str(address).startswith("ray://"):
            check_head(head_address(target), setting)
        ray.init(**kwargs)
    except (ConnectionError, ValueError, TimeoutError) as exc:
        raise CnnlabError(
            f"hydra/launcher=ray can't start or join Ray ({setting}): {one_line(exc)}; give the "
            "address of a running head (`ray start --head` prints it), or null to start one here"
        ) from None


def ray_address(address: str | None, temp_dir: str | None) -> str | None:
    """What `ray.init(address=address, _temp_dir=temp_dir)` joins: the address it is given or
    finds, "auto" where it is to look among this machine's processes, None for a new Ray here.

    Ray has no public function for this: these are ray.init's documented rules for `address`
    ($RAY_ADDRESS, then the cluster `ray start` last started, recorded in ray_current_cluster).
    """
    if address in (None, "auto"):
        address = os.environ.get("RAY_ADDRESS") or address
    if address in (None, "auto"):
        current = ray_temp_dir(temp_dir) / "ray_current_cluster"
        if current.exists():
            address = current.read_text().strip()
        elif address == "auto":
            return "auto"
    return None if address in (None, "local") else address


def ray_temp_dir(temp_dir: str | None) -> Path:
    """Ray's temp folder: hydra.launcher.ray.init._temp_dir, else Ray's default."""
    if temp_dir is not None:
        return Path(temp_dir)
    # Where Ray itself looks without one (its source, not its docs): the same record file.
    if "RAY_TMPDIR" in os.environ:
        base = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and "TMPDIR" in os.environ:
        base = os.environ["TMPDIR"]
    elif sys.platform.startswith(("darwin", "linux")):
        base = "/tmp"
    else:
        base = tempfile.gettempdir()
    return Path(base) / "ray"


def head_address(address: str) -> str:
    """A head's HOST:PORT (or [IPv6]:PORT) as ray.init joins it; ValueError if malformed."""
    bracketed = address.startswith("[")
    host, sep, port = address[1:].partition("]:") if bracketed else address.partition(":")
    if not sep or ":" in port:
        raise ValueError(f"Invalid address format: {address}")
    if not host:
        raise ValueError(f"Malformed host: {host}")
    # Ray joins a head on this machine at the node's address, which the head may listen on alone.
    if host in ("localhost", "127.0.0.1", "::1"):
        host = ray.util.get_node_ip_address()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_head(head: str, setting: str, timeout: float = 10) -> None:
    """Fail at once if nothing answers at the head's host:port: `ray.init` would retry it for
    ever, deaf to Ctrl-C."""
    host, _, port = head.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise CnnlabError(
            f"no Ray head answers at {head} ({setting}): {one_line(exc)}; start one with "
            "`ray start --head --port=PORT` or fix the address"
        ) from None


def cnnlab_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables in `environ` that cnnlab and MLflow read (MLFLOW_*, CNNLAB_*)."""
    return {k: v for k, v in environ.items() if k.startswith(FORWARDED_ENV)}


def set_cnnlab_environment(env: dict[str, str]) -> None:
    """Make `env` this process's MLFLOW_* and CNNLAB_* variables, all of them."""
    for name in cnnlab_environment(os.environ):
        del os.environ[name]
    os.environ.update(env)


def cnnlab_job(
    launch_dir: str,
    env: dict[str, str],
    hydra_context: HydraContext,
    config: DictConfig,
    task_function: TaskFunction,
    singleton_state: dict[Any, Any],
) -> JobReturn:
    """One job, in a Ray worker: Hydra's run_job, in the launch directory, with the launching
    process's MLFLOW_* and CNNLAB_* variables in place of the worker's."""
    worker_dir, worker_env = os.getcwd(), cnnlab_environment(os.environ)
    try:
        os.chdir(launch_dir)
    except OSError:
        raise CnnlabError(
            f"the launch directory {launch_dir} is missing on Ray node "
            f"{ray.util.get_node_ip_address()}; with hydra/launcher=ray, launch from a folder "
            "that every node mounts at the same path (a shared filesystem)"
        ) from None
    set_cnnlab_environment(env)
    try:
        setup_globals()
        Singleton.set_state(singleton_state)  # the launching process's ConfigStore and plugins
        with open_dict(config):  # what SLURM_JOB_ID is under SLURM: where to find its logs
            config.hydra.job.id = ray.get_runtime_context().get_task_id()
        HydraConfig.instance().set_config(config)
        return run_job(
            hydra_context=hydra_context,
            task_function=task_function,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
    finally:  # the worker runs other jobs next
        os.chdir(worker_dir)
        set_cnnlab_environment(worker_env)


def job_return(config: DictConfig, overrides: Sequence[str], ref: Any) -> JobReturn:
    """The job's result; for a job Ray could not run or finish, a lost job's (sweep.lost_job)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:  # an error in the job itself is in its JobReturn
        return lost_job(config, overrides, why_lost(exc))


def why_lost(exc: ray.exceptions.RayError) -> str:
    """One line on why Ray returned no result for a job."""
    if not isinstance(exc, ray.exceptions.RayTaskError):  # killed, out of memory, node gone
        return f"its Ray worker died: {one_line(exc)}"
    if isinstance(exc.cause, CnnlabError):  # raised by cnnlab_job itself
        return str(exc.cause)
    # E.g. a node whose cnnlab is older: Ray's text ends with the error from the worker.
    return (
        f"a Ray worker could not run it: {str(exc).strip().splitlines()[-1]}; every node needs "
        "the cnnlab (and Python packages) of the machine the sweep is launched from"
    )
