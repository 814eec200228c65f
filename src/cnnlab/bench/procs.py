"""Processes of the real components the bench and the tests start (`mlflow server`, SLURM's
daemons, PostgreSQL, a Ray head): a free port, whether a process or group is alive, waiting until
one is ready, stopping one by its PID. Standard library only: tests/slurm.py and
tests/postgres.py import it when they run as scripts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path


def free_port() -> int:
    """A TCP port nobody listens on at the moment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """Whether process `pid` runs; a zombie (exited, not reaped yet) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: there, and not ours to reap
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def group_alive(pgid: int, leader: subprocess.Popen | None = None) -> bool:
    """Whether any process of group `pgid` is left. `leader`, the Popen of the process that
    leads it, is reaped first: a dead leader left a zombie would keep the group "alive"."""
    if leader is not None:
        leader.poll()
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_group(
    target: int | subprocess.Popen,
    first_signal: int = signal.SIGTERM,
    timeout: float = 15,
    *,
    leader_only: bool = False,
    kill_timeout: float = 5,
) -> bool:
    """Stop the process group that `target` (a PID or the Popen of a process started with
    start_new_session) leads: `first_signal` to the group, up to `timeout` s for it to go, then
    SIGKILL to the group (and the leader) and up to `kill_timeout` s more. A Popen is reaped.
    Returns whether it is gone.

    `leader_only`: the first signal goes to the leader alone, and only its end is waited for, for
    a server that stops its own children on that signal (PostgreSQL's postmaster, SLURM's
    daemons); SIGKILL still goes to the whole group.
    """
    proc = target if isinstance(target, subprocess.Popen) else None
    pid = target.pid if proc is not None else target

    def running() -> bool:
        if not leader_only:
            return group_alive(pid, proc)
        return proc.poll() is None if proc is not None else alive(pid)

    def send(sig: int, *kills: Callable[[int, int], None]) -> None:
        for kill in kills:
            with suppress(ProcessLookupError):
                kill(pid, sig)

    if not running():  # nothing to signal: a PID that ended may be another process's by now
        return True
    send(first_signal, os.kill if leader_only else os.killpg)
    if not _gone(running, timeout):
        send(signal.SIGKILL, os.killpg, os.kill)  # the leader too, had it left its group
        _gone(running, kill_timeout)
    if proc is not None:
        proc.poll()
    return not running()


def _gone(running: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while running():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def log_tail(*paths: Path, lines: int = 15) -> str:
    """The last `lines` lines of the first of `paths` that has any, joined by " | "."""
    for path in paths:
        try:
            text = path.read_text(errors="replace").strip()
        except OSError:
            continue
        if text:
            return " | ".join(text.splitlines()[-lines:])
    return "(no log)"


def wait_until(
    ready: Callable[[], bool],
    what: str,
    timeout: float,
    alive: Callable[[], bool] | None = None,
    log: Path | Callable[[], str] | None = None,
    *,
    error: type[Exception] = RuntimeError,
    interval: float = 0.1,
) -> None:
    """Return once `ready()` is true. Raise `error` once `alive()` is false (what should get
    ready died) or after `timeout` s: "`what`: it exited; log: <the last lines of `log`>".

    `what` says what failed ("PostgreSQL did not start"); `log` is a file, or a function that
    describes the state (its own log tails), called only to raise.
    """
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None and not alive():
            reason = "it exited"
            break
        if ready():
            return
        if time.monotonic() > deadline:
            reason = f"not ready after {timeout:.0f} s"
            break
        time.sleep(interval)
    if callable(log):
        reason += f"; {log()}"
    elif log is not None:
        reason += f"; log: {log_tail(log, lines=5)}"
    raise error(f"{what}: {reason}")
