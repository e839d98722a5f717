"""Gallery fault tolerance with real server processes: a full disk, a file-size limit, SIGTERM.

The disk fills for real: the store lives on a small tmpfs (needs mount rights), or the
server process gets a file-size limit (RLIMIT_FSIZE, set from outside with prlimit), which
turns file growth into EFBIG. CPython ignores SIGXFSZ, so the server gets the error code.
"""

from __future__ import annotations

import re
import resource
import signal
import sqlite3
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adaface.v1 import gallery_pb2, gallery_pb2_grpc

from .gallery_support import (
    free_port,
    rpc_error,
    start_server_process,
    unit_vectors,
    vector_sample,
    wait_serving,
)

VECTORS_PER_ENROLL = 8  # 16 KiB of vectors: the small disk holds a couple of dozen
MAX_ENROLLS = 300  # far more than fit: the disk must fill before this
TMPFS_SIZE = "512k"
RLIMIT_ROOM = 448 * 1024  # bytes the WAL may still grow under the file-size limit


def vectors_of(name: str) -> np.ndarray:
    return unit_vectors(VECTORS_PER_ENROLL, zlib.crc32(name.encode()))


def enroll_request(name: str, gallery: str = "g") -> gallery_pb2.EnrollRequest:
    return gallery_pb2.EnrollRequest(
        gallery=gallery, identity=name, samples=[vector_sample(v) for v in vectors_of(name)]
    )


