"""A private single-node SLURM cluster on loopback, for tests and benchmarks.

Everything lives in one folder: a munge key and a munged of its own (the system's munged and
/etc/munge/munge.key are not needed), a generated slurm.conf with free ports, and the state,
spool, pid and log files of slurmctld and slurmd. The daemons run in the foreground as children
of whoever starts the cluster and are stopped by PID, never by name.

    python tests/slurm.py start DIR    # prints `export SLURM_CONF=...` and the PIDs
    python tests/slurm.py stop DIR     # stops them by the PIDs recorded in DIR/pids.json
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cnnlab.bench.procs import alive, free_port, log_tail, stop_group, wait_until

DAEMONS = ("munged", "slurmctld", "slurmd")
NODE = "localhost"  # slurmctld accepts SlurmctldHost=localhost on any machine's name


class SlurmError(RuntimeError):
    """The cluster cannot start here (binaries missing, a daemon died, the node never idle)."""


def _real_memory_mb() -> int:
    # The node may not claim more memory than slurmd finds (it would be drained); 90% leaves
    # room for what the machine itself uses.
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(int(line.split()[1]) / 1024 * 0.9)
    return 1024


class SlurmCluster:
    """munged + slurmctld + slurmd in `folder`; `env` is the environment for SLURM commands."""

    def __init__(self, folder: Path | str, cpus: int = 2) -> None:
        self.folder = Path(folder).resolve()
        self.cpus = cpus
        self.conf = self.folder / "slurm.conf"
        self.socket = self.folder / "munge.socket"
        self.pids: dict[str, int] = {}
        self._procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ---------------------------------------------------------------------------- start / stop
    def start(self, timeout: float = 30) -> SlurmCluster:
        """Start the three daemons and wait (up to `timeout` s) until the node is idle."""
        missing = [b for b in ("mungekey", *DAEMONS, "sinfo", "sbatch", "srun", "scontrol")
                   if _binary(b) is None]  # fmt: skip
        if missing:
            raise SlurmError(
                f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)"
            )
        if len(str(self.socket)) > 100:  # a Unix socket's path holds at most 107 bytes
            raise SlurmError(f"folder {self.folder} is too deep for munge's socket")
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)  # munged refuses a key or socket others could write
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir(exist_ok=True)
        try:
            self._start_munged()
            self.conf.write_text(self._slurm_conf())
            # -c: no jobs from an earlier cluster in this folder (`start DIR` twice).
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-N", NODE, "-f", str(self.conf)])
            self._write_pids()
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 15) -> None:
        """Cancel every job, then SIGTERM each daemon by PID (SIGKILL after `timeout` s)."""
        if self.pids.get("slurmctld") and alive(self.pids["slurmctld"]):
            subprocess.run(["scancel", "--full", "--user", str(os.getuid())], env=self.env,
                           capture_output=True, timeout=15)  # fmt: skip
            # Jobs' processes are slurmd's (slurmstepd) children: let them go before slurmd does.
            deadline = time.monotonic() + timeout
            while self._queue("PENDING,RUNNING,COMPLETING") and time.monotonic() < deadline:
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):  # the reverse of the start order
            pid = self.pids.pop(name, None)
            if pid is not None and _runs(pid, name):  # a recorded PID may be reused by now
                stop_group(pid, timeout=timeout, leader_only=True)  # SIGTERM, then SIGKILL
        for proc in self._procs:
            if proc.poll() is None:
                proc.wait(timeout=timeout)
        self._procs.clear()
        (self.folder / "pids.json").unlink(missing_ok=True)

    def _start_munged(self) -> None:
        key = self.folder / "munge.key"
        if not key.exists():
            _check(["mungekey", "--create", "--keyfile", str(key)], "mungekey")
        os.chmod(key, 0o600)
        # --force: as root, and in a folder under /tmp (world-writable ancestors).
        self._spawn(
            "munged",
            ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={self.socket}",
             f"--pid-file={self.folder / 'munged.pid'}", f"--log-file={self.folder / 'munged.log'}",
             f"--seed-file={self.folder / 'munged.seed'}", "--num-threads=2"],
        )  # fmt: skip
        munged = self._procs[-1]
        wait_until(self.socket.exists, "munged did not start", 10,
                   alive=lambda: munged.poll() is None, log=self.folder / "munged.log",
                   error=SlurmError)  # fmt: skip

    def _slurm_conf(self) -> str:
        f = self.folder
        return f"""\
