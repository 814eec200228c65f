"""What every cnnlab console script shares: the tracking URI's credentials kept off the command
line, and how an error becomes one line and an exit status."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from cnnlab import CnnlabError, one_line
from cnnlab.config.validate import describe_config_error
from cnnlab.sweeps.callback import end_open_parent
from cnnlab.sweeps.jobs import failed_jobs
from cnnlab.tracking.store import move_credentials_to_env
from cnnlab.training import interrupts


class NoticesOnly(logging.Filter):
    """Records below WARNING: notices on stdout beside the output, warnings and errors on stderr
    (conf/hydra/job_logging/cnnlab.yaml and every other command's handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def hide_credentials(argv: list[str]) -> list[str]:
    """`argv` with user:password@ taken out of tracking.uri (and $MLFLOW_TRACKING_URI).

    Done before Hydra sees the command line: Hydra writes the overrides into the job's output
    folder, and cnnlab logs them. MLflow gets the credentials from MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD instead.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ["MLFLOW_TRACKING_URI"] = move_credentials_to_env(
            os.environ["MLFLOW_TRACKING_URI"]
        )
    cleaned = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("+~") == "tracking.uri":
            arg = f"{key}={move_credentials_to_env(value)}"
        cleaned.append(arg)
    return cleaned


def line_by_line() -> None:
    """Flush stdout at each line, also into a pipe (`| tee`, CI logs): the article's printed
    lines and the logged notices then arrive in the order they were written, as they happen."""
    if hasattr(sys.stdout, "reconfigure"):  # not where a test harness replaced it
        sys.stdout.reconfigure(line_buffering=True)


def run_cli(prog: str, hydra_task: Callable[[], Any]) -> None:
    """Run a @hydra.main task so that a config error ends with one line and exit status 1."""
    # Hydra would print its own multi-line report; let errors reach us to print one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    line_by_line()
    sys.argv[1:] = hide_credentials(sys.argv[1:])
    modes = {"-m", "--multirun", "-c", "--cfg", "-i", "--info", "-r", "--run"} & set(sys.argv)
    if len(modes) > 1:  # Hydra would raise a ValueError with a traceback
        sys.exit(f"{prog}: error: {' and '.join(sorted(modes))} can't be combined; give one")
    try:
        hydra_task()
        end_open_parent("FAILED")  # only if the sweep ended without its summary
        if failed := failed_jobs():
            sys.exit(
                f"{prog}: error: {len(failed)} sweep job(s) failed: {'; '.join(failed)}; "
                "the reasons are in their runs' cnnlab.error tag and the multirun folder"
            )
    except (HydraException, OmegaConfBaseException) as exc:
        end_open_parent("FAILED")
        sys.exit(f"{prog}: error: {describe_config_error(exc)}")
    except KeyboardInterrupt as exc:
        end_open_parent("KILLED")
        print(f"{prog}: interrupted; an open run is marked KILLED", file=sys.stderr)
        sys.exit(interrupts.exit_status(exc))
    except CnnlabError as exc:  # e.g. a launcher that can't reach its cluster
        end_open_parent("FAILED")
        sys.exit(f"{prog}: error: {exc}")
    except Exception as exc:
        # A launcher's own failure mid-sweep (submitit's UncompletedJobError for a job SLURM
        # cancelled, a Ray node lost): the parent is closed FAILED, not left RUNNING.
        if not end_open_parent("FAILED"):
            raise
        sys.exit(
            f"{prog}: error: the sweep's launcher failed: {one_line(exc)}; the sweep's "
            "parent run is marked FAILED, its finished jobs' runs are kept"
        )


def add_trust_store(parser: argparse.ArgumentParser) -> None:
    """The --trust-store flag of the commands that load a logged model."""
    parser.add_argument(
        "--trust-store",
        action="store_true",
        help="load the model the way MLflow stored it (pickle, torch.export program), which can "
        "run code from the store: only for a store you trust",
    )


class _Parser(argparse.ArgumentParser):
    # argparse's own error is a usage block and a line; cnnlab's errors are one line.
    def error(self, message: str) -> NoReturn:
        sys.exit(f"{self.prog}: error: {message} (see {self.prog} --help)")


def command(
    prog: str,
    doc: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    body: Callable[[argparse.Namespace], int | None],
) -> None:
    """Run a console script other than cnnlab-train: its arguments (with --help from `doc`),
    then `body`; a CnnlabError or config error is one line, and `body`'s count of failures
    sets the exit status.

    Arguments holding `=` are gathered in `args.overrides` (cnnlab-train's key=value syntax).
    """
    summary, _, details = doc.strip().partition("\n")
    parser = _Parser(
        prog=prog,
        description=summary,
        epilog=details.strip("\n"),  # keeps the examples' indentation
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    line_by_line()
    # cnnlab's notices (logging) on stdout, one plain line each: Hydra's job logging does this
    # for cnnlab-train, and these commands run no Hydra app.
    # (Warnings on stderr, as conf/hydra/job_logging/cnnlab.yaml has them.)
    for stream, level, kept in (
        (sys.stdout, logging.INFO, NoticesOnly()),
        (sys.stderr, logging.WARNING, None),
    ):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.setLevel(level)
        if kept is not None:
            handler.addFilter(kept)
        logging.getLogger("cnnlab").addHandler(handler)
    logging.getLogger("cnnlab").setLevel(logging.INFO)
    argv = hide_credentials(sys.argv[1:])
    args, extra = parser.parse_known_args([a for a in argv if "=" not in a or a.startswith("-")])
    if extra:
        parser.error(f"unknown argument {extra[0]}")
    args.overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        failed = body(args)
    except CnnlabError as exc:
        sys.exit(f"{prog}: error: {exc}")
    except (HydraException, OmegaConfBaseException) as exc:
        sys.exit(f"{prog}: error: {describe_config_error(exc)}")
    except KeyboardInterrupt as exc:
        sys.exit(interrupts.exit_status(exc))
    sys.exit(1 if failed else 0)
