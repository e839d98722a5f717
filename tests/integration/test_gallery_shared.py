"""Three real server processes on one gallery store: read-your-writes, unique creates, kill -9."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adaface.v1 import gallery_pb2, gallery_pb2_grpc

from .conftest import POSTGRES_PASSWORD
from .gallery_support import (
    free_port,
    rpc_error,
    start_server_process,
    unit_vectors,
    vector_sample,
    wait_serving,
)

ROUNDS = 200


@dataclass
class Node:
    """One server process and a channel to it."""

    proc: object
    address: str
    log: Path
    channel: grpc.Channel = field(init=False)
    stub: gallery_pb2_grpc.GalleryStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.address)
        self.stub = gallery_pb2_grpc.GalleryStub(self.channel)


@dataclass
class Cluster:
    """Server processes sharing one store (`store_args` says which)."""

    repository: Path
    model: str
    store_args: list[str]
    env: dict[str, str]
    tmp: Path
    nodes: list[Node] = field(default_factory=list)
    kind: str = "sqlite"

    def start(
        self, count: int = 1, store_args: list[str] | None = None, env: dict | None = None
    ) -> list[Node]:
        started = []
        for _ in range(count):
            port = free_port()
            log = self.tmp / f"server-{len(self.nodes)}.log"
            proc = start_server_process(
                self.repository,
                self.model,
                None,
                port,
                log,
                store_args or self.store_args,
                {**self.env, **(env or {})},
            )
            started.append(Node(proc, f"127.0.0.1:{port}", log))
            self.nodes.append(started[-1])
        for node in started:
            wait_serving(node.address, node.proc, node.log)  # type: ignore[arg-type]
        return started

    def stop(self) -> None:
        for node in self.nodes:
            node.channel.close()
            if node.proc.poll() is None:  # type: ignore[attr-defined]
                node.proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
        for node in self.nodes:
            try:
                node.proc.wait(30)  # type: ignore[attr-defined]
            except Exception:
                node.proc.kill()  # type: ignore[attr-defined]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def cluster(request, ir18_repository, tmp_path_factory) -> Iterator[Cluster]:
    repository, model = ir18_repository
    tmp = tmp_path_factory.mktemp(f"shared-{request.param}")
    env: dict[str, str] = {}
    if request.param == "sqlite":
        store_args = ["--gallery-path", str(tmp / "shared.sqlite3")]
    else:
        pg = request.getfixturevalue("postgres")
        database = f"shared{os.getpid()}"
        create_database(pg, database)
        password_file = tmp / "pgpass"
        password_file.write_text(POSTGRES_PASSWORD + "\n")
        url = pg.url.rsplit("/", 1)[0] + "/" + database
        # The password from a file here; the process started after a kill -9 uses PGPASSWORD.
        store_args = ["--gallery-url", url, "--gallery-password-file", str(password_file)]
    c = Cluster(repository, model, store_args, env, tmp)
    c.kind = request.param
    try:
        c.start(3)
        yield c
    finally:
        c.stop()
    for node in c.nodes:  # the password never reaches a log
        assert POSTGRES_PASSWORD not in node.log.read_text(errors="replace")


def create_database(pg, name: str) -> None:
    import psycopg

    with psycopg.connect(pg.url, password=pg.password, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")


def enroll(node: Node, gallery: str, identity: str, vectors: np.ndarray, mode=None):
    request = gallery_pb2.EnrollRequest(
        gallery=gallery, identity=identity, samples=[vector_sample(v) for v in vectors]
    )
    return node.stub.Enroll(request, timeout=30)


def top_identity(node: Node, gallery: str, vector: np.ndarray) -> str:
    response = node.stub.Search(
        gallery_pb2.SearchRequest(gallery=gallery, probes=[vector_sample(vector)], top_k=1),
        timeout=30,
    )
    matches = response.results[0].matches
    return matches[0].identity if matches else ""


def test_enroll_through_one_process_is_found_through_the_others(cluster):
    a, b, c = cluster.nodes[:3]
    a.stub.CreateGallery(gallery_pb2.CreateGalleryRequest(name="ryw"), timeout=30)
    vectors = unit_vectors(ROUNDS, 7)
    found = 0
    for i in range(ROUNDS):
        writer = cluster.nodes[i % 3]
        enroll(writer, "ryw", f"p{i}", vectors[i : i + 1])
        for reader in cluster.nodes[:3]:
            if reader is not writer:
                found += top_identity(reader, "ryw", vectors[i]) == f"p{i}"
    assert found == 2 * ROUNDS
    # Every process holds the same gallery, counters included.
    infos = [n.stub.GetGallery(gallery_pb2.GetGalleryRequest(name="ryw")) for n in (a, b, c)]
    assert [i.identity_count for i in infos] == [ROUNDS] * 3
    assert [i.sample_count for i in infos] == [ROUNDS] * 3
    # GetIdentity and ListIdentities read the store after catching up, too.
    enroll(b, "ryw", "late", unit_vectors(1, 8))
    got = c.stub.GetIdentity(gallery_pb2.GetIdentityRequest(gallery="ryw", identity="late"))
    assert got.identity == "late"
    listed = a.stub.ListIdentities(gallery_pb2.ListIdentitiesRequest(gallery="ryw", page_size=1000))
    assert len(listed.identities) == ROUNDS + 1
    # Removals travel the same way.
    b.stub.RemoveIdentity(gallery_pb2.RemoveIdentityRequest(gallery="ryw", identity="p0"))
    assert top_identity(c, "ryw", vectors[0]) != "p0"
    assert top_identity(a, "ryw", vectors[0]) != "p0"


def race(nodes: list[Node], call) -> list[grpc.StatusCode]:
    """Runs call(node, k) on every node at once; returns the status codes."""
    barrier = threading.Barrier(len(nodes))
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def attempt(node: Node, k: int) -> None:
        barrier.wait()
        try:
            call(node, k)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=attempt, args=(n, k)) for k, n in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


def test_concurrent_create_of_one_identity_gives_exactly_one_ok(cluster):
    nodes = cluster.nodes[:3]
    nodes[0].stub.CreateGallery(gallery_pb2.CreateGalleryRequest(name="race"), timeout=30)
    for r in range(10):
        codes = race(
            nodes,
            lambda node, k, r=r: enroll(node, "race", f"same{r}", unit_vectors(1, 10 * r + k)),
        )
        assert codes.count(grpc.StatusCode.OK) == 1, codes
        assert codes.count(grpc.StatusCode.ALREADY_EXISTS) == 2, codes
        # The winner's single sample is all there is, seen alike by every process.
        for node in nodes:
            got = node.stub.GetIdentity(
                gallery_pb2.GetIdentityRequest(gallery="race", identity=f"same{r}")
            )
            assert got.sample_count == 1
    # Galleries too: the store's unique name decides, not a process's memory.
    codes = race(
        nodes,
        lambda node, k: node.stub.CreateGallery(
            gallery_pb2.CreateGalleryRequest(name="raced"), timeout=30
        ),
    )
    assert codes.count(grpc.StatusCode.OK) == 1, codes
    assert codes.count(grpc.StatusCode.ALREADY_EXISTS) == 2, codes


def test_kill_9_mid_enrollments_loses_nothing_and_a_restart_rebuilds(cluster):
    a, b, c = cluster.nodes[:3]
    a.stub.CreateGallery(gallery_pb2.CreateGalleryRequest(name="crash"), timeout=30)
    acked: list[str] = []

    def requests():
        for i in range(100_000):
            yield gallery_pb2.EnrollRequest(
                gallery="crash",
                identity=f"k{i:05d}",
                samples=[vector_sample(v) for v in unit_vectors(2, 5000 + i)],
            )

    with pytest.raises(grpc.RpcError):
        for response in b.stub.EnrollStream(requests(), timeout=120):
            assert not response.HasField("error"), response.error
            acked.append(response.identity)
            if len(acked) == 150:
                os.kill(b.proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    b.proc.wait(30)  # type: ignore[attr-defined]
    assert len(acked) >= 150
    # The others keep serving and hold every acknowledged identity.
    for node in (a, c):
        listed = node.stub.ListIdentities(
            gallery_pb2.ListIdentitiesRequest(gallery="crash", page_size=1000)
        )
        present = {i.identity: i.sample_count for i in listed.identities}
        assert set(acked) <= set(present), sorted(set(acked) - set(present))[:5]
        assert set(present.values()) == {2}  # nothing half-written
        name = acked[77]
        assert top_identity(node, "crash", unit_vectors(2, 5000 + int(name[1:]))[1]) == name
    enroll(c, "crash", "after", unit_vectors(1, 9))
    # A new process rebuilds every gallery from the store at start.
    if cluster.kind == "postgres":  # libpq's own source of the password this time
        (d,) = cluster.start(1, cluster.store_args[:2], {"PGPASSWORD": POSTGRES_PASSWORD})
    else:
        (d,) = cluster.start(1)
    info = d.stub.GetGallery(gallery_pb2.GetGalleryRequest(name="crash"))
    assert info.identity_count == len(present) + 1
    assert top_identity(d, "crash", unit_vectors(1, 9)[0]) == "after"
    cluster.nodes[1] = d


def test_a_gallery_deleted_through_one_process_disappears_from_the_others(cluster):
    a, b, c = cluster.nodes[:3]
    a.stub.CreateGallery(gallery_pb2.CreateGalleryRequest(name="gone"), timeout=30)
    enroll(a, "gone", "x", unit_vectors(1, 11))
    assert top_identity(c, "gone", unit_vectors(1, 11)[0]) == "x"
    # An import through one process (one RELOAD entry) is searchable through the others.
    data = b"".join(
        chunk.data for chunk in c.stub.Export(gallery_pb2.ExportRequest(name="gone"), timeout=30)
    )
    header = gallery_pb2.ImportHeader(name="copied", format=gallery_pb2.IMPORT_FORMAT_NATIVE)
    b.stub.Import(
        iter([gallery_pb2.ImportRequest(header=header), gallery_pb2.ImportRequest(data=data)]),
        timeout=30,
    )
    assert top_identity(a, "copied", unit_vectors(1, 11)[0]) == "x"
    assert c.stub.GetGallery(gallery_pb2.GetGalleryRequest(name="copied")).sample_count == 1
    b.stub.DeleteGallery(gallery_pb2.DeleteGalleryRequest(name="gone"), timeout=30)
    for node in (a, c):
        err = rpc_error(
            node.stub.Search,
            gallery_pb2.SearchRequest(
                gallery="gone", probes=[vector_sample(unit_vectors(1, 11)[0])]
            ),
        )
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert "'gone'" in err.details()
        names = [
            g.name for g in node.stub.ListGalleries(gallery_pb2.ListGalleriesRequest()).galleries
        ]
        assert "gone" not in names
    # The name is free again, through any process.
    c.stub.CreateGallery(gallery_pb2.CreateGalleryRequest(name="gone"), timeout=30)
    assert a.stub.GetGallery(gallery_pb2.GetGalleryRequest(name="gone")).identity_count == 0


@pytest.mark.parametrize("cluster", ["postgres"], indirect=True)
def test_postgres_stopped_under_load_is_unavailable_then_recovers(cluster, postgres):
    a, b, c = cluster.nodes[:3]
    a.stub.CreateGallery(gallery_pb2.CreateGalleryRequest(name="outage"), timeout=30)
    enroll(b, "outage", "before", unit_vectors(1, 21))
    postgres.stop("fast")
    postgres.wait_down()
    try:
        for i, node in enumerate((a, b, c)):
            err = rpc_error(
                node.stub.Enroll,
                gallery_pb2.EnrollRequest(
                    gallery="outage",
                    identity=f"down{i}",
                    samples=[vector_sample(unit_vectors(1, 30 + i)[0])],
                ),
            )
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            assert f"127.0.0.1:{postgres.port}" in err.details()
            assert POSTGRES_PASSWORD not in err.details()
            probe = vector_sample(unit_vectors(1, 21)[0])
            err = rpc_error(
                node.stub.Search, gallery_pb2.SearchRequest(gallery="outage", probes=[probe])
            )
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            assert f"127.0.0.1:{postgres.port}" in err.details()
            # Health stays SERVING: embedding works without the database.
            health = health_pb2_grpc.HealthStub(node.channel)
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        postgres.start()
    # Recovery without a restart: the first calls may still meet a dead pooled connection.
    deadline = time.monotonic() + 60
    while True:
        try:
            enroll(c, "outage", "after", unit_vectors(1, 22))
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
            assert time.monotonic() < deadline, exc.details()
            time.sleep(0.5)
    for node in (a, b):
        deadline = time.monotonic() + 60
        while True:
            try:
                assert top_identity(node, "outage", unit_vectors(1, 22)[0]) == "after"
                assert top_identity(node, "outage", unit_vectors(1, 21)[0]) == "before"
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                assert time.monotonic() < deadline, exc.details()
                time.sleep(0.5)
    # Nothing written while down.
    for i in range(3):
        err = rpc_error(
            a.stub.GetIdentity,
            gallery_pb2.GetIdentityRequest(gallery="outage", identity=f"down{i}"),
        )
        assert err.code() == grpc.StatusCode.NOT_FOUND
