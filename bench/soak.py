"""`make soak`: load and fault soak of real adaface-server subprocesses, one summary table.

Everything runs on loopback against `python -m adaface_server` child processes serving a
randomly initialised ir_18 exported into a temporary repository. Phases (--phases):

  load      N concurrent clients mix Embed, Gallery.Search and Gallery.Enroll (identities are
            recycled with RemoveIdentity so the gallery stays the same size) for two identical
            rounds; server RSS at baseline (after warm-up), peak, after each round; then a
            server with a tiny --max-queue is overloaded: refusals must be RESOURCE_EXHAUSTED,
            never DEADLINE_EXCEEDED, with generous deadlines.
  kill9     concurrent enrollers, SIGKILL mid-way, restart on the same gallery file: every
            acknowledged identity must be there, complete.
  triton    --backend triton against a real tritonserver; clients embed continuously while
            Triton is stopped and restarted on the same port: UNAVAILABLE then recovery.
  diskfull  the gallery file on a small tmpfs: enroll until the disk is full; searches keep
            working; after freeing space enrolls work again; PRAGMA integrity_check after stop
            and no acknowledged write lost.
  hostile   a server with tokens and --stream-idle-seconds 2: concurrent token-less 30 MiB
            bodies (UNAUTHENTICATED, never read), 64 oversized "aligned" PNGs in one request
            (NOT_ALIGNED from their headers, every error within the 8 KiB trailer), two idle
            BuildEpoch streams (DEADLINE_EXCEEDED) beside a complete build that must get a
            slot; then clients killed with SIGKILL holding an open Import of a whole export
            file (nothing committed, logged CANCELLED) or in the middle of a long BuildEpoch
            (its kNN stops; latency = kill to the server's "stopped" line).

Prints one markdown table (requests, OK, errors by code, p50/p99 latency of successful calls,
RSS before/peak/after) plus the first message seen per error code; --out writes it to a file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from adaface.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc, gallery_pb2, gallery_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
MODEL = "soak_ir18"
DIM = 512
MiB = 1024 * 1024
PHASES = ("load", "kill9", "triton", "diskfull", "hostile")
# Generous on purpose: a DEADLINE_EXCEEDED then means a hang, not a slow 2-core machine.
DEADLINE_S = 60.0


# -- recording ---------------------------------------------------------------------------


@dataclass
class Tally:
    """Outcome of every call of one phase: status code, latency, and when it ended."""

    codes: Counter = field(default_factory=Counter)
    ok_latencies: list[float] = field(default_factory=list)
    failed_latencies: list[float] = field(default_factory=list)
    by_rpc: dict[str, Counter] = field(default_factory=dict)
    rpc_latencies: dict[str, list[float]] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    events: list[tuple[float, str]] = field(default_factory=list)
    # (seconds, monotonic end, "rpc: details") of the slowest failed call.
    slowest_failure: tuple[float, float, str] = (0.0, 0.0, "")

    def record(self, rpc: str, code: str, seconds: float, details: str = "") -> None:
        self.codes[code] += 1
        self.by_rpc.setdefault(rpc, Counter())[code] += 1
        self.events.append((time.monotonic(), code))
        if code == "OK":
            self.ok_latencies.append(seconds)
            self.rpc_latencies.setdefault(rpc, []).append(seconds)
        else:
            self.failed_latencies.append(seconds)
            if seconds > self.slowest_failure[0]:
                self.slowest_failure = (seconds, time.monotonic(), f"{rpc}: {details}")
            self.details.setdefault(code, f"{rpc}: {details}")

    @property
    def requests(self) -> int:
        return sum(self.codes.values())

    @property
    def errors(self) -> dict[str, int]:
        return {code: n for code, n in sorted(self.codes.items()) if code != "OK"}

    def unexpected(self, allowed: Sequence[str] = ()) -> dict[str, int]:
        return {code: n for code, n in self.errors.items() if code not in allowed}


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1000, q)) if seconds else float("nan")


async def timed(tally: Tally, rpc: str, call: Callable, request, timeout: float = DEADLINE_S):
    """Runs one unary call, records its code and latency; the response, or None on error."""
    started = time.perf_counter()
    try:
        response = await call(request, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        tally.record(rpc, exc.code().name, time.perf_counter() - started, exc.details() or "")
        return None
    tally.record(rpc, "OK", time.perf_counter() - started)
    return response


@dataclass
class PhaseRow:
    """One line of the summary table."""

    phase: str
    tally: Tally | None
    rss: tuple[float, float, float] | None  # MiB: before, peak, after
    result: str


# -- inputs ------------------------------------------------------------------------------


def png_crops(n: int, seed: int = 0) -> list[bytes]:
    """Encoded 112x112 'aligned crops' (random textures: the model is random too)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def unit_vector(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype("<f4")
    return v / np.linalg.norm(v)


def vector_sample(seed: int) -> gallery_pb2.GallerySample:
    packed = unit_vector(seed).astype("<f4").tobytes()
    return gallery_pb2.GallerySample(vector=common_pb2.Embedding(vector=packed, dim=DIM))


def image_sample(crop: bytes) -> gallery_pb2.GallerySample:
    return gallery_pb2.GallerySample(image=common_pb2.ImageInput(encoded=crop))


def embed_request(crops: Sequence[bytes]) -> embedder_pb2.EmbedRequest:
    aligned = common_pb2.ALIGNMENT_ALIGNED
    return embedder_pb2.EmbedRequest(
        images=[common_pb2.ImageInput(encoded=c, alignment=aligned) for c in crops]
    )


# -- servers -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_model(work: Path) -> tuple[Path, Path]:
    """(repository, python-backend twin) of a random ir_18, via the project's exporter CLI."""
    repository, twin = work / "repository", work / "twin"
    command = [
        sys.executable, "-m", "adaface_server.models.export", "--arch", "ir_18",
        "--repository", str(repository), "--name", MODEL, "--max-batch-size", "8",
        "--python-backend", str(twin),
    ]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    return repository, twin


def rss_mib(pid: int) -> float:
    """Resident set size of a process (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Server:
    """One `python -m adaface_server` child process on a free loopback port."""

    def __init__(
        self, repository: Path, gallery_path: Path, log: Path, *extra: str, model: str = MODEL
    ) -> None:
        self.repository, self.model, self.gallery_path = repository, model, gallery_path
        self.log, self.extra = log, extra
        self.process: subprocess.Popen | None = None
        self.address = ""

    def start(self, timeout: float = 180.0) -> Server:
        port = free_port()
        command = [
            sys.executable, "-m", "adaface_server", "--host", "127.0.0.1", "--port", str(port),
            "--model-repository", str(self.repository), "--model", self.model, "--threads", "1",
            "--max-batch-size", "8", "--gallery-path", str(self.gallery_path),
            "--metrics-port", "0", "--log-format", "text", "--log-level", "WARNING", *self.extra,
        ]  # fmt: skip
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=out)
        self.address = f"127.0.0.1:{port}"
        try:
            self.wait_serving(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def rss(self) -> float:
        return rss_mib(self.pid)

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    raise RuntimeError(f"server exited during start-up; see {self.log}")
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.1)
        raise TimeoutError(f"server at {self.address} not SERVING after {timeout}s")

    def kill9(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> int | None:
        """SIGTERM (graceful), SIGKILL if it does not exit; the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        return self.process.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RssSampler:
    """Tracks a process's peak RSS in a background thread while the block runs."""

    def __init__(self, pid: int, period: float = 0.1) -> None:
        self.pid, self.period = pid, period
        self.peak = rss_mib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            with contextlib.suppress(OSError, RuntimeError):  # the process may be gone
                self.peak = max(self.peak, rss_mib(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- gallery helpers -----------------------------------------------------------------------


async def create_gallery(address: str, name: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gallery_pb2_grpc.GalleryStub(channel)
        await stub.CreateGallery(gallery_pb2.CreateGalleryRequest(name=name), timeout=DEADLINE_S)


async def seed_gallery(address: str, name: str, identities: int) -> None:
    """A gallery of `identities` one-vector identities `base-<i>` for searches to scan."""
    await create_gallery(address, name)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gallery_pb2_grpc.GalleryStub(channel)
        for first in range(0, identities, 32):
            await asyncio.gather(
                *(
                    stub.Enroll(
                        gallery_pb2.EnrollRequest(
                            gallery=name, identity=f"base-{i}", samples=[vector_sample(i)]
                        ),
                        timeout=DEADLINE_S,
                    )
                    for i in range(first, min(first + 32, identities))
                )
            )


def present_identities(address: str, gallery: str) -> dict[str, int]:
    """identity -> sample count, read back page by page."""
    present: dict[str, int] = {}
    token = ""
    with grpc.insecure_channel(address) as channel:
        stub = gallery_pb2_grpc.GalleryStub(channel)
        while True:
            page = stub.ListIdentities(
                gallery_pb2.ListIdentitiesRequest(
                    gallery=gallery, page_size=1000, page_token=token
                ),
                timeout=DEADLINE_S,
            )
            present.update({i.identity: i.sample_count for i in page.identities})
            token = page.next_page_token
            if not token:
                return present


def check_acknowledged(address: str, gallery: str, acked: dict[str, int]) -> tuple[int, int, int]:
    """(lost, incomplete, unacknowledged but present) after a restart: lost must be 0."""
    present = present_identities(address, gallery)
    lost = sum(1 for name in acked if name not in present)
    incomplete = sum(1 for name, n in acked.items() if name in present and present[name] != n)
    return lost, incomplete, len(set(present) - set(acked))


# -- phase: load -----------------------------------------------------------------------------


@dataclass
class MixedClient:
    """One simulated caller: Embed, Search and Enroll; its identities are recycled (removed
    before being enrolled again), so every round leaves the gallery the same size."""

    cid: int
    crops: list[bytes]
    gallery: str
    slots: int = 6
    step: int = 0
    enrolled: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.cid)

    async def run(self, address: str, tally: Tally, seconds: float) -> None:
        stop_at = time.monotonic() + seconds
        async with grpc.aio.insecure_channel(address) as channel:
            embedder = embedder_pb2_grpc.EmbedderStub(channel)
            gallery = gallery_pb2_grpc.GalleryStub(channel)
            while time.monotonic() < stop_at:
                pick = self.rng.random()
                if pick < 0.45:
                    await self.embed(embedder, tally)
                elif pick < 0.75:
                    await self.search(gallery, tally)
                else:
                    await self.enroll(gallery, tally)

    async def embed(self, stub, tally: Tally) -> None:
        crops = self.rng.sample(self.crops, self.rng.randint(1, 4))
        await timed(tally, "Embed", stub.Embed, embed_request(crops))

    async def search(self, stub, tally: Tally) -> None:
        if self.rng.random() < 0.5:
            probe = vector_sample(self.rng.randrange(10_000))
        else:
            probe = image_sample(self.rng.choice(self.crops))
        request = gallery_pb2.SearchRequest(gallery=self.gallery, probes=[probe], top_k=5)
        await timed(tally, "Search", stub.Search, request)

    async def enroll(self, stub, tally: Tally) -> None:
        name = f"c{self.cid}-{self.step % self.slots}"
        self.step += 1
        if name in self.enrolled:
            removal = gallery_pb2.RemoveIdentityRequest(gallery=self.gallery, identity=name)
            if await timed(tally, "RemoveIdentity", stub.RemoveIdentity, removal) is None:
                return
            self.enrolled.discard(name)
        if self.step % 2:
            samples = [vector_sample(self.rng.randrange(10_000)) for _ in range(2)]
        else:
            samples = [image_sample(self.rng.choice(self.crops))]
        request = gallery_pb2.EnrollRequest(gallery=self.gallery, identity=name, samples=samples)
        if await timed(tally, "Enroll", stub.Enroll, request) is not None:
            self.enrolled.add(name)


async def mixed_round(address: str, clients: Sequence[MixedClient], seconds: float) -> Tally:
    tally = Tally()
    await asyncio.gather(*(c.run(address, tally, seconds) for c in clients))
    return tally


async def overload_round(address: str, clients: int, seconds: float, crops: list[bytes]) -> Tally:
    """Every client sends 4-image Embeds back to back, pausing briefly after a refusal."""
    tally = Tally()
    stop_at = time.monotonic() + seconds

    async def client(cid: int) -> None:
        rng = random.Random(cid)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = embedder_pb2_grpc.EmbedderStub(channel)
            while time.monotonic() < stop_at:
                request = embed_request(rng.sample(crops, 4))
                if await timed(tally, "Embed", stub.Embed, request) is None:
                    await asyncio.sleep(0.01)

    await asyncio.gather(*(client(c) for c in range(clients)))
    return tally


def settle(seconds: float) -> None:
    # Lets the server finish deferred work (index compaction, freed arenas) before measuring.
    time.sleep(seconds)


def phase_load(repository: Path, work: Path, args: argparse.Namespace) -> list[PhaseRow]:
    crops = png_crops(16)
    rows = []
    with Server(repository, work / "load.db", work / "load.log").start() as server:
        asyncio.run(seed_gallery(server.address, "soak", 200))
        clients = [MixedClient(c, crops, "soak") for c in range(args.clients)]
        asyncio.run(mixed_round(server.address, clients, min(5.0, args.duration)))  # warm-up
        settle(args.settle)
        before = baseline = server.rss()
        for label in ("load round 1", "load round 2"):
            with RssSampler(server.pid) as sampler:
                tally = asyncio.run(mixed_round(server.address, clients, args.duration))
            settle(args.settle)
            after = server.rss()
            unexpected = sum(tally.errors.values())
            result = (
                f"unexpected errors {unexpected}; RSS vs baseline {after - baseline:+.1f} MiB, "
                f"vs round start {after - before:+.1f} MiB"
            )
            rows.append(PhaseRow(label, tally, (before, sampler.peak, after), result))
            before = after
    rows.append(phase_overload(repository, work, args, crops))
    return rows


def phase_overload(
    repository: Path, work: Path, args: argparse.Namespace, crops: list[bytes]
) -> PhaseRow:
    queue = 8
    server = Server(repository, work / "overload.db", work / "overload.log", "--max-queue", "8")
    with server.start():
        clients = max(16, 2 * args.clients)
        # Warm-up within the limit (one client, 4 images), so "before" is a warmed server.
        asyncio.run(overload_round(server.address, 1, min(5.0, args.duration), crops))
        settle(args.settle)
        before = server.rss()
        with RssSampler(server.pid) as sampler:
            tally = asyncio.run(overload_round(server.address, clients, args.duration / 2, crops))
        settle(args.settle)
        after = server.rss()
    refused = tally.codes.get("RESOURCE_EXHAUSTED", 0)
    other = tally.unexpected(["RESOURCE_EXHAUSTED"])
    result = (
        f"{clients} clients, --max-queue {queue}: {refused} RESOURCE_EXHAUSTED "
        f"(p99 {percentile_ms(tally.failed_latencies, 99):.1f} ms), DEADLINE_EXCEEDED "
        f"{tally.codes.get('DEADLINE_EXCEEDED', 0)}, other errors {sum(other.values())}"
    )
    return PhaseRow("overload", tally, (before, sampler.peak, after), result)


# -- phase: kill -9 ------------------------------------------------------------------------


async def enroll_until_killed(
    address: str, clients: int, kill_after: float, kill: Callable[[], None], crops: list[bytes]
) -> tuple[Tally, dict[str, int], int]:
    """Concurrent enrollers of new 3-sample identities; `kill` runs after `kill_after` s.

    Returns the tally, the acknowledged identities (name -> samples) and the errors seen
    before the kill (which must be 0)."""
    tally = Tally()
    acked: dict[str, int] = {}
    killed = asyncio.Event()
    errors_before_kill = 0

    async def client(cid: int) -> None:
        nonlocal errors_before_kill
        async with grpc.aio.insecure_channel(address) as channel:
            stub = gallery_pb2_grpc.GalleryStub(channel)
            for i in range(1_000_000):
                name = f"k{cid}-{i:06d}"
                samples = [vector_sample(hash((cid, i, s)) % 2**32) for s in range(2)]
                # Every 4th identity has an image sample: the embedding path is in the write.
                samples.append(image_sample(crops[i % len(crops)]) if i % 4 == 0 else samples[0])
                request = gallery_pb2.EnrollRequest(
                    gallery="durable", identity=name, samples=samples
                )
                if await timed(tally, "Enroll", stub.Enroll, request, timeout=30) is None:
                    if not killed.is_set():
                        errors_before_kill += 1
                    # After the kill the client stops at its first failure (the server is gone).
                    if killed.is_set():
                        return
                    continue
                acked[name] = len(samples)

    async def killer() -> None:
        await asyncio.sleep(kill_after)
        killed.set()
        kill()

    await asyncio.gather(killer(), *(client(c) for c in range(clients)))
    return tally, acked, errors_before_kill


def phase_kill9(repository: Path, work: Path, args: argparse.Namespace) -> list[PhaseRow]:
    path, log = work / "durable.db", work / "kill9.log"
    server = Server(repository, path, log).start()
    try:
        asyncio.run(create_gallery(server.address, "durable"))
        before = server.rss()
        with RssSampler(server.pid) as sampler:
            tally, acked, early = asyncio.run(
                enroll_until_killed(
                    server.address, args.clients, args.duration / 2, server.kill9, png_crops(8, 1)
                )
            )
        status = server.process.returncode if server.process else None
    finally:
        server.stop()
    with Server(repository, path, log).start() as restarted:
        after = restarted.rss()
        lost, incomplete, extra = check_acknowledged(restarted.address, "durable", acked)
    result = (
        f"exit {status} (SIGKILL); acknowledged {len(acked)}, lost {lost}, incomplete "
        f"{incomplete}, present but unacknowledged {extra}; errors before the kill {early}"
    )
    # "after" is the restarted process: a fresh one reading the store back.
    return [PhaseRow("kill -9 during enroll", tally, (before, sampler.peak, after), result)]


# -- phase: Triton stopped and restarted -----------------------------------------------------


@dataclass
class Outage:
    stopped: float = 0.0  # monotonic times
    ready_again: float = 0.0
    recovered: float = 0.0  # first successful call after Triton was ready again


async def embed_through_outage(
    address: str, clients: int, segment: float, triton, crops: list[bytes]
) -> tuple[Tally, Outage]:
    """Clients embed continuously; Triton is stopped after one segment, restarted on the same
    port after another, and the load runs one more segment after the first success."""
    tally, outage = Tally(), Outage()
    done = asyncio.Event()

    async def client(cid: int) -> None:
        rng = random.Random(cid)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = embedder_pb2_grpc.EmbedderStub(channel)
            while not done.is_set():
                request = embed_request(rng.sample(crops, rng.randint(1, 4)))
                ok = await timed(tally, "Embed", stub.Embed, request, timeout=30) is not None
                if ok and outage.ready_again and not outage.recovered:
                    outage.recovered = time.monotonic()
                if not ok:
                    await asyncio.sleep(0.05)  # a caller backing off, not spinning

    async def operator() -> None:
        await asyncio.sleep(segment)
        outage.stopped = time.monotonic()
        await asyncio.to_thread(triton.stop)
        await asyncio.sleep(segment)
        await asyncio.to_thread(triton.start, 180.0, triton.grpc_port)
        outage.ready_again = time.monotonic()
        give_up = outage.ready_again + 120
        while not outage.recovered and time.monotonic() < give_up:
            await asyncio.sleep(0.05)
        await asyncio.sleep(segment)
        done.set()

    await asyncio.gather(operator(), *(client(c) for c in range(clients)))
    return tally, outage


def outage_windows(tally: Tally, outage: Outage) -> tuple[Counter, Counter, Counter]:
    """Codes before the stop, during the outage, after recovery."""
    before, during, after = Counter(), Counter(), Counter()
    end = outage.recovered or float("inf")
    for t, code in tally.events:
        (before if t < outage.stopped else during if t < end else after)[code] += 1
    return before, during, after


def phase_triton(repository: Path, twin: Path, work: Path, args: argparse.Namespace) -> PhaseRow:
    sys.path.insert(0, str(ROOT))
    from tests.integration.triton_harness import TritonProcess, TritonUnavailable

    try:
        triton = TritonProcess(twin, work / "triton.log").start()
    except TritonUnavailable as exc:
        return PhaseRow("Triton stop/restart", None, None, f"skipped: no tritonserver ({exc})")
    try:
        extra = ("--backend", "triton", "--triton-url", triton.url, "--triton-check-seconds")
        extra += ("0.2", "--triton-connect-timeout-seconds", "2")
        with Server(repository, work / "triton.db", work / "server-triton.log", *extra) as server:
            server.start()
            before = server.rss()
            with RssSampler(server.pid) as sampler:
                tally, outage = asyncio.run(
                    embed_through_outage(
                        server.address, args.clients, args.duration / 3, triton, png_crops(16, 2)
                    )
                )
            settle(args.settle)
            after = server.rss()
    finally:
        triton.stop()
    before_stop, during, after_recovery = outage_windows(tally, outage)
    slow, ended, why = tally.slowest_failure
    wrong = sum(n for code, n in during.items() if code not in ("OK", "UNAVAILABLE"))
    wrong += sum(n for code, n in {**before_stop, **after_recovery}.items() if code != "OK")
    if outage.recovered:
        recovery = (
            f"first OK {outage.recovered - outage.ready_again:.2f} s after Triton was ready "
            f"({outage.recovered - outage.stopped:.1f} s after the stop)"
        )
    else:
        recovery = "NOT recovered within 120 s"
    result = (
        f"UNAVAILABLE during the outage {during.get('UNAVAILABLE', 0)}, OK during it "
        f"{during.get('OK', 0)}; other/unexpected codes {wrong}; {recovery}; "
        f"slowest failed call {slow:.1f} s, ended {ended - outage.stopped:.1f} s after the stop "
        f"({why[:120]})"
    )
    return PhaseRow("Triton stop/restart", tally, (before, sampler.peak, after), result)


# -- phase: disk full ----------------------------------------------------------------------


def mount_tmpfs(where: Path, size: str) -> str:
    """'' when mounted, else why not."""
    where.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    return "" if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


def integrity_check(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return "; ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


def fill_disk(path: Path, headroom: int) -> Path:
    """A file taking all free space on `path`'s filesystem but `headroom` bytes."""
    stats = os.statvfs(path)
    filler = path / "filler"
    with open(filler, "wb") as out:
        out.write(b"\0" * max(0, stats.f_bavail * stats.f_frsize - headroom))
    return filler


@dataclass
class DiskFullRun:
    tally: Tally = field(default_factory=Tally)
    acked: dict[str, int] = field(default_factory=dict)
    searches_ok: int = 0
    searches: int = 0
    enrolls_after_freeing: Counter = field(default_factory=Counter)


async def enroll_until_full(address: str, filler: Path, run: DiskFullRun, limit_s: float) -> None:
    """Enrolls 4-vector identities until 30 enrolls failed; then probes searches, frees the
    space and enrolls again."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gallery_pb2_grpc.GalleryStub(channel)

        async def enroll(name: str, seed: int) -> bool:
            samples = [vector_sample(seed * 8 + s) for s in range(4)]
            request = gallery_pb2.EnrollRequest(gallery="full", identity=name, samples=samples)
            ok = await timed(run.tally, "Enroll", stub.Enroll, request, timeout=30) is not None
            if ok:
                run.acked[name] = len(samples)
            return ok

        failures, i, give_up = 0, 0, time.monotonic() + limit_s
        while failures < 30 and time.monotonic() < give_up:
            failures += not await enroll(f"f{i:06d}", i)
            i += 1
        # The in-memory index still answers: each acknowledged identity finds itself.
        for name in list(run.acked)[-20:]:
            seed = int(name[1:]) * 8
            request = gallery_pb2.SearchRequest(gallery="full", probes=[vector_sample(seed)])
            reply = await timed(run.tally, "Search", stub.Search, request)
            run.searches += 1
            run.searches_ok += bool(reply and reply.results[0].matches[0].identity == name)
        filler.unlink()
        for j in range(i, i + 10):
            run.enrolls_after_freeing["OK" if await enroll(f"f{j:06d}", j) else "error"] += 1


def phase_diskfull(repository: Path, work: Path, args: argparse.Namespace) -> PhaseRow:
    label, mount = "disk full", work / "tmpfs"
    why = mount_tmpfs(mount, "8m")
    if why:
        return PhaseRow(label, None, None, f"skipped: cannot mount tmpfs ({why})")
    try:
        path, log = mount / "galleries.db", work / "diskfull.log"
        run = DiskFullRun()
        with Server(repository, path, log) as server:
            server.start()
            asyncio.run(create_gallery(server.address, "full"))
            filler = fill_disk(mount, headroom=MiB)
            before = server.rss()
            with RssSampler(server.pid) as sampler:
                asyncio.run(enroll_until_full(server.address, filler, run, 4 * args.duration))
            after = server.rss()
        status = server.process.returncode if server.process else None
        integrity = integrity_check(path)
        with Server(repository, path, log).start() as restarted:
            lost, incomplete, _ = check_acknowledged(restarted.address, "full", run.acked)
    finally:
        subprocess.run(["umount", str(mount)], check=False, capture_output=True)
    failed = sum(run.tally.errors.values())
    result = (
        f"{failed} failed enrolls; searches while full {run.searches_ok}/{run.searches} "
        f"correct; after freeing space {run.enrolls_after_freeing['OK']}/10 enrolls OK; "
        f"stop exit {status}; integrity_check {integrity}; acknowledged {len(run.acked)}, "
        f"lost {lost}, incomplete {incomplete}"
    )
    return PhaseRow(label, run.tally, (before, sampler.peak, after), result)


# -- report --------------------------------------------------------------------------------


def fmt_errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in errors.items()) or "none"


def render(rows: Sequence[PhaseRow], header: str) -> str:
    lines = [
        header,
        "",
        "| phase | requests | OK | errors by code | p50 ms | p99 ms | RSS MiB before / peak / "
        "after | result |",
        "|---|---:|---:|---|---:|---:|---|---|",
    ]
    for row in rows:
        t = row.tally
        rss = " / ".join(f"{v:.0f}" for v in row.rss) if row.rss else "-"
        if t is None:
            lines.append(f"| {row.phase} | - | - | - | - | - | {rss} | {row.result} |")
            continue
        lines.append(
            f"| {row.phase} | {t.requests} | {t.codes.get('OK', 0)} | {fmt_errors(t.errors)} | "
            f"{percentile_ms(t.ok_latencies, 50):.1f} | {percentile_ms(t.ok_latencies, 99):.1f} | "
            f"{rss} | {row.result} |"
        )
    lines += ["", "Per RPC (successful calls):", ""]
    lines += ["| phase | RPC | calls | p50 ms | p99 ms |", "|---|---|---:|---:|---:|"]
    for row in rows:
        for rpc, latencies in sorted((row.tally.rpc_latencies if row.tally else {}).items()):
            lines.append(
                f"| {row.phase} | {rpc} | {len(latencies)} | {percentile_ms(latencies, 50):.1f} "
                f"| {percentile_ms(latencies, 99):.1f} |"
            )
    notes = [
        f"- {row.phase}: {code}: {text[:300]}"
        for row in rows
        if row.tally
        for code, text in row.tally.details.items()
    ]
    if notes:
        lines += ["", "First message per error code:", "", *notes]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    if keep:
        path = Path(tempfile.mkdtemp(prefix="adaface-soak-"))
        print(f"work directory (kept): {path}", flush=True)
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="adaface-soak-") as tmp:
            yield Path(tmp)


# -- phase: hostile callers -----------------------------------------------------------------

HOSTILE_TOKEN = "soak-token-0123456789abcdef"


def big_flat_png(side: int = 6000) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (90, 90, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


async def hostile_round(address: str) -> tuple[Tally, str]:
    from adaface.v1 import sampling_pb2, sampling_pb2_grpc

    tally = Tally()
    token = (("authorization", f"Bearer {HOSTILE_TOKEN}"),)
    # gRPC's default 8 KiB metadata limit stays: the 64 per-image errors must fit in it.
    options = [("grpc.max_send_message_length", 64 * MiB)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        embed = embedder_pb2_grpc.EmbedderStub(channel).Embed
        body = embedder_pb2.EmbedRequest(
            images=[common_pb2.ImageInput(encoded=bytes(15 * MiB)) for _ in range(2)]
        )
        await asyncio.gather(*(timed(tally, "Embed (no token)", embed, body) for _ in range(4)))
        png = big_flat_png()
        oversized = embedder_pb2.EmbedRequest(
            images=[
                common_pb2.ImageInput(encoded=png, alignment=common_pb2.ALIGNMENT_ALIGNED)
                for _ in range(64)
            ]
        )
        started = time.perf_counter()
        try:
            await embed(oversized, timeout=DEADLINE_S, metadata=token)
            tally.record("Embed (64 oversized)", "OK", time.perf_counter() - started)
        except grpc.aio.AioRpcError as exc:
            tally.record("Embed (64 oversized)", exc.code().name, time.perf_counter() - started,
                         exc.details() or "")  # fmt: skip
        stub = sampling_pb2_grpc.SamplingStub(channel)
        sampling_options = sampling_pb2.SamplingOptions(batch_size=8, num_instance=2)

        async def idle() -> None:
            started = time.perf_counter()
            call = stub.BuildEpoch(metadata=token, timeout=DEADLINE_S)
            await call.write(sampling_pb2.BuildEpochRequest(options=sampling_options))
            try:
                async for _ in call:
                    pass
                tally.record("BuildEpoch (idle)", "OK", time.perf_counter() - started)
            except grpc.aio.AioRpcError as exc:
                tally.record("BuildEpoch (idle)", exc.code().name, time.perf_counter() - started,
                             exc.details() or "")  # fmt: skip

        async def complete() -> None:
            await asyncio.sleep(0.5)  # after the idle streams have opened
            rng = np.random.default_rng(0)
            records = [
                sampling_pb2.IdentityRecord(
                    sample_count=2, vector=rng.standard_normal(8).astype("<f4").tobytes()
                )
                for _ in range(16)
            ]
            request = sampling_pb2.BuildEpochRequest(options=sampling_options, identities=records)
            started = time.perf_counter()
            try:
                replies = [r async for r in stub.BuildEpoch(iter([request]), metadata=token,
                                                            timeout=DEADLINE_S)]  # fmt: skip
                code = "OK" if replies and replies[0].WhichOneof("part") == "header" else "EMPTY"
                tally.record("BuildEpoch (complete)", code, time.perf_counter() - started)
            except grpc.aio.AioRpcError as exc:
                tally.record("BuildEpoch (complete)", exc.code().name,
                             time.perf_counter() - started, exc.details() or "")  # fmt: skip

        await asyncio.gather(idle(), idle(), complete())
    by = {rpc: dict(codes) for rpc, codes in tally.by_rpc.items()}
    return tally, "; ".join(f"{rpc}: {codes}" for rpc, codes in by.items())


# A client that opens an upload or a build, never half-closes it and waits to be killed:
# argv = address, token, "import" NAME FILE | "build" IDENTITIES.
DYING_CLIENT = """
import sys, threading
import grpc
import numpy as np
from adaface.v1 import gallery_pb2, gallery_pb2_grpc, sampling_pb2, sampling_pb2_grpc

address, token, mode = sys.argv[1:4]
forever = threading.Event()
metadata = (("authorization", "Bearer " + token),)
channel = grpc.insecure_channel(address)

def held(messages):
    yield from messages
    forever.wait()

if mode == "import":
    name, path = sys.argv[4:6]
    header = gallery_pb2.ImportRequest(header=gallery_pb2.ImportHeader(name=name, format=1))
    data = gallery_pb2.ImportRequest(data=open(path, "rb").read())
    call = gallery_pb2_grpc.GalleryStub(channel).Import.future(held([header, data]),
                                                                metadata=metadata)
    forever.wait(1.0)  # the whole file is on the wire and read by now
else:
    x = np.random.default_rng(3).standard_normal((int(sys.argv[4]), 8)).astype("<f4")
    request = sampling_pb2.BuildEpochRequest(
        options=sampling_pb2.SamplingOptions(batch_size=32, num_instance=2),
        identities=[sampling_pb2.IdentityRecord(sample_count=1, vector=v.tobytes()) for v in x])
    replies = sampling_pb2_grpc.SamplingStub(channel).BuildEpoch(iter([request]),
                                                                 metadata=metadata)
    threading.Thread(target=lambda: list(replies), daemon=True).start()
print("ready", flush=True)
forever.wait()
"""
BUILD_STARTED = "kNN over {n} identities started"
BUILD_STOPPED = "stopped, its caller is gone"


def dying_client(*argv: str) -> subprocess.Popen:
    client = subprocess.Popen([sys.executable, "-c", DYING_CLIENT, *argv], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert client.stdout is not None and client.stdout.readline().strip() == "ready"
    return client


def wait_for_log(log: Path, text: str, since: int, timeout: float) -> bool:
    """Whether `text` appears in `log` after byte `since` within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_bytes()[since:].decode(errors="replace"):
            return True
        time.sleep(0.02)
    return False


def dead_clients(server: Server, tally: Tally, rounds: int = 5, identities: int = 80_000) -> str:
    """Clients killed with SIGKILL: one holding an open Import of a whole export file (must
    commit nothing, logged CANCELLED), one in the middle of a long BuildEpoch (its kNN must
    stop: the time from the kill to the server's "stopped" line is the latency)."""
    token = (("authorization", f"Bearer {HOSTILE_TOKEN}"),)
    with grpc.insecure_channel(server.address) as channel:
        gallery = gallery_pb2_grpc.GalleryStub(channel)
        gallery.CreateGallery(gallery_pb2.CreateGalleryRequest(name="src"), metadata=token)
        for i in range(3):
            gallery.Enroll(gallery_pb2.EnrollRequest(gallery="src", identity=f"p{i}",
                           samples=[vector_sample(i)]), metadata=token)  # fmt: skip
        data = b"".join(c.data for c in gallery.Export(gallery_pb2.ExportRequest(name="src"),
                                                       metadata=token))  # fmt: skip
        export = server.log.with_suffix(".export")
        export.write_bytes(data)
        for i in range(rounds):
            since = server.log.stat().st_size
            client = dying_client(server.address, HOSTILE_TOKEN, "import", f"dead-{i}",
                                  str(export))  # fmt: skip
            started = time.perf_counter()
            client.kill()
            client.wait()
            logged = wait_for_log(server.log, "Gallery/Import CANCELLED", since, 10)
            try:
                gallery.GetGallery(gallery_pb2.GetGalleryRequest(name=f"dead-{i}"),
                                   metadata=token, timeout=10)  # fmt: skip
                code, details = "COMMITTED", "a killed client's Import was committed"
            except grpc.RpcError as exc:
                code = "CANCELLED" if exc.code() == grpc.StatusCode.NOT_FOUND else exc.code().name
                details = "nothing written" + ("" if logged else "; NOT logged CANCELLED")
                code = code if logged else "LOGGED_OK"
            tally.record("Import (client killed)", code, time.perf_counter() - started, details)
    stops = []
    for _ in range(rounds):
        since = server.log.stat().st_size
        client = dying_client(server.address, HOSTILE_TOKEN, "build", str(identities))
        wait_for_log(server.log, BUILD_STARTED.format(n=identities), since, 60)
        started = time.perf_counter()
        client.kill()
        client.wait()
        stopped = wait_for_log(server.log, BUILD_STOPPED, since, 60)
        stops.append(time.perf_counter() - started)
        tally.record("BuildEpoch (client killed)", "CANCELLED" if stopped else "KEPT_RUNNING",
                     stops[-1], "kNN stopped after the kill")  # fmt: skip
    return f"killed clients' builds stopped {max(stops):.2f} s after the kill at most"


def phase_hostile(repository: Path, work: Path, args: argparse.Namespace) -> PhaseRow:
    tokens = work / "hostile.tokens"
    tokens.write_text(HOSTILE_TOKEN + "\n")
    server = Server(
        repository, work / "hostile.db", work / "hostile.log",
        "--auth-tokens-file", str(tokens), "--stream-idle-seconds", "2",
        "--sampling-max-builds", "2", "--sampling-knn-method", "tiles",
        "--sampling-knn-block", "64", "--log-level", "INFO",
    )  # fmt: skip
    with server.start():
        settle(args.settle)
        before = server.rss()
        with RssSampler(server.pid) as sampler:
            tally, summary = asyncio.run(hostile_round(server.address))
            stopped = dead_clients(server, tally)
            by = {rpc: dict(codes) for rpc, codes in tally.by_rpc.items()}
            summary = "; ".join([*(f"{rpc}: {codes}" for rpc, codes in by.items()), stopped])
        settle(args.settle)
        after = server.rss()
    return PhaseRow("hostile callers", tally, (before, sampler.peak, after), summary)


def run_phases(args: argparse.Namespace, work: Path) -> list[PhaseRow]:
    repository, twin = export_model(work)
    steps: dict[str, Callable[[], list[PhaseRow]]] = {
        "load": lambda: phase_load(repository, work, args),
        "kill9": lambda: phase_kill9(repository, work, args),
        "triton": lambda: [phase_triton(repository, twin, work, args)],
        "diskfull": lambda: [phase_diskfull(repository, work, args)],
        "hostile": lambda: [phase_hostile(repository, work, args)],
    }
    rows: list[PhaseRow] = []
    for phase in args.phases:
        started = time.monotonic()
        print(f"--- {phase} ...", flush=True)
        rows += steps[phase]()
        print(f"--- {phase} done in {time.monotonic() - started:.0f} s", flush=True)
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per phase/round")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument(
        "--settle",
        type=float,
        default=6.0,
        help="idle seconds before reading RSS (the server trims its heap after 2-4 s idle)",
    )
    parser.add_argument(
        "--phases",
        type=lambda text: [p.strip() for p in text.split(",") if p.strip()],
        default=list(PHASES),
        help=f"comma-separated subset of {','.join(PHASES)}",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from {','.join(PHASES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    with workdir(args.keep) as work:
        rows = run_phases(args, work)
    header = (
        f"## Soak: {args.clients} clients, {args.duration:.0f} s per phase, ir_18 (random), "
        f"{os.cpu_count()} CPUs, {time.monotonic() - started:.0f} s in all"
    )
    table = render(rows, header)
    print("\n" + table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
