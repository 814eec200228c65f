"""A real Ray head on this machine, for tests and benchmarks of hydra/launcher=ray.

    python tests/ray_head.py start DIR    # prints the address to join and the process group
    python tests/ray_head.py stop DIR

`ray start --block` runs in its own process group: it stops every Ray process it started when
it gets SIGTERM, and a SIGKILL of the group ends what is left after a bounded wait. Never
`ray stop`: it kills Ray processes by name, other users' clusters too.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from cnnlab.bench.procs import free_port, stop_group, wait_until

BIN = Path(sys.executable).parent  # `ray` of the environment running this (helpers.BIN)
STATE = "ray-head.json"  # in DIR: what `stop` needs once `start` has exited
READY = "Ray runtime started"  # what `ray start` prints once the head's processes are up


class RayHead:
    """`ray start --head` with 2 CPUs, no dashboard and free ports; logs in `folder`.

    Its workers run in `folder` with `env` (default: this process's, PYTHONPATH included), as
    the workers of a cluster run where `ray start` ran, with what its node has installed.
    """

    def __init__(self, folder: Path, num_cpus: int = 2, env: dict[str, str] | None = None) -> None:
        self.folder, self.num_cpus = Path(folder), num_cpus
        self.env = dict(os.environ if env is None else env)
        self.port = free_port()
        self.pgid: int | None = None
        self.temp_dir: Path | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        """What hydra.launcher.ray.init.address (or `ray start --address`) joins."""
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.folder / "ray-head.log"

    def start(self, timeout: float = 90) -> RayHead:
        """Start the head; return once it accepts drivers. RuntimeError (with the log's tail) if
        it does not within `timeout` s."""
        self.folder.mkdir(parents=True, exist_ok=True)
        # Ray's unix sockets live under the temp dir, and their paths must stay under 108 bytes:
        # a pytest tmp_path is too deep for them.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        # Ports Ray would otherwise fix (client server 10001, agent 52365, dashboard 8265) are
        # picked free, so that heads of parallel test sessions don't collide. Ray swaps the
        # loopback node IP for the machine's own address (its GCS listens on every interface);
        # drivers join at 127.0.0.1:port all the same.
        command = [
            BIN / "ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
            "--port", self.port, "--num-cpus", self.num_cpus, "--num-gpus", 0,
            "--include-dashboard", "false", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", free_port(), "--dashboard-agent-listen-port", free_port(),
            "--ray-client-server-port", free_port(), "--object-store-memory", 78_643_200,
            "--temp-dir", self.temp_dir, "--disable-usage-stats",
        ]  # fmt: skip
        # No drain on SIGTERM (it waits up to 30 s for Serve replicas; a test head has none).
        env = {
            **self.env,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        }
        with self.log.open("w") as log:
            self._proc = subprocess.Popen(
                [str(c) for c in command], cwd=self.folder, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )  # fmt: skip
        self.pgid = self._proc.pid
        proc = self._proc
        try:
            wait_until(lambda: READY in self.log.read_text() and self._accepts(),
                       "`ray start --head` did not come up", timeout,
                       alive=lambda: proc.poll() is None, log=self.log, interval=0.25)  # fmt: skip
        except RuntimeError:
            self.stop()
            raise
        return self

    def _accepts(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM to the head's group, on which `ray start` stops the processes it started;
        SIGKILL to what is left after `timeout` s; remove the temp dir."""
        if self.pgid is None:
            return
        stop_group(self._proc if self._proc is not None else self.pgid, timeout=timeout)
        self.pgid = self._proc = None
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def main(argv: list[str]) -> None:
    """`start DIR` / `stop DIR`: a head for a developer or a benchmark, outliving this script."""
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        sys.exit("usage: python tests/ray_head.py start|stop DIR")
    folder = Path(argv[1]).resolve()
    if argv[0] == "start":
        head = RayHead(folder).start()
        state = {"address": head.address, "pgid": head.pgid, "temp_dir": str(head.temp_dir)}
        (folder / STATE).write_text(json.dumps(state))
        print(f"address {head.address}\npgid {head.pgid}")
        return
    state = json.loads((folder / STATE).read_text())
    head = RayHead(folder)
    head.pgid, head.temp_dir = state["pgid"], Path(state["temp_dir"])
    head.stop()
    (folder / STATE).unlink()
    print(f"stopped process group {state['pgid']}")


if __name__ == "__main__":
    main(sys.argv[1:])
