"""Ctrl-C, SIGTERM and SIGHUP: a run that exists ends KILLED (resumable), never left RUNNING.

`timeout`, `docker stop` and SLURM send SIGTERM; a closed terminal sends SIGHUP. While a run is
open (`handled`), each of them raises `Terminated` wherever the program is, so the run's
closing code marks it KILLED. Two stretches handle the first signal more gently:
`stop_requests` (training stops after the current mini-batch, to checkpoint) and `deferred`
(the run's last writes are being delivered). A second signal always stops at once.

In a job submitit runs (SLURM, hydra/launcher=slurm), its preemption signal (SIGUSR2, or
$SUBMITIT_PREEMPT_SIGNAL: preemption, or the time limit drawing near) is taken over the same
way: the run stops as on SIGTERM, resumable, and once it is closed the signal goes on to
submitit's handler, which requeues the job.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
HANDED_ON = (signal.SIGUSR1, signal.SIGUSR2)  # submitit's preemption signal is one of them


class Terminated(KeyboardInterrupt):
    """A stop signal, handled like Ctrl-C; the process exits with 128 + `signum`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_mode: list[str] = ["raise"]  # innermost last: raise | graceful | defer
_received: list[int] = []  # signals held back by the innermost gentle stretch
_handed_on: list[int] = []  # HANDED_ON signals received: passed on once the run is closed
# Signals whose Terminated was raised: Python ignores an exception raised while it runs a
# finalizer or __del__ (e.g. while a model or figure is being written), so the run's closing
# code asks `swallowed` before it calls the run FINISHED.
_raised: list[int] = []


def _handler(signum: int, frame: Any) -> None:
    if signum in HANDED_ON:  # even if a later SIGTERM is what stops the run
        _handed_on.append(signum)
    if _mode[-1] == "raise" or _received:
        _raised.append(signum)
        raise Terminated(signum)
    _received.append(signum)
    then = "the next mini-batch to save a checkpoint" if _mode[-1] == "graceful" else "its logs"
    log.warning("%s: stopping after %s; again to stop at once", signal.Signals(signum).name, then)


@contextmanager
def handled() -> Iterator[None]:
    """Within: SIGINT, SIGTERM and SIGHUP raise Terminated (only the main thread gets them).

    So does submitit's preemption signal in a job submitit runs; a run it stops is closed
    first, then submitit's handler gets the signal (it requeues the job and exits).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
            previous[sig] = signal.signal(sig, _handler)
    preemption = _submitit_signal()
    if preemption is not None and callable(signal.getsignal(preemption)):
        previous[preemption] = signal.signal(preemption, _handler)
    _handed_on.clear()
    _raised.clear()
    try:
        yield
    finally:
        _raised.clear()
        for sig, old in previous.items():
            signal.signal(sig, old)
        if _handed_on:
            # Submitit's handler runs here, now that the run is closed; what it raises
            # (SystemExit after requeueing) replaces Terminated.
            signal.raise_signal(_handed_on.pop())


def swallowed() -> int | None:
    """A stop signal whose Terminated Python ignored (raised in a finalizer) and the code
    therefore never saw, or None: the run must still end KILLED."""
    return _raised[-1] if _raised else None


def _submitit_signal() -> int | None:
    """The signal submitit requeues this job on, if submitit runs it (it sets SUBMITIT_*)."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    sig = getattr(signal, f"SIG{name.removeprefix('SIG')}", None)
    return sig if sig in HANDED_ON else None


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
