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

from adaface.v1 import sampling_pb2, sampling_pb2_grpc

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
        repository, model, sampling_knn_block=64, sampling_max_builds=1, max_message_bytes=8 << 20
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
