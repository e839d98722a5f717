"""HTTP transcoding: JSON <-> protobuf with float-array vectors, text parameters, statuses."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from adaface.v1 import common_pb2, embedder_pb2, gallery_pb2
from adaface_server import errors
from adaface_server.api.web import transcode
from adaface_server.api.web.status import HTTP_STATUS, http_status


def test_every_service_error_has_an_http_status():
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    for cls in subclasses(errors.ServiceError):
        assert cls.status in HTTP_STATUS, cls
    assert http_status("NOT_FOUND") == 404
    assert http_status("FAILED_PRECONDITION") == 400
    assert http_status("no such status") == 500


def test_vectors_as_float_arrays_or_base64_reach_the_same_bytes():
    values = [0.25, -1.5, 3.0]
    packed = np.asarray(values, "<f4").tobytes()
    as_list = transcode.parse(
        gallery_pb2.SearchRequest, {"gallery": "g", "probes": [{"vector": values}]}
    )
    as_b64 = transcode.parse(
        gallery_pb2.SearchRequest,
        {"probes": [{"vector": {"vector": base64.b64encode(packed).decode(), "dim": 3}}]},
    )
    assert as_list.probes[0].vector.vector == packed == as_b64.probes[0].vector.vector
    verify = transcode.parse(gallery_pb2.VerifyRequest, {"a": {"vector": values}})
    assert verify.a.vector.vector == packed


def test_bad_vectors_and_fields_are_named():
    with pytest.raises(
        errors.InvalidArgument, match=r"^probes\[1\]\.vector\.vector: expected an array"
    ):
        transcode.parse(
            gallery_pb2.SearchRequest, {"probes": [{"vector": [1.0]}, {"vector": ["x"]}]}
        )
    with pytest.raises(errors.InvalidArgument, match="top_kk"):
        transcode.parse(gallery_pb2.SearchRequest, {"top_kk": 3})
    with pytest.raises(errors.InvalidArgument, match="alignment"):
        transcode.parse(embedder_pb2.EmbedRequest, {"images": [{"alignment": "SIDEWAYS"}]})


def test_text_parameters_follow_their_field_types():
    data: dict = {}
    descriptor = embedder_pb2.DetectRequest.DESCRIPTOR
    transcode.set_text(descriptor, data, "options.return_aligned", "true")
    transcode.set_text(descriptor, data, "options.min_score", "0.8")
    transcode.set_text(descriptor, data, "options.selection", "FACE_SELECTION_ALL")
    assert data == {
        "options": {"return_aligned": True, "min_score": 0.8, "selection": "FACE_SELECTION_ALL"}
    }
    request = transcode.parse(embedder_pb2.DetectRequest, data)
    assert request.options.selection == common_pb2.FACE_SELECTION_ALL
    with pytest.raises(errors.InvalidArgument, match=r"^options\.return_aligned: cannot read"):
        transcode.set_text(descriptor, {}, "options.return_aligned", "maybe")
    with pytest.raises(errors.InvalidArgument, match=r"^options\.nope: no such field"):
        transcode.set_text(descriptor, {}, "options.nope", "1")


def test_responses_give_float_vectors_and_numbers_for_64_bit_counts():
    vector = np.asarray([0.5, -0.25], "<f4")
    message = gallery_pb2.GalleryIdentity(identity="a", sample_count=1)
    stored = message.samples.add(sample_id=2**40)
    stored.vector.vector = vector.tobytes()
    stored.vector.dim = 2
    data = transcode.to_json(message)
    assert data["samples"][0]["sample_id"] == 2**40
    assert data["samples"][0]["vector"]["vector"] == [0.5, -0.25]
    packed = transcode.to_json(message, "base64")["samples"][0]["vector"]["vector"]
    assert base64.b64decode(packed) == vector.tobytes()
    with pytest.raises(errors.InvalidArgument, match="vector_format"):
        transcode.vector_format("hex")
