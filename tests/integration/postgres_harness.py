"""A throw-away PostgreSQL cluster for tests: initdb in a temp dir, a free loopback port.

PostgreSQL refuses to run as root, and CI runs as root: the cluster then runs as the
unprivileged `nobody` (runuser). The binaries come from `pg_config --bindir` or the Debian
layout; `make test` installs them when missing (see the Makefile), so a missing binary is
a failure here, never a skip.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER = "adaface"
DATABASE = "galleries"


def bindir() -> Path:
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; `make test` installs them "
        "(apt-get install postgresql)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    """initdb + pg_ctl in a temporary directory; password authentication over TCP."""

    def __init__(self, password: str) -> None:
        self.bin = bindir()
        self.password = password
        self.root = Path(tempfile.mkdtemp(prefix="adaface-pg-"))
        self.data = self.root / "data"
        self.logfile = self.root / "postgres.log"
        self.port = _free_port()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.root, "nobody", "nogroup")

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(a) for a in args]
        if self._as_root:
            cmd = ["runuser", "-u", "nobody", "--", *cmd]
        return subprocess.run(
            cmd, cwd=self.root, check=check, capture_output=True, text=True, timeout=120
        )

    def init(self) -> PostgresCluster:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as_root:
            shutil.chown(pwfile, "nobody", "nogroup")
        self._run(
            self.bin / "initdb",
            "-D",
            self.data,
            "-U",
            USER,
            "--pwfile",
            pwfile,
            "--auth-local=scram-sha-256",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        )
        pwfile.unlink()
        self.start()
        env = {**os.environ, "PGPASSWORD": self.password}
        subprocess.run(
            [
                str(self.bin / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                USER,
                DATABASE,
            ],
            check=True,
            env=env,
            capture_output=True,
            timeout=60,
        )
        return self

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        self._run(
            self.bin / "pg_ctl", "-D", self.data, "-l", self.logfile, "-o", options, "-w", "start"
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(self.bin / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def wait_down(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)