@dataclass
class Server:
    """A `python -m adaface_server` child process with its stubs."""

    repository: Path
    model: str
    gallery_path: Path
    log: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    channel: grpc.Channel | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.proc = start_server_process(
            self.repository, self.model, self.gallery_path, self.port, self.log
        )
        wait_serving(self.address, self.proc, self.log)
        self.channel = grpc.insecure_channel(self.address)
        return self

    @property
    def stub(self) -> gallery_pb2_grpc.GalleryStub:
        return gallery_pb2_grpc.GalleryStub(self.channel)

    def health(self) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (a clean stop); the exit status."""
        assert self.proc is not None
        if self.channel is not None:
            self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@dataclass
class SmallDisk:
    """Where the gallery lives, how the disk fills, what the client is told, how to free it."""

    kind: str
    gallery_path: Path
    code: grpc.StatusCode
    limit: int = 0  # rlimit: the file-size limit given to the server

    def squeeze(self, server: Server) -> None:
        if self.kind == "rlimit":
            assert server.proc is not None
            wal = Path(f"{self.gallery_path}-wal").stat().st_size
            self.limit = wal + RLIMIT_ROOM
            assert server.log.stat().st_size < self.limit // 2  # its log must still fit
            # Soft limit only: lowering the hard one could not be undone without privileges.
            limits = (self.limit, resource.RLIM_INFINITY)
            resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, limits)

    def free(self, server: Server) -> None:
        if self.kind == "tmpfs":
            subprocess.run(
                ["mount", "-o", "remount,size=16m", str(self.gallery_path.parent)], check=True
            )
        else:
            assert server.proc is not None
            unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
            resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, unlimited)

    def expected_details(self) -> re.Pattern:
        where = re.escape(f"gallery store {self.gallery_path}: ")
        if self.kind == "tmpfs":
            return re.compile(
                where + r"the disk is full \(SQLite: database or disk is full.*\); "
                r"nothing was written; free space on that file system and retry"
            )
        return re.compile(
            where + r"the write failed with a storage error \(SQLite: disk I/O error.*; this "
            rf"process may not grow a file past {self.limit} bytes \(RLIMIT_FSIZE\)\); "
            r"nothing was written; retry once the storage is healthy"
        )


@pytest.fixture(params=["tmpfs", "rlimit"])
def small_disk(request, tmp_path) -> Iterator[SmallDisk]:
    folder = tmp_path / "disk"
    folder.mkdir()
    path = folder / "galleries.sqlite3"
    if request.param == "rlimit":
        yield SmallDisk("rlimit", path, grpc.StatusCode.UNAVAILABLE)
        return
    try:
        mount = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        failure = "" if mount.returncode == 0 else mount.stderr or mount.stdout
    except OSError as exc:  # no mount(8) at all
        failure = str(exc)
    if failure:
        reason = " ".join(failure.split())
        pytest.skip(f"cannot mount a tmpfs here ({reason}); the rlimit variant still runs")
    try:
        yield SmallDisk("tmpfs", path, grpc.StatusCode.RESOURCE_EXHAUSTED)
    finally:
        # Lazy: a failed test may have left the server holding files there.
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(stub: gallery_pb2_grpc.GalleryStub) -> tuple[list[str], str, grpc.RpcError]:
    """Enrolls until a write fails: (acknowledged names, the failed name, its error)."""
    acked: list[str] = []
    for i in range(MAX_ENROLLS):
        name = f"p{i:04d}"
        try:
            reply = stub.Enroll(enroll_request(name), timeout=30)
        except grpc.RpcError as err:
            return acked, name, err
        assert reply.created and reply.sample_count == VECTORS_PER_ENROLL
        acked.append(name)
    raise AssertionError(f"{MAX_ENROLLS} enrollments fitted: the disk never filled")


def top_match(stub: gallery_pb2_grpc.GalleryStub, vector: np.ndarray) -> str:
    reply = stub.Search(
        gallery_pb2.SearchRequest(gallery="g", probes=[vector_sample(vector)], top_k=1),
        timeout=30,
    )
    return reply.results[0].matches[0].identity


def stored_identities(path: Path) -> dict[str, int]:
    """name -> sample count, read from the file itself once the server has stopped."""
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return dict(conn.execute("SELECT name, sample_count FROM identities"))


def assert_flushed(path: Path) -> None:
    """After a clean stop the main file alone holds everything (checked before any open)."""
    wal = Path(f"{path}-wal")
    assert not wal.exists() or wal.stat().st_size == 0


def test_full_disk_fails_writes_clearly_and_recovers(ir18_repository, tmp_path, small_disk):
    repository, model = ir18_repository
    server = Server(repository, model, small_disk.gallery_path, tmp_path / "server.log").start()
    try:
        server.stub.CreateGallery(gallery_pb2.CreateGalleryRequest(name="g"), timeout=30)
        small_disk.squeeze(server)
        acked, failed, err = fill(server.stub)
        print(f"\n[{small_disk.kind}] {len(acked)} enrollments acknowledged before the disk filled")
        print(f"[{small_disk.kind}] {err.code().name}: {err.details()}")
        assert len(acked) >= 3  # the disk filled with use, not at once
        assert err.code() == small_disk.code
        assert small_disk.expected_details().fullmatch(err.details()), err.details()

        # Still full: the same write fails the same way, a stream's too, one by one.
        again = rpc_error(server.stub.Enroll, enroll_request(failed))
        assert (again.code(), again.details()) == (err.code(), err.details())
        streamed = [f"q{k:04d}" for k in range(3)]  # as long as the names that filled it
        replies = list(server.stub.EnrollStream(iter(map(enroll_request, streamed)), timeout=30))
        assert sorted(r.identity for r in replies) == streamed
        for reply in replies:
            assert reply.error.code == small_disk.code.value[0]
            assert small_disk.expected_details().fullmatch(reply.error.message)

        # The server and every read keep working; nothing of the failed writes shows.
        assert server.health() == health_pb2.HealthCheckResponse.SERVING
        info = server.stub.GetGallery(gallery_pb2.GetGalleryRequest(name="g"), timeout=30)
        assert (info.identity_count, info.sample_count) == (
            len(acked),
            len(acked) * VECTORS_PER_ENROLL,
        )
        for name in (acked[0], acked[-1]):
            assert top_match(server.stub, vectors_of(name)[3]) == name
        assert top_match(server.stub, vectors_of(failed)[0]) != failed
        missing = rpc_error(
            server.stub.GetIdentity, gallery_pb2.GetIdentityRequest(gallery="g", identity=failed)
        )
        assert missing.code() == grpc.StatusCode.NOT_FOUND
        got = server.stub.GetIdentity(
            gallery_pb2.GetIdentityRequest(gallery="g", identity=acked[-1], include_vectors=True),
            timeout=30,
        )
        vectors = np.stack([np.frombuffer(s.vector.vector, "<f4") for s in got.samples])
        np.testing.assert_allclose(vectors, vectors_of(acked[-1]), atol=1e-6)

        # Room again: the very writes that failed now create their identities (proof that
        # nothing of them was written), on the same server process.
        small_disk.free(server)
        for name in [failed, *streamed]:
            reply = server.stub.Enroll(enroll_request(name), timeout=30)
            assert reply.created and reply.sample_count == VECTORS_PER_ENROLL
            acked.append(name)
        assert top_match(server.stub, vectors_of(failed)[0]) == failed
        assert server.stop() == 0
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()

    assert_flushed(small_disk.gallery_path)
    assert stored_identities(small_disk.gallery_path) == dict.fromkeys(acked, VECTORS_PER_ENROLL)
    if small_disk.kind == "rlimit":  # the variant that runs everywhere; a restart costs ~5 s
        assert_served_after_restart(server, acked)


def assert_served_after_restart(server: Server, acked: list[str]) -> None:
    """A restart rebuilds the index from the file: every acknowledged identity is found."""
    server.start()
    try:
        page = server.stub.ListIdentities(
            gallery_pb2.ListIdentitiesRequest(gallery="g", page_size=1000), timeout=30
        )
        assert sorted(i.identity for i in page.identities) == sorted(acked)
        for name in acked[:: max(1, len(acked) // 5)]:
            assert top_match(server.stub, vectors_of(name)[5]) == name
    finally:
        assert server.stop() == 0


STREAMS = 4
WARM_ACKS = 20  # per stream before SIGTERM
TAIL = 5  # requests each stream still sends after the server refused a new call


def test_sigterm_finishes_in_flight_streams_refuses_new_calls_and_flushes(
    ir18_repository, tmp_path
):
    repository, model = ir18_repository
    path = tmp_path / "galleries.sqlite3"
    server = Server(repository, model, path, tmp_path / "server.log").start()
    refused = threading.Event()
    sent: list[list[str]] = [[] for _ in range(STREAMS)]
    replies: list[list[gallery_pb2.EnrollResponse]] = [[] for _ in range(STREAMS)]
    failures: list[BaseException] = []

    def requests(k: int) -> Iterator[gallery_pb2.EnrollRequest]:
        tail = 0
        for j in range(10_000):
            if refused.is_set():
                tail += 1
                if tail > TAIL:
                    return
            sent[k].append(f"t{k}-{j:04d}")
            yield enroll_request(sent[k][-1])
            time.sleep(0.01)  # a steady trickle keeps the stream in flight

    def stream(k: int) -> None:
        with grpc.insecure_channel(server.address) as channel:
            try:
                stub = gallery_pb2_grpc.GalleryStub(channel)
                for reply in stub.EnrollStream(requests(k), timeout=120):
                    replies[k].append(reply)
            except BaseException as exc:  # reported by the main thread
                failures.append(exc)

    try:
        server.stub.CreateGallery(gallery_pb2.CreateGalleryRequest(name="g"), timeout=30)
        threads = [threading.Thread(target=stream, args=(k,)) for k in range(STREAMS)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while min(len(r) for r in replies) < WARM_ACKS:
            assert time.monotonic() < deadline and not failures, failures
            time.sleep(0.02)
        # A channel connected before SIGTERM, as a long-lived client's would be.
        early = grpc.insecure_channel(server.address)
        gallery_pb2_grpc.GalleryStub(early).GetGallery(
            gallery_pb2.GetGalleryRequest(name="g"), timeout=30
        )

        server.proc.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        before = sum(map(len, sent))
        late_acked, late_refused = probe_new_calls(server, early)
        assert server.proc.poll() is None  # refused while the streams kept it in its grace
        refused.set()
        for t in threads:
            t.join(60)
        streams_done = time.monotonic()
        code = server.proc.wait(60)
        exited = time.monotonic()
        early.close()
    finally:
        refused.set()
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()

    assert code == 0 and not failures, failures
    print(
        f"\nSIGTERM -> exit {code} in {exited - stopping:.2f}s, "
        f"{exited - streams_done:.2f}s after the last stream ended"
    )
    print(f"new calls after SIGTERM: {len(late_acked)} accepted (before the stop), {late_refused}")
    acked = [*late_acked]
    for k in range(STREAMS):
        # Every request of an in-flight stream was answered, none with an error.
        assert sorted(r.identity for r in replies[k]) == sorted(sent[k])
        assert not [r.error for r in replies[k] if r.HasField("error")]
        acked += sent[k]
    print(f"{len(acked)} enrollments acknowledged, {len(acked) - before} sent after SIGTERM")
    assert_flushed(path)
    assert stored_identities(path) == dict.fromkeys(acked, VECTORS_PER_ENROLL)


def probe_new_calls(server: Server, early: grpc.Channel) -> tuple[list[str], list[str]]:
    """New calls after SIGTERM, on a channel opened before it and on a new one, until one is
    refused. While in-flight streams keep the server draining, a refusal is the server's
    own: UNAVAILABLE saying it is shutting down, at once (nothing may hang). A call that beat
    the stop may succeed. Returns (acknowledged names, what was seen)."""
    acked: list[str] = []
    seen: list[str] = []
    deadline = time.monotonic() + 20
    for n in range(10_000):
        assert time.monotonic() < deadline, "no call refused 20 s after SIGTERM"
        name = f"late-{n}"
        try:
            gallery_pb2_grpc.GalleryStub(early).Enroll(enroll_request(name), timeout=5)
        except grpc.RpcError as err:
            seen.append(f"open channel: {err.code().name} {err.details()!r}")
            assert err.code() == grpc.StatusCode.UNAVAILABLE, seen
            assert "shutting down" in err.details(), seen
            break
        acked.append(name)
    with grpc.insecure_channel(server.address) as fresh:
        err = rpc_error(gallery_pb2_grpc.GalleryStub(fresh).Enroll, enroll_request("late-x"), 5)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
        assert "shutting down" in err.details(), err.details()
        seen.append(f"new channel: UNAVAILABLE {err.details()!r}")
        # Health checks are still answered while the server drains: NOT_SERVING.
        status = health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    return acked, seen
