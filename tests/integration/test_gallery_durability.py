"""Gallery durability and pinning: kill -9 mid-stream, restart with another model, loading."""

from __future__ import annotations

import os
import signal
import time

import grpc
import numpy as np
import pytest

from adaface.v1 import gallery_pb2, gallery_pb2_grpc
from adaface_client import AdafaceError, GalleryClient
from adaface_server.models.export import export_model

from .gallery_support import (
    free_port,
    image_sample,
    rpc_error,
    start_server_process,
    unit_vectors,
    vector_sample,
    wait_serving,
)
from .server_harness import ServerThread, server_settings

SAMPLES_PER_IDENTITY = 3


def identity_vectors(i: int) -> np.ndarray:
    return unit_vectors(SAMPLES_PER_IDENTITY, 1000 + i)


def test_kill_9_during_enrollments_keeps_every_acknowledged_one(ir18_repository, tmp_path):
    repository, model = ir18_repository
    path = tmp_path / "galleries.sqlite3"
    log = tmp_path / "server.log"
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = start_server_process(repository, model, path, port, log)
    acked: set[str] = set()
    try:
        wait_serving(address, proc, log)
        with GalleryClient(address, timeout=30, retries=0) as client:
            client.create_gallery("durable")
            items = ((f"p{i:05d}", identity_vectors(i)) for i in range(100_000))
            with pytest.raises(AdafaceError):
                for result in client.enroll_many("durable", items, window=16):
                    assert not isinstance(result, Exception), result
                    acked.add(result.identity)
                    if len(acked) == 300:
                        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(acked) >= 300

    proc = start_server_process(repository, model, path, port, log)
    try:
        wait_serving(address, proc, log)
        with GalleryClient(address, timeout=60) as client:
            present = {i.identity: i.sample_count for i in client.list_identities("durable")}
            assert acked <= set(present), sorted(acked - set(present))[:5]
            # None half-written: every identity there (acknowledged or not) is complete.
            assert set(present.values()) == {SAMPLES_PER_IDENTITY}
            for name in sorted(acked)[::50]:
                ident = client.get_identity("durable", name, include_vectors=True)
                got = np.stack([s.vector for s in ident.samples])
                # Bit-for-bit up to the server's renormalisation of unit vectors.
                np.testing.assert_allclose(got, identity_vectors(int(name[1:])), atol=1e-6)
            # The index was rebuilt from SQLite at start.
            name = sorted(acked)[123]
            hit = client.search("durable", identity_vectors(int(name[1:]))[1:2], top_k=1)
            assert hit[0].matches[0].identity == name
            assert client.get_gallery("durable").sample_count == len(present) * 3
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_gallery_pinned_to_its_model(ir18_repository, tmp_path):
    repository, model = ir18_repository
    path = tmp_path / "galleries.sqlite3"
    first = ServerThread(server_settings(repository, model, gallery_path=path)).start()
    first.wait_serving()
    pinned = first.spec.checksum
    try:
        with grpc.insecure_channel(first.address) as channel:
            stub = gallery_pb2_grpc.GalleryStub(channel)
            stub.CreateGallery(gallery_pb2.CreateGalleryRequest(name="pinned"))
            stub.Enroll(
                gallery_pb2.EnrollRequest(gallery="pinned", identity="a", samples=[image_sample(1)])
            )
    finally:
        first.stop()

    other_repo = tmp_path / "repo_b"
    export_model(None, "ir_18", other_repo, "adaface_ir18_b", max_batch_size=16, seed=1)
    second = ServerThread(server_settings(other_repo, "adaface_ir18_b", gallery_path=path))
    second.start().wait_serving()
    served = second.spec.checksum
    assert served != pinned
    try:
        with grpc.insecure_channel(second.address) as channel:
            stub = gallery_pb2_grpc.GalleryStub(channel)
            for call, request in [
                (
                    stub.Enroll,
                    gallery_pb2.EnrollRequest(
                        gallery="pinned", identity="b", samples=[image_sample(2)]
                    ),
                ),
                (
                    stub.Search,
                    gallery_pb2.SearchRequest(gallery="pinned", probes=[image_sample(2)]),
                ),
                (
                    stub.Search,
                    gallery_pb2.SearchRequest(
                        gallery="pinned", probes=[vector_sample(unit_vectors(1, 3)[0])]
                    ),
                ),
            ]:
                err = rpc_error(call, request)
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert err.details() == (
                    f"gallery 'pinned' is pinned to model {pinned} (adaface_ir18), but this "
                    f"server serves model {served} (adaface_ir18_b); serve the gallery's "
                    "model or use a gallery built with this one"
                )
            # Vectors declared to come from the gallery's model are still searchable.
            ok = stub.Search(
                gallery_pb2.SearchRequest(
                    gallery="pinned",
                    probes=[vector_sample(unit_vectors(1, 3)[0])],
                    model_checksum=pinned,
                )
            )
            assert ok.results[0].matches[0].identity == "a"
    finally:
        second.stop()


def test_gallery_calls_while_the_model_loads(tmp_path):
    """No model yet: the store still opens; calls needing the model are UNAVAILABLE."""
    settings = server_settings(tmp_path / "empty_repo", "missing", gallery_path=tmp_path / "g.db")
    server = ServerThread(settings).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = gallery_pb2_grpc.GalleryStub(channel)
            deadline = time.monotonic() + 30
            while True:
                try:
                    stub.ListGalleries(gallery_pb2.ListGalleriesRequest(), timeout=5)
                    break
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            err = rpc_error(stub.CreateGallery, gallery_pb2.CreateGalleryRequest(name="g"))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert err.details().startswith("model 'missing' is not ready")
            checksum = "ab" * 32
            stub.CreateGallery(gallery_pb2.CreateGalleryRequest(name="g", model_checksum=checksum))
            vec = vector_sample(unit_vectors(1, 4)[0])
            err = rpc_error(
                stub.Enroll, gallery_pb2.EnrollRequest(gallery="g", identity="x", samples=[vec])
            )
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            r = stub.Enroll(
                gallery_pb2.EnrollRequest(
                    gallery="g", identity="x", samples=[vec], model_checksum=checksum
                )
            )
            assert r.sample_count == 1
    finally:
        server.stop()
