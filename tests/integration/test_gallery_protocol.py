"""Protocol details a foreign client relies on: scores within [-1, 1], identity ids free of
control and bidirectional formatting characters."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from adaface.v1 import common_pb2, gallery_pb2, gallery_pb2_grpc

from .gallery_support import vector_sample
from .server_harness import ServerThread, server_settings

N = 40  # about a third of random unit float32 vectors score above 1.0 against themselves


@pytest.fixture(scope="module")
def gallery(ir18_repository):
    repository, model = ir18_repository
    server = ServerThread(server_settings(repository, model)).start()
    server.wait_serving()
    channel = grpc.insecure_channel(server.address)
    stub = gallery_pb2_grpc.GalleryStub(channel)
    stub.CreateGallery(gallery_pb2.CreateGalleryRequest(name="protocol"), timeout=60)
    yield stub
    channel.close()
    server.stop()


def vectors() -> np.ndarray:
    v = np.random.default_rng(7).standard_normal((N, 512))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_scores_stay_within_minus_one_and_one(gallery):
    vs = vectors()
    for i, v in enumerate(vs):
        gallery.Enroll(
            gallery_pb2.EnrollRequest(
                gallery="protocol", identity=f"p{i}", samples=[vector_sample(v)]
            ),
            timeout=60,
        )
    found = gallery.Search(
        gallery_pb2.SearchRequest(
            gallery="protocol", probes=[vector_sample(v) for v in vs], top_k=1
        ),
        timeout=60,
    )
    scores = [r.matches[0].score for r in found.results]
    assert len(scores) == N
    assert all(0.999 <= s <= 1.0 for s in scores), max(scores)
    for i, v in enumerate(vs[:10]):
        verdict = gallery.Verify(
            gallery_pb2.VerifyRequest(
                gallery="protocol",
                a=gallery_pb2.VerifyOperand(identity=f"p{i}"),
                b=gallery_pb2.VerifyOperand(
                    vector=common_pb2.Embedding(vector=v.astype("<f4").tobytes(), dim=512)
                ),
            ),
            timeout=60,
        )
        assert 0.999 <= verdict.score <= 1.0


@pytest.mark.parametrize(
    "identity, code_point",
    [("a\x00b", 0), ("line\nbreak", 10), ("evil\u202egnp.exe", 0x202E), ("x\x7f", 0x7F),
     ("\u2066isolated", 0x2066), ("c1\x85", 0x85)],
)  # fmt: skip
def test_identity_ids_refuse_control_and_bidi_characters(gallery, identity, code_point):
    sample = vector_sample(vectors()[0])
    with pytest.raises(grpc.RpcError) as err:
        gallery.Enroll(
            gallery_pb2.EnrollRequest(gallery="protocol", identity=identity, samples=[sample]),
            timeout=60,
        )
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("identity: character ")
    assert f"U+{code_point:04X}" in err.value.details()


def test_ordinary_unicode_ids_are_still_accepted(gallery):
    sample = vector_sample(vectors()[1])
    for identity in ("Zoë Ångström", "李小龙", "مرحبا", "tab-free name with spaces"):
        gallery.Enroll(
            gallery_pb2.EnrollRequest(gallery="protocol", identity=identity, samples=[sample]),
            timeout=60,
        )
