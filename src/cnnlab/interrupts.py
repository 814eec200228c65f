"""Ctrl-C, SIGTERM and SIGHUP: a run that exists ends KILLED (resumable), never left RUNNING.

`timeout`, `docker stop` and SLURM send SIGTERM; a closed terminal sends SIGHUP. While a run is
open (`handled`), each of them raises `Terminated` wherever the program is, so the run's
closing code marks it KILLED. Two stretches handle the first signal more gently:
`stop_requests` (training stops after the current mini-batch, to checkpoint) and `deferred`
(the run's last writes are being delivered). A second signal always stops at once.

SIGUSR1/SIGUSR2 are taken over the same way when a library already handles them: submitit, which
runs SLURM jobs, requeues its job on SIGUSR2 (preemption, or the time limit drawing near). The
run stops as on SIGTERM, resumable, and once it is closed the signal goes on to that handler.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
HANDED_ON = (signal.SIGUSR1, signal.SIGUSR2)  # taken over only from a Python handler


class Terminated(KeyboardInterrupt):
    """A stop signal, handled like Ctrl-C; the process exits with 128 + `signum`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_mode: list[str] = ["raise"]  # innermost last: raise | graceful | defer
_received: list[int] = []  # signals held back by the innermost gentle stretch


def _handler(signum: int, frame: Any) -> None:
    if _mode[-1] == "raise" or _received:
        raise Terminated(signum)
    _received.append(signum)
    then = "the next mini-batch to save a checkpoint" if _mode[-1] == "graceful" else "its logs"
    print(
        f"{signal.Signals(signum).name}: stopping after {then}; again to stop at once",
        file=sys.stderr,
    )


@contextmanager
def handled() -> Iterator[None]:
    """Within: SIGINT, SIGTERM and SIGHUP raise Terminated (only the main thread gets them).

    So do SIGUSR1 and SIGUSR2 where a Python handler had them; a run they stop is closed first,
    then that handler gets the signal (submitit then requeues the job and exits).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
            previous[sig] = signal.signal(sig, _handler)
    for sig in HANDED_ON:
        if callable(signal.getsignal(sig)):  # not SIG_DFL: that would kill a plain process
            previous[sig] = signal.signal(sig, _handler)
    stopped_by = None
    try:
        yield
    except Terminated as stop:
        stopped_by = stop.signum
        raise
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if stopped_by in HANDED_ON and stopped_by in previous:
            # Its handler runs here, now that the run is closed; whatever it raises (submitit:
            # SystemExit after requeueing) replaces Terminated.
            signal.raise_signal(stopped_by)


@contextmanager
def _gentle(mode: str) -> Iterator[None]:
    _mode.append(mode)
    held = list(_received)
    _received.clear()
    try:
        yield
    finally:
        _mode.pop()
        late, _received[:] = list(_received), held
    if late:
        raise Terminated(late[0])  # the stretch is done: now stop as asked


@contextmanager
def stop_requests() -> Iterator[Callable[[], int | None]]:
    """Within: a signal asks to stop after the current mini-batch; `stop()` says which one."""
    with _gentle("graceful"):
        yield lambda: _received[0] if _received else None


@contextmanager
def deferred() -> Iterator[None]:
    """Within: a signal waits for the block to finish, then raises Terminated."""
    with _gentle("defer"):
        yield


def exit_status(exc: KeyboardInterrupt) -> int:
    """The shell's status for a process stopped by `exc`: 128 + the signal (Ctrl-C: 130)."""
    return 128 + getattr(exc, "signum", signal.SIGINT)
