"""With tokens configured, a call without a valid token is refused from its metadata alone:
the server answers before any of the request body is read."""

from __future__ import annotations

import threading

import grpc
import pytest

from adaface.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc, gallery_pb2

from .server_harness import serving_with_tokens

USER = "user-token-0123456789abcdef"
ADMIN = "admin-token-fedcba9876543210"


@pytest.fixture(scope="module")
def secured(ir18_repository, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens")
    with serving_with_tokens(*ir18_repository, folder, f"{USER}\n", f"{ADMIN}\n") as server:
        yield server


def _body_never_sent(channel: grpc.Channel, method: str, serializer, metadata=()):
    """Opens `method` and sends its metadata but no body: the answer can only come from a
    check made before the body is read (otherwise the call waits for its deadline)."""
    release = threading.Event()

    def nothing():
        release.wait(30)
        return
        yield  # a generator that sends no message

    call = channel.stream_unary(method, request_serializer=serializer)
    try:
        with pytest.raises(grpc.RpcError) as err:
            call(nothing(), timeout=10, metadata=metadata)
    finally:
        release.set()
    return err.value


@pytest.mark.parametrize(
    "metadata, code",
    [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer wrong-token-000000000000"),), grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_a_call_without_a_valid_token_is_refused_before_its_body(secured, metadata, code):
    with grpc.insecure_channel(secured.address) as channel:
        err = _body_never_sent(
            channel,
            "/adaface.v1.Embedder/Embed",
            embedder_pb2.EmbedRequest.SerializeToString,
            metadata,
        )
    assert err.code() is code, err.details()


def test_a_gallery_write_with_a_user_token_is_refused_before_its_body(secured):
    with grpc.insecure_channel(secured.address) as channel:
        err = _body_never_sent(
            channel,
            "/adaface.v1.Gallery/CreateGallery",
            gallery_pb2.CreateGalleryRequest.SerializeToString,
            (("authorization", f"Bearer {USER}"),),
        )
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "admin token" in err.details()


def test_a_large_token_less_body_is_refused_and_the_server_stays_healthy(secured):
    big = embedder_pb2.EmbedRequest(
        images=[common_pb2.ImageInput(encoded=b"\0" * (8 << 20)) for _ in range(6)]
    )
    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(secured.address, options=options) as channel:
        embed = embedder_pb2_grpc.EmbedderStub(channel).Embed
        with pytest.raises(grpc.RpcError) as err:
            embed(big, timeout=60)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in err.value.details()
    assert secured.health() == 1  # SERVING
