"""Server reflection answers under grpc.reflection.v1 and v1alpha alike."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

REQUEST = reflection_pb2.ServerReflectionRequest
RESPONSE = reflection_pb2.ServerReflectionResponse


def ask(address: str, version: str, requests: list) -> list:
    """One reflection stream on the `version` service (the messages are the same on both)."""
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=REQUEST.SerializeToString,
            response_deserializer=RESPONSE.FromString,
        )
        return list(call(iter(requests), timeout=30))


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_services_and_describes_them(embed_server, version):
    (listing,) = ask(embed_server.address, version, [REQUEST(list_services="")])
    names = {s.name for s in listing.list_services_response.service}
    assert {
        "adaface.v1.Embedder",
        "adaface.v1.Gallery",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    for symbol, package in (
        ("adaface.v1.Embedder", "adaface.v1"),
        ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1"),
    ):
        (answer,) = ask(embed_server.address, version, [REQUEST(file_containing_symbol=symbol)])
        assert not answer.HasField("error_response"), answer.error_response
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in answer.file_descriptor_response.file_descriptor_proto
        ]
        assert files[0].package == package
        assert symbol.rsplit(".", 1)[1] in {s.name for s in files[0].service}
