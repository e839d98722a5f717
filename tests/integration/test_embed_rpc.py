"""Embedder RPCs on a real server, embedded and Triton backends: numerics against an
independent reference, streams, health."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from adaface.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc
from adaface_server.preprocess.align import ADAFACE_TEMPLATE_112, align_face

from .conftest import BACKENDS

# Every test here runs against the embedded backend and against a real Triton.
pytestmark = pytest.mark.parametrize("embed_server", BACKENDS, indirect=True)

ATOL = 1e-5


def crop(seed: int) -> np.ndarray:
    """A deterministic 112x112 RGB 'face crop' with structure and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:112, 0:112]
    base = np.stack([(xx * 2 + seed * 7) % 256, (yy * 2) % 256, (xx + yy) % 256], axis=-1)
    noise = rng.integers(-40, 40, (112, 112, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def reference(model_path, crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """AdaFace's own inference recipe (inference.to_input + model), independent of the server."""
    module = torch.jit.load(str(model_path))
    rows = []
    for arr in crops:
        bgr = ((arr[:, :, ::-1] / 255.0) - 0.5) / 0.5  # float64, as upstream
        rows.append(torch.tensor(bgr.transpose(2, 0, 1).copy()).float())
    with torch.inference_mode():
        out = [module(r[None]) for r in rows]  # one image at a time, as upstream
    emb = torch.cat([e for e, _ in out]).numpy()
    norm = torch.cat([n for _, n in out]).numpy()
    return emb, norm


def vectors(response: embedder_pb2.EmbedResponse) -> tuple[np.ndarray, np.ndarray]:
    emb = np.stack([np.frombuffer(r.embedding.vector, "<f4") for r in response.results])
    norms = np.array([[r.embedding.norm] for r in response.results], dtype=np.float32)
    return emb, norms


@pytest.fixture(scope="module")
def stub(embed_server):
    channel = grpc.insecure_channel(embed_server.address)
    yield embedder_pb2_grpc.EmbedderStub(channel)
    channel.close()


def aligned(arr: np.ndarray, raw: bool = False) -> common_pb2.ImageInput:
    if raw:
        h, w, _ = arr.shape
        return common_pb2.ImageInput(raw=common_pb2.RawImage(height=h, width=w, data=arr.tobytes()))
    return common_pb2.ImageInput(encoded=png(arr))


def test_info_describes_model_and_limits(stub, embed_server):
    info = stub.Info(embedder_pb2.InfoRequest())
    spec = embed_server.spec
    assert info.model_name == spec.name == "adaface_ir18"
    assert info.arch == "ir_18" and info.embedding_dim == 512
    assert info.max_batch_size == spec.max_batch_size == 16
    assert info.max_images_per_request == 32
    assert info.backend == embed_server.settings.backend
    assert info.model_checksum == spec.checksum and len(info.model_checksum) == 64
    assert info.untrained and "UNTRAINED" in info.weights
    # An AdaFace model: the server feeds it BGR (the exporter records it, Triton's config too).
    assert info.channel_order == "BGR"
    assert list(info.alignments) == [
        common_pb2.ALIGNMENT_ALIGNED,
        common_pb2.ALIGNMENT_LANDMARKS,
        common_pb2.ALIGNMENT_DETECT,
    ]


def test_embeddings_match_adaface_reference_inference(stub, embed_server):
    crops = [crop(s) for s in range(3)]
    response = stub.Embed(embedder_pb2.EmbedRequest(images=[aligned(c) for c in crops]))
    emb, norms = vectors(response)
    ref_emb, ref_norm = reference(embed_server.spec.model_path, crops)
    assert emb.shape == (3, 512)
    np.testing.assert_allclose(emb, ref_emb, atol=ATOL, rtol=0)
    np.testing.assert_allclose(norms, ref_norm, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert [r.index for r in response.results] == [0, 1, 2]
    assert response.model_name == "adaface_ir18" and len(response.request_id) == 32


def test_batch_of_n_equals_n_single_requests(stub):
    crops = [crop(10 + s) for s in range(9)]
    batch, batch_norms = vectors(
        stub.Embed(embedder_pb2.EmbedRequest(images=[aligned(c) for c in crops]))
    )
    singles = [vectors(stub.Embed(embedder_pb2.EmbedRequest(images=[aligned(c)]))) for c in crops]
    np.testing.assert_allclose(batch, np.concatenate([e for e, _ in singles]), atol=ATOL, rtol=0)
    np.testing.assert_allclose(batch_norms, np.concatenate([n for _, n in singles]), rtol=1e-5)


def test_raw_pixels_equal_png_bytes(stub):
    crops = [crop(20), crop(21)]
    from_png = vectors(stub.Embed(embedder_pb2.EmbedRequest(images=[aligned(c) for c in crops])))
    from_raw = vectors(
        stub.Embed(embedder_pb2.EmbedRequest(images=[aligned(c, raw=True) for c in crops]))
    )
    np.testing.assert_array_equal(from_png[0], from_raw[0])


def test_flip_fusion_equals_the_norm_weighted_formula(stub, embed_server):
    crops = [crop(30), crop(31)]
    request = embedder_pb2.EmbedRequest(
        images=[aligned(c) for c in crops], options=embedder_pb2.EmbedOptions(flip_fusion=True)
    )
    fused, fused_norm = vectors(stub.Embed(request))
    emb, norm = reference(embed_server.spec.model_path, crops)
    emb_f, norm_f = reference(embed_server.spec.model_path, [c[:, ::-1] for c in crops])
    total = emb.astype(np.float64) * norm + emb_f.astype(np.float64) * norm_f
    expected_norm = np.linalg.norm(total, axis=1, keepdims=True)
    np.testing.assert_allclose(fused, total / expected_norm, atol=ATOL, rtol=0)
    np.testing.assert_allclose(fused_norm, expected_norm, rtol=1e-5)
    plain, _ = vectors(stub.Embed(embedder_pb2.EmbedRequest(images=[aligned(c) for c in crops])))
    assert np.abs(plain - fused).max() > 1e-3  # fusion really changed something


def test_landmarks_mode_embeds_the_adaface_aligned_crop(stub):
    rng = np.random.default_rng(5)
    photo = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
    # A face at 2x scale, rotated slightly, placed inside the photo.
    angle = np.deg2rad(12)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = (ADAFACE_TEMPLATE_112 - 56) @ rot.T * 2 + [130, 150]
    expected_crop = align_face(photo, points)
    image = common_pb2.ImageInput(encoded=png(photo), landmarks=points.ravel().tolist())
    via_landmarks = vectors(stub.Embed(embedder_pb2.EmbedRequest(images=[image])))
    via_crop = vectors(stub.Embed(embedder_pb2.EmbedRequest(images=[aligned(expected_crop)])))
    np.testing.assert_array_equal(via_landmarks[0], via_crop[0])


def test_embed_stream_answers_every_request_by_id(stub):
    crops = [crop(40 + s) for s in range(6)]
    requests = [
        embedder_pb2.EmbedRequest(
            request_id=f"r{i}", images=[aligned(crops[i]), aligned(crops[i + 1])]
        )
        for i in range(0, 6, 2)
    ]
    requests.insert(1, embedder_pb2.EmbedRequest(request_id="empty"))
    responses = {r.request_id: r for r in stub.EmbedStream(iter(requests))}
    assert set(responses) == {"r0", "r2", "r4", "empty"}
    assert responses["empty"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "images: at least one image" in responses["empty"].error.message
    unary = vectors(stub.Embed(embedder_pb2.EmbedRequest(images=[aligned(c) for c in crops])))
    streamed = np.concatenate([vectors(responses[f"r{i}"])[0] for i in (0, 2, 4)])
    np.testing.assert_allclose(streamed, unary[0], atol=ATOL, rtol=0)


def test_concurrent_requests_all_get_their_own_results(stub):
    crops = [crop(60 + s) for s in range(12)]
    futures = [stub.Embed.future(embedder_pb2.EmbedRequest(images=[aligned(c)])) for c in crops]
    got = np.concatenate([vectors(f.result())[0] for f in futures])
    batch = vectors(stub.Embed(embedder_pb2.EmbedRequest(images=[aligned(c) for c in crops])))
    np.testing.assert_allclose(got, batch[0], atol=ATOL, rtol=0)


def test_health_is_serving_and_reflection_lists_services(embed_server):
    assert embed_server.health() == health_pb2.HealthCheckResponse.SERVING
    assert embed_server.health("adaface.v1.Embedder") == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(embed_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"adaface.v1.Embedder", "grpc.health.v1.Health"} <= names
