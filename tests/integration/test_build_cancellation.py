"""A BuildEpoch whose caller is gone stops computing: the kNN checks between tiles, the
build slot stays taken until it has stopped, and SIGTERM ends the process within the grace
period whatever is running."""

from __future__ import annotations

import logging
import signal
import threading
import time

import grpc
import numpy as np
import pytest

from adaface.v1 import common_pb2, gallery_pb2, gallery_pb2_grpc, sampling_pb2, sampling_pb2_grpc

from .gallery_support import free_port, start_server_process, wait_serving
from .server_harness import ServerThread, server_settings

OPTIONS = sampling_pb2.SamplingOptions(batch_size=32, num_instance=2)
STOPPED = "stopped, its caller is gone"


def long_build(n: int) -> list[sampling_pb2.BuildEpochRequest]:
    """n identities with 8-d prototypes: with 64-row tiles the kNN takes many seconds."""
    x = np.random.default_rng(3).standard_normal((n, 8)).astype("<f4")
    records = [sampling_pb2.IdentityRecord(sample_count=1, vector=v.tobytes()) for v in x]
    return [sampling_pb2.BuildEpochRequest(options=OPTIONS, identities=records)]


def test_a_build_stops_when_its_deadline_passes(ir18_repository, caplog):
    caplog.set_level(logging.INFO, logger="adaface_server.sampling.service")
    repository, model = ir18_repository
    settings = server_settings(
        repository,
        model,
        sampling_knn_method="tiles",  # 64-row tiles: slow on purpose (faiss would be quick)
        sampling_knn_block=64,
        sampling_max_builds=1,
        max_message_bytes=8 << 20,
    )
    server = ServerThread(settings).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = sampling_pb2_grpc.SamplingStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.BuildEpoch(iter(long_build(40_000)), timeout=3))
        assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 120
        while server.app.sampling._running and time.monotonic() < deadline:
            time.sleep(0.01)
        # The slot was given back only after the computation had stopped (and said so).
        assert server.app.sampling._running == 0
        messages = [r.getMessage() for r in caplog.records]
        assert any("kNN over 40000 identities started" in m for m in messages), messages
        assert any(STOPPED in m for m in messages), messages
    finally:
        server.stop()


def test_sigterm_ends_the_process_during_a_build(ir18_repository, tmp_path, monkeypatch):
    repository, model = ir18_repository
    monkeypatch.setenv("ADAFACE_GRACE_SECONDS", "1")
    monkeypatch.setenv("ADAFACE_SAMPLING_KNN_METHOD", "tiles")
    monkeypatch.setenv("ADAFACE_SAMPLING_KNN_BLOCK", "64")
    port = free_port()
    log = tmp_path / "server.log"
    proc = start_server_process(repository, model, tmp_path / "g.db", port, log)
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, proc, log)
        outcome: list[object] = []

        def build() -> None:
            with grpc.insecure_channel(address) as channel:
                stub = sampling_pb2_grpc.SamplingStub(channel)
                try:
                    list(stub.BuildEpoch(iter(long_build(80_000)), timeout=600))
                except grpc.RpcError as exc:
                    outcome.append(exc.code())

        caller = threading.Thread(target=build, daemon=True)
        caller.start()
        deadline = time.monotonic() + 120
        while "kNN over 80000 identities started" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        # 1 s of grace, plus start-up of the stop and one tile: far below the build's time.
        assert proc.wait(timeout=30) == 0, log.read_text()
        caller.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert STOPPED in text  # the computation was told to stop, not left running


def big_vector_gallery(identities: int, per_identity: int, dim: int) -> bytes:
    """A native export file of unit vectors (a gallery pinned to no real model)."""
    from adaface_server.gallery.transfer import TransferIdentity, export_stream

    rng = np.random.default_rng(11)
    people = []
    for i in range(identities):
        v = rng.standard_normal((per_identity, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        ids = list(range(i * per_identity, (i + 1) * per_identity))
        ones = np.ones(per_identity, np.float32)
        people.append(TransferIdentity(f"p{i}", {}, 0.0, v, ones, ids, [0.0] * per_identity))
    header = {"name": "big", "model_checksum": "ab" * 32, "model_name": "", "dim": dim}
    return b"".join(export_stream({**header, "metadata": {}}, people))


def test_a_search_stops_when_its_deadline_passes(ir18_repository, caplog):
    """1024 probes over 600k samples in 1 MiB chunks take seconds; a caller that gives up
    after 0.3 s stops the search between chunks (it says so) and the pool is free again."""
    caplog.set_level(logging.INFO, logger="adaface_server.gallery.service")
    repository, model = ir18_repository
    settings = server_settings(repository, model, gallery_search_chunk_mb=1)
    server = ServerThread(settings).start()
    dim = 8
    data = big_vector_gallery(120, 5000, dim)
    probes = np.random.default_rng(12).standard_normal((1024, dim)).astype("<f4")
    request = gallery_pb2.SearchRequest(
        gallery="big",
        top_k=5,
        model_checksum="ab" * 32,  # vector probes for a gallery of another model
        probes=[
            gallery_pb2.GallerySample(vector=common_pb2.Embedding(vector=p.tobytes(), dim=dim))
            for p in probes / np.linalg.norm(probes, axis=1, keepdims=True)
        ],
    )
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = gallery_pb2_grpc.GalleryStub(channel)
            header = gallery_pb2.ImportRequest(header=gallery_pb2.ImportHeader(format=1))
            chunks = [data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
            uploads = [header, *(gallery_pb2.ImportRequest(data=c) for c in chunks)]
            assert stub.Import(iter(uploads), timeout=300).sample_count == 600_000
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                stub.Search(request, timeout=0.3)
            assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            deadline = time.monotonic() + 60
            while not any("search stopped at row" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "the search was never told to stop"
                time.sleep(0.01)
            stopped_after = time.monotonic() - started
            # The same search, given the time, runs to the end: it was stopped, not short.
            started = time.monotonic()
            found = stub.Search(request, timeout=300)
            full = time.monotonic() - started
            assert len(found.results) == 1024 and all(len(r.matches) == 5 for r in found.results)
        print(f"search stopped after {stopped_after:.2f} s; a full one takes {full:.2f} s")
    finally:
        server.stop()