# Generated by tests/slurm.py: a one-node cluster on loopback, every file in {f}.
ClusterName=cnnlab
SlurmctldHost={NODE}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# The private munged. cred_expire also holds a requeued job back before it may start again:
# SLURM's default, 120 s, would make a requeue test wait two minutes.
AuthInfo=socket={self.socket},cred_expire=5
StateSaveLocation={f / "state"}
SlurmdSpoolDir={f / "spool"}
SlurmctldPidFile={f / "slurmctld.pid"}
SlurmdPidFile={f / "slurmd.pid"}
SlurmctldLogFile={f / "slurmctld.log"}
SlurmdLogFile={f / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# No cgroups: works in containers; jobs are not pinned (hardware.threads=0 reads
# SLURM_CPUS_PER_TASK instead).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
# The node is what this file says, whatever the machine has (a 1-core CI runner still gets 2).
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=30
KillWait=5
InactiveLimit=0
SlurmdTimeout=60
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_real_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.folder / f"{name}.out", "ab")  # the child's copy stays open
        proc = subprocess.Popen(
            [_binary(argv[0]), *argv[1:]], cwd=self.folder, env=self.env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal is for the tests, not the daemons
        )  # fmt: skip
        log.close()
        self._procs.append(proc)
        self.pids[name] = proc.pid

    def _write_pids(self) -> None:
        (self.folder / "pids.json").write_text(json.dumps(self.pids))

    def _wait_idle(self, timeout: float) -> None:
        state = ""

        def idle() -> bool:
            nonlocal state
            done = subprocess.run(
                ["sinfo", "--noheader", "--format=%T", "--nodes", NODE],
                env=self.env, capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            state = done.stdout.strip() or done.stderr.strip()
            return state == "idle"

        def report() -> str:  # the daemons that exited, else slurmd and slurmctld
            dead = [name for name, pid in self.pids.items() if not alive(pid)]
            logs = (f"{name}{' (exited)' if name in dead else ''}: "
                    f"{self._log(f'{name}.log', f'{name}.out')}"
                    for name in dead or ("slurmd", "slurmctld"))  # fmt: skip
            return "; ".join((f"sinfo: {state!r}", *logs))

        wait_until(idle, "the SLURM node is not idle", timeout,
                   alive=lambda: all(alive(pid) for pid in self.pids.values()), log=report,
                   error=SlurmError, interval=0.5)  # fmt: skip

    # -------------------------------------------------------------------------------- queries
    def _queue(self, states: str = "all") -> list[str]:
        done = subprocess.run(["squeue", "--noheader", "--format=%i", f"--states={states}"],
                              env=self.env, capture_output=True, text=True, timeout=15)  # fmt: skip
        return done.stdout.split() if done.returncode == 0 else []

    def running_jobs(self) -> list[str]:
        """Ids of the running jobs, array tasks as `<job>_<task>`."""
        return self._queue("RUNNING")

    def job_field(self, job_id: str, field: str) -> str:
        """One `Key=value` field of `scontrol show job` (e.g. Restarts, JobState)."""
        done = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], env=self.env,
                              capture_output=True, text=True, timeout=15)  # fmt: skip
        for item in done.stdout.split():
            key, _, value = item.partition("=")
            if key == field:
                return value
        raise KeyError(f"{field} not in `scontrol show job {job_id}`: {done.stdout or done.stderr}")

    def _log(self, *names: str, lines: int = 15) -> str:
        return log_tail(*(self.folder / name for name in names), lines=lines)


def _binary(name: str) -> str | None:
    """The path of a program; daemons live in /usr/sbin, which a user's PATH may lack."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


def _check(argv: list[str], what: str) -> None:
    done = subprocess.run([_binary(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise SlurmError(f"{what} failed: {done.stderr.strip() or done.stdout.strip()}")


def _runs(pid: int, program: str) -> bool:
    """Whether process `pid` runs `program`."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return Path(argv0.decode(errors="replace")).name == program


def main(argv: list[str]) -> int:
    """`start DIR` / `stop DIR`, for a developer or a benchmark."""
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python tests/slurm.py start|stop DIR", file=sys.stderr)
        return 2
    command, folder = argv[0], Path(argv[1]).resolve()
    cluster = SlurmCluster(folder)
    if command == "start":
        try:
            cluster.start()
        except SlurmError as exc:
            print(f"slurm.py: error: {exc}", file=sys.stderr)
            return 1
        # The daemons are in their own sessions: they outlive this command.
        print(f"export SLURM_CONF={cluster.conf}")
        print(" ".join(f"{name}={pid}" for name, pid in cluster.pids.items()))
        print(f"stop with: python {__file__} stop {folder}")
        return 0
    pids_file = folder / "pids.json"
    if not pids_file.exists():
        print(f"slurm.py: error: no {pids_file}: nothing started there", file=sys.stderr)
        return 1
    cluster.pids = json.loads(pids_file.read_text())
    cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
