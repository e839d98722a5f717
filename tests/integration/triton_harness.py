"""Runs a real `tritonserver` (the binary bundled in nvidia-pytriton) on free loopback ports.

That build has only the python backend, so tests serve the exporter's python-backend twin of
the model (same tensors and batching as the libtorch entry). The wheel is installed with
`--no-deps` (its pinned numpy<2/tritonclient would fight ours; only the binary is used).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parents[2]
STUB = "triton_python_backend_stub"


class TritonUnavailable(RuntimeError):
    """No tritonserver binary could be found or installed; the reason says why."""


def missing_tritonserver(exc: TritonUnavailable) -> NoReturn:
    """Skips a test that needs tritonserver on a developer machine without it; fails in CI
    (CI set), where `make venv` installs it: a missing part must not pass as a skip there."""
    import pytest

    message = f"no tritonserver binary: {exc}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI: make venv should have installed it)")
    pytest.skip(message)


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends: Path


def pinned_pytriton() -> str:
    """The nvidia-pytriton requirement pinned in constraints.txt (one source of truth)."""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip().startswith("nvidia-pytriton"):
            return line.split("#")[0].strip()
    return "nvidia-pytriton==0.7.0"


def _pytriton_dir() -> Path | None:
    # find_spec does not import pytriton (its own __init__ needs deps we do not install).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_tritonserver(install: bool = True) -> TritonInstall:
    """The tritonserver binary and backends dir, installing the wheel once if missing."""
    root = _pytriton_dir()
    if root is None and install:
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", pinned_pytriton()]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise TritonUnavailable(
                f"`{' '.join(command[2:])}` failed: {result.stderr.strip()[-500:]}"
            )
        importlib.invalidate_caches()
        root = _pytriton_dir()
    if root is None:
        raise TritonUnavailable("nvidia-pytriton is not installed (make venv installs it)")
    server = root / "tritonserver"
    binary = server / "bin" / "tritonserver"
    backends = server / "backends"
    if not os.access(binary, os.X_OK) or not (backends / "python").is_dir():
        raise TritonUnavailable(f"{server} lacks bin/tritonserver or backends/python")
    _install_stub(server)
    return TritonInstall(binary, backends)


def _install_stub(server: Path) -> None:
    """Puts the stub for this Python next to the python backend (idempotent, atomic)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    source = server / "python_backend_stubs" / version / STUB
    target = server / "backends" / "python" / STUB
    if not source.is_file():
        raise TritonUnavailable(f"nvidia-pytriton ships no python backend stub for {version}")
    if target.is_file() and target.stat().st_size == source.stat().st_size:
        return
    tmp = target.with_name(f".{STUB}.{os.getpid()}")
    shutil.copy2(source, tmp)
    os.replace(tmp, target)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonProcess:
    """One tritonserver process; `kill()` and `start()` again reuse the same gRPC port."""

    def __init__(
        self,
        repository: Path,
        log_path: Path,
        install: TritonInstall | None = None,
        *,
        tls: tuple[Path, Path] | None = None,
    ):
        """tls: (certificate, key) PEM files to serve gRPC over TLS."""
        self.install = install or find_tritonserver()
        self.tls = tls
        self.repository = Path(repository)
        self.log_path = Path(log_path)
        self.grpc_port = 0
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 180.0, port: int | None = None) -> TritonProcess:
        """Starts and waits until every model is ready; picks another port on a collision
        unless `port` (or an earlier port, for a restart) must be kept."""
        keep = port or self.grpc_port or None
        for attempt in range(5):
            self.grpc_port = keep or free_port()
            self._spawn()
            try:
                self._wait_ready(timeout)
                return self
            except _PortTaken:
                self.kill()
                if keep is not None and attempt < 4:
                    time.sleep(1.0)  # the old process's socket may linger briefly
            except BaseException:
                self.kill()
                raise
        raise RuntimeError(f"tritonserver could not bind a port; see {self.log_path}")

    def _spawn(self) -> None:
        env = dict(os.environ)
        # The python backend's stub embeds the first python3 on PATH (PYTHONPATH is
        # ignored): put this venv first so the model finds torch.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        command = [
            str(self.install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.install.backends}",
            f"--grpc-port={self.grpc_port}",
            "--grpc-address=127.0.0.1",
            "--allow-http=false",
            "--allow-metrics=false",
            "--exit-timeout-secs=5",
        ]
        if self.tls:
            cert, key = self.tls
            command += ["--grpc-use-ssl=true", f"--grpc-server-cert={cert}"]
            command += [f"--grpc-server-key={key}"]
        log = self.log_path.open("ab")
        log.write(f"\n=== {' '.join(command)}\n".encode())
        log.flush()
        # Own process group: killing it takes the python stubs with it.
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()

    def _wait_ready(self, timeout: float) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout
        client = grpcclient.InferenceServerClient(
            self.url,
            ssl=self.tls is not None,
            root_certificates=str(self.tls[0]) if self.tls else None,
        )
        try:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    tail = self.log_tail()
                    if re.search(
                        r"address already in use|failed to bind|Failed to listen", tail, re.I
                    ):
                        raise _PortTaken()
                    raise RuntimeError(f"tritonserver exited during start-up:\n{tail}")
                with contextlib.suppress(Exception):
                    if client.is_server_ready(client_timeout=2):
                        return
                time.sleep(0.2)
        finally:
            client.close()
        raise TimeoutError(f"tritonserver not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crash would: no graceful unload."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(15)
        self.kill()


class _PortTaken(Exception):
    pass
