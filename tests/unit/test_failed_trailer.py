"""The every-image-failed trailer stays within its byte budget and keeps each image's index,
reason and the start of its message."""

from __future__ import annotations

from adaface.v1 import common_pb2, embedder_pb2
from adaface_server.api.embedder import MAX_FAILED_RESPONSE_BYTES, fitted_failures


def failed(n: int, message: str) -> embedder_pb2.EmbedResponse:
    response = embedder_pb2.EmbedResponse(request_id="r" * 32, model_name="adaface_ir50")
    for i in range(n):
        response.results.add(
            index=i,
            error=common_pb2.ImageError(
                reason=common_pb2.ImageError.REASON_UNDECODABLE, message=f"images[{i}]: {message}"
            ),
        )
    return response


def test_a_small_response_is_sent_whole() -> None:
    response = failed(2, "not a decodable image")
    assert fitted_failures(response) == response.SerializeToString()


def test_64_long_messages_are_cut_to_fit_and_keep_their_start() -> None:
    for message in ("x" * 500, "名前😀" * 200):  # multi-byte text is cut on a character
        response = failed(64, message)
        data = fitted_failures(response)
        assert len(data) <= MAX_FAILED_RESPONSE_BYTES < response.ByteSize()
        got = embedder_pb2.EmbedResponse.FromString(data)
        assert got.request_id == response.request_id and len(got.results) == 64
        for i, result in enumerate(got.results):
            assert result.index == i
            assert result.error.reason == common_pb2.ImageError.REASON_UNDECODABLE
            assert result.error.message.startswith(f"images[{i}]: ")
            assert result.error.message.endswith("...")
