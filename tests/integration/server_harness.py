"""Runs a real adaface-server App on 127.0.0.1:0 in a background thread for tests."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adaface_server.app import App
from adaface_server.config import Settings
from adaface_server.models.repository import ModelSpec, load_model_spec

MTCNN_WEIGHTS = Path(__file__).resolve().parents[2] / ".cache" / "mtcnn"


@functools.cache
def scratch_dir() -> Path:
    """One temp folder per test process for throw-away server files, removed at exit."""
    path = Path(tempfile.mkdtemp(prefix="adaface-tests-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


class ServerThread:
    """A real gRPC server with its own event loop, driven from synchronous tests."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.replace(host="127.0.0.1", port=0)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.app: App | None = None
        self.address = ""

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ServerThread:
        self.thread.start()

        async def boot() -> int:
            self.app = App(self.settings)
            return await self.app.start()

        self.address = f"127.0.0.1:{self.call(boot())}"
        return self

    def health(self, service: str = "") -> int:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def wait_serving(self, timeout: float = 120.0) -> ServerThread:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.health() == health_pb2.HealthCheckResponse.SERVING:
                return self
            time.sleep(0.05)
        raise TimeoutError(f"server at {self.address} not SERVING after {timeout}s")

    def stop(self, grace: float = 0.0) -> None:
        if self.app is not None:
            self.call(self.app.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def spec(self) -> ModelSpec:
        return load_model_spec(self.settings.model_repository, self.settings.model)


def server_settings(repository: Path, model: str, **overrides: object) -> Settings:
    """Test settings; each server gets its own throw-away gallery file unless one is given,
    so tests never touch (or lock) the user's default gallery store."""
    if "gallery_path" not in overrides:
        gallery_dir = tempfile.mkdtemp(prefix="adaface-gallery-", dir=scratch_dir())
        overrides["gallery_path"] = Path(gallery_dir) / "g.db"
    base = Settings(
        model_repository=repository,
        model=model,
        threads=1,
        load_retry_seconds=0.1,
        grace_seconds=5.0,
        # Absolute, so tests pass from any working directory (make venv fetches them).
        mtcnn_weights=MTCNN_WEIGHTS,
        metrics_port=0,  # a free port each: servers in one test run never collide
        log_format="text",
        # Golden and parity tests (1e-4 vs upstream, batch vs single, Triton vs embedded)
        # need exact fp32; the server's default (auto) may pick bf16 on a bf16-capable CPU.
        # Tests of reduced precision override this.
        precision="fp32",
        # Detection references (upstream landmarks, CPU goldens) are fp32 on the CPU; on a
        # GPU host `auto` would run MTCNN in fp16 on CUDA. CUDA detection has its own tests.
        detect_device="cpu",
    )
    return base.replace(**overrides)


@contextlib.contextmanager
def running(*settings: Settings) -> Iterator[tuple[ServerThread, ...]]:
    """ServerThreads for each Settings, all serving; stopped (last first) on the way out."""
    servers: list[ServerThread] = []
    try:
        for one in settings:
            servers.append(ServerThread(one).start())
        for server in servers:
            server.wait_serving()
        yield tuple(servers)
    finally:
        for server in reversed(servers):
            server.stop()


@contextlib.contextmanager
def serving_with_tokens(
    repository: Path, model: str, folder: Path, users: str, admins: str
) -> Iterator[ServerThread]:
    """A serving ServerThread whose calls need bearer tokens: `users` and `admins` are the
    text of its --auth-tokens-file and --admin-tokens-file, written into `folder`."""
    users_file, admins_file = folder / "users", folder / "admins"
    users_file.write_text(users)
    admins_file.write_text(admins)
    settings = server_settings(
        repository, model, auth_tokens_file=str(users_file), admin_tokens_file=str(admins_file)
    )
    with running(settings) as (server,):
        yield server
