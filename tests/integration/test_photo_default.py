"""Photos are the default everywhere: every client, the gallery RPCs and the gallery CLI detect
the best face of an image sent without landmarks; crops say alignment="aligned"."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from adaface_client import (
    AsyncClient,
    Client,
    DetectionOptions,
    EnrollResult,
    GalleryClient,
    ImageErrors,
    InvalidArgument,
    Unimplemented,
)

from .gallery_support import REPO
from .server_harness import ServerThread, server_settings

ASTRONAUT = skimage.data.astronaut()  # 512x512 RGB, one face
CAT = skimage.data.chelsea()  # no face
ATOL = 1e-5
# Larger than the astronaut's face: detection that honours it finds nothing.
HUGE_FACE = DetectionOptions(min_face_size=2000)


def jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "astronaut.jpg"
    path.write_bytes(jpeg(ASTRONAUT))
    return path


@pytest.fixture(scope="module")
def server(ir18_repository, tmp_path_factory):
    repository, name = ir18_repository
    path = tmp_path_factory.mktemp("photo_gallery") / "galleries.sqlite3"
    server = ServerThread(server_settings(repository, name, gallery_path=path)).start()
    yield server.wait_serving()
    server.stop()


def test_client_embeds_a_photo_by_default(server, photo) -> None:
    with Client(server.address) as client:
        emb, norms = client.embed([photo])
        detected, _ = client.embed([photo], alignment="detect")
        (result,) = client.embed_results([photo])
        with pytest.raises(ImageErrors) as info:
            client.embed([photo], alignment="aligned")
    assert emb.shape == (1, 512) and norms.shape == (1, 1)
    np.testing.assert_allclose(emb, detected, atol=ATOL)
    assert result.ok and len(result.faces) == 1 and result.faces[0].score > 0.9
    # A photo sent as an aligned crop: the message says what to do instead.
    (index, reason, message) = info.value.errors[0]
    assert (index, reason) == (0, "NOT_ALIGNED")
    assert "got 512x512" in message
    assert "send alignment=detect (the default) for photos, or a 112x112 crop" in message


def test_async_client_embeds_photos_and_detects(server, photo) -> None:
    async def run():
        async with AsyncClient(server.address) as client:
            emb, _ = await client.embed([photo])
            found = await client.detect([photo, jpeg(CAT)])
            none = await client.embed_results([photo], detection=HUGE_FACE)
            return emb, found, none

    emb, found, none = asyncio.run(run())
    with Client(server.address) as client:
        ref, _ = client.embed([photo])
        ref_found = client.detect([photo, jpeg(CAT)])
    np.testing.assert_allclose(emb, ref, atol=ATOL)
    assert [len(r.faces) for r in found] == [1, 0] and found[1].reason == "NO_FACE"
    np.testing.assert_allclose(found[0].faces[0].box, ref_found[0].faces[0].box, atol=1e-3)
    assert none[0].reason == "NO_FACE"  # the detection options reached the server


def test_gallery_client_takes_photos_and_detection_options(server, photo) -> None:
    with Client(server.address) as client:
        ref, _ = client.embed([photo])
    with GalleryClient(server.address) as gallery:
        gallery.create_gallery("photos")
        r = gallery.enroll("photos", "astronaut", [photo, jpeg(CAT)])
        assert r.sample_ids[1] is None and [e[:2] for e in r.errors] == [(1, "NO_FACE")]
        stored = gallery.get_identity("photos", "astronaut", include_vectors=True)
        np.testing.assert_allclose(stored.samples[0].vector, ref[0], atol=ATOL)

        (hit,) = gallery.search("photos", [photo], top_k=1)
        assert hit.ok and hit.matches[0].identity == "astronaut"
        assert hit.matches[0].score > 0.9999
        (miss,) = gallery.search("photos", [photo], detection=HUGE_FACE)
        assert miss.reason == "NO_FACE"

        assert gallery.verify(photo, jpeg(ASTRONAUT)).match
        with pytest.raises(InvalidArgument, match=r"samples\[0\]: no face"):
            gallery.add_samples("photos", "astronaut", [photo], detection=HUGE_FACE)
        (streamed,) = gallery.enroll_many("photos", [("again", [photo])])
        assert isinstance(streamed, EnrollResult) and streamed.sample_count == 1


def run_gallery_cli(server, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "client/gallery.py", "--server", server.address, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_gallery_cli_detects_photos(server, photo, tmp_path) -> None:
    people = tmp_path / "people"
    (people / "astronaut").mkdir(parents=True)
    (people / "astronaut" / "1.jpg").write_bytes(photo.read_bytes())
    (people / "astronaut" / "cat.jpg").write_bytes(jpeg(CAT))
    r = run_gallery_cli(server, "create", "cli_photos")
    assert r.returncode == 0, r.stderr
    r = run_gallery_cli(server, "enroll", "cli_photos", people)
    assert r.returncode == 1, r.stderr
    assert "(1 of 2 images; 0 identities failed)" in r.stdout
    assert "cat.jpg: NO_FACE" in r.stderr
    r = run_gallery_cli(server, "search", "cli_photos", photo, "--top-k", "1")
    assert r.returncode == 0 and "astronaut 1.0000" in r.stdout, r.stdout + r.stderr
    r = run_gallery_cli(server, "search", "cli_photos", photo, "--min-face-size", "2000")
    assert r.returncode == 1 and "NO_FACE" in r.stderr
    r = run_gallery_cli(server, "search", "cli_photos", photo, "--aligned")
    assert r.returncode == 1 and "NOT_ALIGNED" in r.stderr and "alignment=detect" in r.stderr


@pytest.fixture(scope="module")
def no_detector(ir18_repository, tmp_path_factory):
    repository, name = ir18_repository
    path = tmp_path_factory.mktemp("no_detector") / "galleries.sqlite3"
    settings = server_settings(repository, name, gallery_path=path, detector="none")
    server = ServerThread(settings).start()
    yield server.wait_serving()
    server.stop()


def test_a_server_without_a_detector_says_to_send_aligned_crops(no_detector, photo) -> None:
    with Client(no_detector.address, retries=0) as client:
        with pytest.raises(Unimplemented) as info:
            client.embed([photo])
        crop = np.asarray(Image.fromarray(ASTRONAUT).resize((112, 112)))
        assert client.embed([crop], alignment="aligned")[0].shape == (1, 512)
    assert "ALIGNMENT_DETECT needs a face detector" in info.value.details
    assert 'alignment="aligned"' in info.value.details
    with GalleryClient(no_detector.address, retries=0) as gallery:
        gallery.create_gallery("g")
        with pytest.raises(Unimplemented, match='alignment="aligned"'):
            gallery.enroll("g", "astronaut", [photo])
