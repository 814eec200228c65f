"""A real PostgreSQL server in a folder of its own, on a free loopback port: the database of a
team's `mlflow server`, for tests and benchmarks.

    python tests/postgres.py start DIR   # prints its URI; it runs on in the background
    python tests/postgres.py stop DIR

Run as root (as tests in CI are), PostgreSQL runs as the OS user `postgres`, since it refuses to
run as root: DIR then belongs to that user, and every folder above it must let others through
(a folder under /tmp does; pytest's own temporary folders do not).
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import signal
import stat
import subprocess
import sys
from pathlib import Path

from cnnlab.bench.procs import free_port, stop_group, wait_until

PG_BIN = Path("/usr/lib/postgresql/15/bin")  # Debian's postgresql-15 package
STATE = "cnnlab-postgres.json"  # port and credentials: `stop`, and a later `start`, read them

# Superuser only through the socket, which only the folder's owner can reach; everyone else
# comes over TCP with a password.
HBA = """\
local all postgres trust
host all all 127.0.0.1/32 scram-sha-256
"""


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be set up or started here."""


class PostgreSQL:
    """A PostgreSQL cluster in `folder` with one role and one database, on 127.0.0.1:`port`.

    The first `start` creates the cluster, the role and the database; later ones serve the same
    data on the same port. `stop` ends the server by its PID.
    """

    def __init__(self, folder: Path, user: str = "cnnlab", database: str = "mlflow") -> None:
        self.folder = Path(folder).resolve()
        self.data = self.folder / "data"
        self.proc: subprocess.Popen | None = None
        state = self.folder / STATE
        if state.exists():
            saved = json.loads(state.read_text())
        else:
            saved = {"port": free_port(), "user": user, "database": database,
                     "password": secrets.token_urlsafe(16)}  # fmt: skip
        self.port, self.user = saved["port"], saved["user"]
        self.database, self.password = saved["database"], saved["password"]

    @property
    def uri(self) -> str:
        """The SQLAlchemy URI of the database (postgresql:// means psycopg 3 in SQLAlchemy 2.1)."""
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def start(self, timeout: float = 60) -> PostgreSQL:
        """Serve the cluster (created first if new); return once it accepts connections."""
        if not (PG_BIN / "postgres").is_file():
            raise PostgresUnavailable(f"no {PG_BIN / 'postgres'} (apt-get install postgresql)")
        new = not (self.data / "PG_VERSION").is_file()
        if new:
            self._create_cluster()
        settings = {"port": self.port, "listen_addresses": "127.0.0.1",
                    "unix_socket_directories": self.folder}  # fmt: skip
        with (self.folder / "postgres.log").open("ab") as log:
            # In the foreground, so the PID is the server's; in its own process group, so `stop`
            # can take its backends down with it.
            self.proc = subprocess.Popen(
                [PG_BIN / "postgres", "-D", self.data,
                 *(arg for key, value in settings.items() for arg in ("-c", f"{key}={value}"))],
                cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                **_as_owner(),
            )  # fmt: skip
        proc = self.proc
        try:
            wait_until(self._ready, "PostgreSQL did not start", timeout,
                       alive=lambda: proc.poll() is None, log=self.folder / "postgres.log",
                       error=PostgresUnavailable)  # fmt: skip
        except PostgresUnavailable:
            self.stop()
            raise
        if new:
            self._psql(
                f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'",
                f"CREATE DATABASE {self.database} OWNER {self.user}",
            )
        return self

    def stop(self, timeout: float = 30) -> None:
        """Shut the server down by its PID: fast shutdown (SIGINT), SIGKILL past `timeout` s."""
        target = self.proc if self.proc is not None else self._postmaster_pid()
        if target is None:
            return
        # SIGINT, fast shutdown: ends open sessions, writes a checkpoint, exits. The postmaster
        # stops its backends itself; SIGKILL, if it comes to that, goes to its whole group.
        stop_group(target, signal.SIGINT, timeout, leader_only=True, kill_timeout=10)
        self.proc = None

    def dump(self) -> str:
        """Everything the database holds, as SQL (pg_dump): to look for what must not be there."""
        done = subprocess.run(
            [PG_BIN / "pg_dump", "-h", self.folder, "-p", str(self.port), "-U", "postgres",
             "--data-only", self.database],
            capture_output=True, text=True, timeout=120, **_as_owner(),
        )  # fmt: skip
        if done.returncode != 0:
            raise PostgresUnavailable(f"pg_dump failed: {done.stderr.strip()[-500:]}")
        return done.stdout

    # ---- setting up
    def _create_cluster(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        owner = _owner()
        if owner is not None:
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            _check_reachable_by(owner, self.folder)
        state = self.folder / STATE
        state.touch(mode=0o600)  # it holds the password
        state.write_text(
            json.dumps({"port": self.port, "user": self.user, "database": self.database,
                        "password": self.password})
        )  # fmt: skip
        done = subprocess.run(
            [PG_BIN / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
             "--locale=C.UTF-8", "--no-instructions"],
            cwd=self.folder, capture_output=True, text=True, timeout=120, **_as_owner(),
        )  # fmt: skip
        if done.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {done.stderr.strip()[-500:]}")
        (self.data / "pg_hba.conf").write_text(HBA)

    def _psql(self, *statements: str) -> None:
        args = [PG_BIN / "psql", "-h", self.folder, "-p", str(self.port), "-U", "postgres",
                "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q"]  # fmt: skip
        for statement in statements:  # one -c each: CREATE DATABASE refuses a transaction
            args += ["-c", statement]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, **_as_owner())
        if done.returncode != 0:
            raise PostgresUnavailable(f"psql failed: {done.stderr.strip()[-500:]}")

    # ---- watching it
    def _ready(self) -> bool:
        done = subprocess.run(
            [PG_BIN / "pg_isready", "-q", "-h", self.folder, "-p", str(self.port)],
            capture_output=True, timeout=10,
        )  # fmt: skip
        return done.returncode == 0

    def _postmaster_pid(self) -> int | None:
        # The server's own record of its PID; a PID reused by another program is left alone.
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return None
        return pid if b"postgres" in cmdline else None


def _owner() -> pwd.struct_passwd | None:
    """The OS user PostgreSQL runs as: `postgres` when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable("no OS user `postgres` to run PostgreSQL as") from None


def _as_owner() -> dict:
    """Popen arguments that run a command as the cluster's owner (nothing when not root)."""
    owner = _owner()
    if owner is None:
        return {}
    env = {**os.environ, "HOME": owner.pw_dir, "USER": "postgres", "LOGNAME": "postgres"}
    return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": [], "env": env}


def _check_reachable_by(owner: pwd.struct_passwd, folder: Path) -> None:
    for parent in folder.parents:
        st = parent.stat()
        if not (
            st.st_mode & stat.S_IXOTH
            or (st.st_uid == owner.pw_uid and st.st_mode & stat.S_IXUSR)
            or (st.st_gid == owner.pw_gid and st.st_mode & stat.S_IXGRP)
        ):
            raise PostgresUnavailable(
                f"the OS user postgres cannot reach {folder}: {parent} lets nobody else through; "
                "use a folder under /tmp"
            )


def main(argv: list[str]) -> int:
    """`start DIR` or `stop DIR`."""
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    server = PostgreSQL(Path(argv[1]))
    try:
        if argv[0] == "start":
            server.start()
            print(server.uri)
            server.proc = None  # runs on after this process; `stop DIR` finds it by its PID
        else:
            server.stop()
    except PostgresUnavailable as exc:
        print(f"postgres.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
