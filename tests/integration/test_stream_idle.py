"""Request streams that go quiet are ended (stream_idle_seconds), and a BuildEpoch holds a
build slot only once its inputs are complete."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from adaface.v1 import (
    embedder_pb2,
    gallery_pb2,
    sampling_pb2,
    sampling_pb2_grpc,
)

from .server_harness import ServerThread, server_settings

IDLE = 3.0


@pytest.fixture(scope="module")
def server(ir18_repository):
    repository, model = ir18_repository
    settings = server_settings(repository, model, stream_idle_seconds=IDLE, sampling_max_builds=1)
    server = ServerThread(settings).start()
    server.wait_serving()
    yield server
    server.stop()


STREAMS = {
    "/adaface.v1.Embedder/EmbedStream": (embedder_pb2.EmbedRequest, True),
    "/adaface.v1.Gallery/EnrollStream": (gallery_pb2.EnrollRequest, True),
    "/adaface.v1.Gallery/Import": (gallery_pb2.ImportRequest, False),
    "/adaface.v1.Sampling/BuildEpoch": (sampling_pb2.BuildEpochRequest, True),
}


@pytest.mark.parametrize("method", sorted(STREAMS))
def test_a_stream_that_sends_nothing_is_ended_naming_the_setting(server, method):
    message, responses_stream = STREAMS[method]
    release = threading.Event()

    def nothing():
        release.wait(60)
        return
        yield

    with grpc.insecure_channel(server.address) as channel:
        kind = channel.stream_stream if responses_stream else channel.stream_unary
        call = kind(method, request_serializer=message.SerializeToString)
        try:
            with pytest.raises(grpc.RpcError) as err:
                answer = call(nothing(), timeout=60)
                if responses_stream:
                    list(answer)
        finally:
            release.set()
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "(stream_idle_seconds)" in err.value.details()
    assert f"nothing arrived for {IDLE:g} s" in err.value.details()


def vectors(n: int) -> list[sampling_pb2.IdentityRecord]:
    x = np.random.default_rng(1).standard_normal((n, 8)).astype("<f4")
    return [sampling_pb2.IdentityRecord(sample_count=2, vector=v.tobytes()) for v in x]


def test_an_unfinished_build_holds_no_slot(server):
    """One build slot; a stream that sent its options and keeps sending empty messages (so
    it is not idle) has no complete input yet, and must not keep another build out."""
    release = threading.Event()
    options = sampling_pb2.SamplingOptions(batch_size=8, num_instance=2)

    def unfinished():
        yield sampling_pb2.BuildEpochRequest(options=options)
        while not release.wait(0.2):
            yield sampling_pb2.BuildEpochRequest()

    with grpc.insecure_channel(server.address) as channel:
        stub = sampling_pb2_grpc.SamplingStub(channel)
        held = stub.BuildEpoch(unfinished(), timeout=120)
        try:
            deadline = time.monotonic() + 60
            while server.app.calls.in_flight < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.app.calls.in_flight >= 1  # the unfinished stream is being served
            complete = [sampling_pb2.BuildEpochRequest(options=options, identities=vectors(12))]
            replies = list(stub.BuildEpoch(iter(complete), timeout=60))
            assert replies[0].WhichOneof("part") == "header"
            assert replies[0].header.num_samples == 24
        finally:
            release.set()
        with pytest.raises(grpc.RpcError) as err:
            list(held)  # half-closed with no identities at all
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
