"""adaface_client.Client / AsyncClient against a real embedding server."""

from __future__ import annotations

import asyncio
import io
import socket
import subprocess
import sys
import textwrap

import grpc
import numpy as np
import pytest
from PIL import Image

import adaface_client.client as client_module
import adaface_client.retry as retry_module
from adaface.v1 import common_pb2
from adaface_client import (
    AsyncClient,
    Client,
    ImageErrors,
    InvalidArgument,
    Unavailable,
    fuse_features_with_norm,
)

# Batched and single forward passes may round differently in the last float32 bits.
ATOL = 1e-6


def crop(seed: int) -> np.ndarray:
    """A deterministic 112x112 RGB 'aligned face crop' with structure and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:112, 0:112]
    base = np.stack([(xx * 3 + seed * 11) % 256, (yy * 2 + seed) % 256, (xx + yy) % 256], -1)
    noise = rng.integers(-30, 30, (112, 112, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(embed_server):
    with Client(embed_server.address, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def mixed_images(client) -> list[object]:
    """More images than one request holds, in every input form."""
    n = client.info().max_images_per_request + 5
    images: list[object] = []
    for i in range(n):
        arr = crop(i)
        form = i % 4
        if form == 0:
            images.append(arr)
        elif form == 1:
            images.append(encode(arr))
        elif form == 2:
            images.append(Image.fromarray(arr))
        else:
            images.append(Image.fromarray(arr).convert("RGBA"))  # converted to RGB
    return images


@pytest.fixture(scope="module")
def singles(client, mixed_images) -> tuple[np.ndarray, np.ndarray]:
    rows = [client.embed([img], alignment="aligned") for img in mixed_images]
    return np.concatenate([e for e, _ in rows]), np.concatenate([n for _, n in rows])


def test_info(client, embed_server) -> None:
    info = client.info()
    assert info.model_name == embed_server.spec.name
    assert info.embedding_dim == 512 and info.max_batch_size == 16
    assert info.max_images_per_request >= 1
    assert "ALIGNMENT_ALIGNED" in info.alignments
    assert info.untrained


def test_chunked_embed_equals_single_requests_in_order(client, mixed_images, singles) -> None:
    chunks: list[int] = []
    emb, norms = client.embed(mixed_images, alignment="aligned")
    n = len(mixed_images)
    assert emb.shape == (n, 512) and emb.dtype == np.float32
    assert norms.shape == (n, 1) and norms.dtype == np.float32
    np.testing.assert_allclose(emb, singles[0], rtol=0, atol=ATOL)
    np.testing.assert_allclose(norms, singles[1], rtol=1e-6, atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Distinct inputs give distinct vectors, so equality above also pins the order.
    assert np.abs(emb[0] - emb[1]).max() > 1e-3

    results = client.embed_results(mixed_images, progress=chunks.append, alignment="aligned")
    assert [r.index for r in results] == list(range(n))
    assert sum(chunks) == n and len(chunks) >= 2  # really split into several requests
    np.testing.assert_allclose(np.stack([r.embedding for r in results]), emb, atol=ATOL)

    # A failure in a later request is reported with its index in the caller's input.
    bad = n - 2
    results = client.embed_results(
        [*mixed_images[:bad], b"junk", *mixed_images[bad:]], alignment="aligned"
    )
    assert [r.index for r in results if not r.ok] == [bad]
    if results[bad].message.startswith("images["):
        assert results[bad].message.startswith(f"images[{bad}]")
    np.testing.assert_allclose(results[-1].embedding, emb[-1], atol=ATOL)


def test_pil_and_array_of_same_pixels_agree(client) -> None:
    arr = crop(99)
    emb, _ = client.embed([arr, Image.fromarray(arr), encode(arr, "PNG")], alignment="aligned")
    np.testing.assert_allclose(emb[1], emb[0], atol=ATOL)
    np.testing.assert_allclose(emb[2], emb[0], atol=ATOL)


def test_image_errors_for_a_corrupt_image_among_good_ones(client, mixed_images, singles) -> None:
    images = [mixed_images[0], b"definitely not an image", mixed_images[1], b""]
    with pytest.raises(ImageErrors) as info:
        client.embed(images, alignment="aligned")
    err = info.value
    assert [(i, reason) for i, reason, _ in err.errors] == [(1, "UNDECODABLE"), (3, "UNDECODABLE")]
    assert all(msg for _, _, msg in err.errors)
    assert "2 of 4 images failed" in str(err)
    assert np.isnan(err.embeddings[1]).all() and np.isnan(err.norms[3]).all()
    np.testing.assert_allclose(err.embeddings[0], singles[0][0], atol=ATOL)
    np.testing.assert_allclose(err.embeddings[2], singles[0][1], atol=ATOL)

    results = client.embed_results(
        images, alignment="aligned"
    )  # never raises for per-image failures
    assert [r.ok for r in results] == [True, False, True, False]
    assert results[1].embedding is None and results[1].reason == "UNDECODABLE"


def test_request_where_every_image_failed_still_gives_per_image_reasons(client) -> None:
    images = [b"junk", crop(1)[:50], b"", encode(crop(2))]  # crop(1)[:50] is not 112x112
    results = client.embed_results(images[:3], alignment="aligned")
    assert [r.reason for r in results] == ["UNDECODABLE", "NOT_ALIGNED", "UNDECODABLE"]
    assert all(r.message and not r.ok for r in results)
    results = client.embed_results(
        images[2:], alignment="aligned"
    )  # one failed, one good: a normal reply
    assert [r.ok for r in results] == [False, True]


def test_async_client_gives_the_same_vectors(embed_server, mixed_images, singles) -> None:
    async def run() -> tuple[np.ndarray, np.ndarray, list]:
        async with AsyncClient(embed_server.address, timeout=60, max_in_flight=3) as client:
            info = await client.info()
            assert info.embedding_dim == 512
            emb, norms = await client.embed(mixed_images, alignment="aligned")
            results = await client.embed_results([b"junk", mixed_images[0]], alignment="aligned")
            return emb, norms, results

    emb, norms, results = asyncio.run(run())
    np.testing.assert_allclose(emb, singles[0], atol=ATOL)
    np.testing.assert_allclose(norms, singles[1], rtol=1e-6, atol=ATOL)
    assert results[0].reason == "UNDECODABLE" and results[1].ok


def test_async_client_image_errors(embed_server) -> None:
    async def run() -> None:
        async with AsyncClient(embed_server.address) as client:
            await client.embed([crop(0), b"junk"], alignment="aligned")

    with pytest.raises(ImageErrors) as info:
        asyncio.run(run())
    assert info.value.errors[0][:2] == (1, "UNDECODABLE")


def test_flip_fusion_equals_fusing_both_views(client) -> None:
    arr = crop(5)
    fused, fused_norm = client.embed([arr], flip=True, alignment="aligned")
    views, norms = client.embed([arr, np.ascontiguousarray(arr[:, ::-1])], alignment="aligned")
    ref, ref_norm = fuse_features_with_norm(views[:, None, :], norms[:, None, :])
    np.testing.assert_allclose(fused, ref, atol=1e-5)
    np.testing.assert_allclose(fused_norm, ref_norm, rtol=1e-5)
    plain, _ = client.embed([arr], alignment="aligned")
    assert np.abs(plain - fused).max() > 1e-4  # the option did something


def test_malformed_request_raises_invalid_argument(client) -> None:
    bad = common_pb2.ImageInput(
        encoded=encode(crop(0)), alignment=common_pb2.ALIGNMENT_LANDMARKS, landmarks=[1.0] * 6
    )
    with pytest.raises(InvalidArgument) as info:
        client.embed([crop(1), bad], alignment="aligned")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "images[1].landmarks" in info.value.details and "6" in info.value.details
    with pytest.raises(InvalidArgument):
        client.embed_results([bad], alignment="aligned")


def test_malformed_request_raises_invalid_argument_async(embed_server) -> None:
    bad = common_pb2.ImageInput(encoded=b"x", alignment=common_pb2.ALIGNMENT_ALIGNED)
    bad.landmarks.extend([1.0] * 10)  # landmarks must be empty for ALIGNED

    async def run() -> None:
        async with AsyncClient(embed_server.address) as client:
            await client.embed_results([bad], alignment="aligned")

    with pytest.raises(InvalidArgument) as info:
        asyncio.run(run())
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _count_backoffs(monkeypatch) -> list[int]:
    attempts: list[int] = []

    def delay(base: float, attempt: int) -> float:
        attempts.append(attempt)
        return 0.001

    monkeypatch.setattr(retry_module, "backoff_delay", delay)
    return attempts


def test_unavailable_after_retries(monkeypatch) -> None:
    attempts = _count_backoffs(monkeypatch)
    target = f"127.0.0.1:{_free_port()}"
    with Client(target, retries=3, timeout=5) as client, pytest.raises(Unavailable) as info:
        client.info()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert attempts == [0, 1, 2]

    attempts.clear()
    with Client(target, retries=2, timeout=5, max_in_flight=1) as client:
        # Skip Info so the Embed path's own retry loop is exercised.
        client._info = client_module.ServerInfo(
            "m", "ir_18", 512, 16, 2, 1 << 20, 1 << 20, "x", "", "", True, "", ()
        )
        with pytest.raises(Unavailable):
            client.embed([crop(0), crop(1), crop(2)], alignment="aligned")
    assert attempts == [0, 1]  # the first request, retried twice, ends the call


def test_unavailable_after_retries_async(monkeypatch) -> None:
    attempts = _count_backoffs(monkeypatch)

    async def run() -> None:
        async with AsyncClient(f"127.0.0.1:{_free_port()}", retries=2, timeout=5) as client:
            await client.embed([crop(0)], alignment="aligned")

    with pytest.raises(Unavailable):
        asyncio.run(run())
    assert attempts == [0, 1]


def test_full_embed_does_not_import_torch(embed_server) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from adaface_client import Client
        with Client({embed_server.address!r}) as client:
            crop = np.full((112, 112, 3), 128, np.uint8)
            emb, norms = client.embed([crop], flip=True, alignment="aligned")
        assert emb.shape == (1, 512), emb.shape
        assert "torch" not in sys.modules, "a plain embed call imported torch"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
