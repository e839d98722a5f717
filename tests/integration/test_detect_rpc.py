"""ALIGNMENT_DETECT and Detect through a real server, and the CLI on raw photos."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import skimage.data
from PIL import Image

from adaface.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc
from adaface_client import Client, DetectionOptions
from adaface_server.app import App
from adaface_server.errors import StartupError
from adaface_server.preprocess.align import align_face, norm_crop

from .server_harness import server_settings

REPO = Path(__file__).resolve().parents[2]


def encode(arr: np.ndarray, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


ASTRONAUT = skimage.data.astronaut()
CAT = skimage.data.chelsea()


def two_faces() -> np.ndarray:
    small = np.asarray(Image.fromarray(ASTRONAUT).resize((256, 256), Image.BILINEAR))
    right = np.zeros_like(ASTRONAUT)
    right[128:384, 128:384] = small
    return np.ascontiguousarray(np.concatenate([ASTRONAUT, right], axis=1))


def detect_input(data: bytes) -> common_pb2.ImageInput:
    return common_pb2.ImageInput(encoded=data, alignment=common_pb2.ALIGNMENT_DETECT)


@pytest.fixture(scope="module")
def stub(embed_server):
    with grpc.insecure_channel(embed_server.address) as channel:
        yield embedder_pb2_grpc.EmbedderStub(channel)


def test_embed_detects_and_a_faceless_photo_fails_alone(stub, caplog) -> None:
    request = embedder_pb2.EmbedRequest(
        images=[detect_input(encode(ASTRONAUT, "JPEG")), detect_input(encode(CAT))]
    )
    response = stub.Embed(request, timeout=60)
    face_result, cat_result = response.results
    assert face_result.HasField("embedding") and len(face_result.faces) == 1
    face = face_result.faces[0]
    assert len(face.box) == 4 and len(face.landmarks) == 10 and face.score > 0.9
    assert face.embedding.vector == face_result.embedding.vector
    assert not face.aligned_png
    assert cat_result.error.reason == common_pb2.ImageError.REASON_NO_FACE
    assert cat_result.error.message.startswith("images[1]: no face found in the 451x300 image")
    assert "Traceback" not in caplog.text

    # The detected landmarks, sent back with ALIGNMENT_LANDMARKS, give the same embedding.
    again = stub.Embed(
        embedder_pb2.EmbedRequest(
            images=[
                common_pb2.ImageInput(
                    encoded=encode(ASTRONAUT, "JPEG"),
                    alignment=common_pb2.ALIGNMENT_LANDMARKS,
                    landmarks=face.landmarks,
                )
            ]
        ),
        timeout=60,
    )
    ours = np.frombuffer(face.embedding.vector, "<f4")
    theirs = np.frombuffer(again.results[0].embedding.vector, "<f4")
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_only_faceless_photos_fail_the_embed_call_with_per_image_reasons(stub) -> None:
    blank = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(embedder_pb2.EmbedRequest(images=[detect_input(encode(blank))]), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no face found" in err.value.details()


def test_selection_all_best_largest(stub) -> None:
    data = encode(two_faces())

    def faces(selection: int) -> list:
        options = embedder_pb2.EmbedOptions(detection=common_pb2.DetectOptions(selection=selection))
        request = embedder_pb2.EmbedRequest(images=[detect_input(data)], options=options)
        return list(stub.Embed(request, timeout=60).results[0].faces)

    every = faces(common_pb2.FACE_SELECTION_ALL)
    assert len(every) == 2 and every[0].score >= every[1].score
    assert all(f.embedding.dim == 512 for f in every)
    assert every[0].embedding.vector != every[1].embedding.vector
    (best,) = faces(common_pb2.FACE_SELECTION_UNSPECIFIED)
    assert best.box == every[0].box
    (largest,) = faces(common_pb2.FACE_SELECTION_LARGEST)
    assert largest.box[0] < 512


def test_detect_rpc_returns_boxes_and_aligned_crops(stub) -> None:
    rotated = Image.fromarray(ASTRONAUT).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90 CCW: "rotate 90 CW to display upright"
    request = embedder_pb2.DetectRequest(
        images=[
            common_pb2.ImageInput(encoded=encode(ASTRONAUT)),
            common_pb2.ImageInput(encoded=encode(np.asarray(rotated), "JPEG", exif=exif)),
            common_pb2.ImageInput(encoded=encode(CAT)),
            common_pb2.ImageInput(encoded=b"not an image"),
        ],
        options=common_pb2.DetectOptions(return_aligned=True),
    )
    response = stub.Detect(request, timeout=60)
    plain, turned, cat, junk = response.results
    assert len(plain.faces) == 1 and not plain.HasField("error")
    crop = Image.open(io.BytesIO(plain.faces[0].aligned_png))
    assert crop.size == (112, 112) and crop.format == "PNG"
    assert not plain.faces[0].HasField("embedding")
    # EXIF orientation is honoured: the face is found upright, where it is in the original.
    assert len(turned.faces) == 1
    np.testing.assert_allclose(turned.faces[0].landmarks, plain.faces[0].landmarks, atol=4)
    assert cat.error.reason == common_pb2.ImageError.REASON_NO_FACE and not cat.faces
    assert junk.error.reason == common_pb2.ImageError.REASON_UNDECODABLE


def test_align_method_insightface_uses_norm_crop(stub) -> None:
    def crop_and_marks(method: int) -> tuple[np.ndarray, np.ndarray]:
        request = embedder_pb2.DetectRequest(
            images=[common_pb2.ImageInput(encoded=encode(ASTRONAUT))],
            options=common_pb2.DetectOptions(return_aligned=True, align_method=method),
        )
        (face,) = stub.Detect(request, timeout=60).results[0].faces
        crop = np.asarray(Image.open(io.BytesIO(face.aligned_png)).convert("RGB"))
        return crop, np.asarray(face.landmarks, np.float64).reshape(5, 2)

    default, marks = crop_and_marks(common_pb2.ALIGN_METHOD_UNSPECIFIED)
    adaface, _ = crop_and_marks(common_pb2.ALIGN_METHOD_ADAFACE)
    insight, insight_marks = crop_and_marks(common_pb2.ALIGN_METHOD_INSIGHTFACE)
    np.testing.assert_array_equal(default, adaface)
    np.testing.assert_array_equal(insight_marks, marks)  # same detection, other crop
    # The server's landmarks are float32 on the wire: crop from those, same as the server
    # (which crops from float64) up to the last grey level.
    assert np.abs(insight.astype(int) - norm_crop(ASTRONAUT, marks)).max() <= 1
    assert np.abs(adaface.astype(int) - align_face(ASTRONAUT, marks)).max() <= 1
    assert not np.array_equal(insight, adaface)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (common_pb2.DetectOptions(min_face_size=5), "options.min_face_size: must be 0"),
        (common_pb2.DetectOptions(min_score=1.5), "options.min_score: must be 0"),
        (common_pb2.DetectOptions(selection=9), "options.selection: unknown value 9"),
        (common_pb2.DetectOptions(align_method=7), "options.align_method: unknown value 7"),
    ],
)
def test_bad_detect_options_are_invalid_argument(stub, options, message) -> None:
    request = embedder_pb2.DetectRequest(
        images=[common_pb2.ImageInput(encoded=encode(CAT))], options=options
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.Detect(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_bad_embed_detection_option_names_the_field(stub) -> None:
    options = embedder_pb2.EmbedOptions(detection=common_pb2.DetectOptions(min_score=-1))
    request = embedder_pb2.EmbedRequest(images=[detect_input(encode(CAT))], options=options)
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "options.detection.min_score" in err.value.details()


def test_embed_stream_reports_bad_detection_options_as_error_rows(stub) -> None:
    bad = embedder_pb2.EmbedRequest(
        request_id="bad",
        images=[detect_input(encode(CAT))],
        options=embedder_pb2.EmbedOptions(detection=common_pb2.DetectOptions(min_face_size=1e9)),
    )
    good = embedder_pb2.EmbedRequest(
        request_id="good", images=[detect_input(encode(ASTRONAUT, "JPEG"))]
    )
    responses = {r.request_id: r for r in stub.EmbedStream(iter([bad, good]), timeout=60)}
    assert responses["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "options.detection.min_face_size" in responses["bad"].error.message
    assert len(responses["good"].results[0].faces) == 1


def test_client_detect_and_embed(embed_server) -> None:
    with Client(embed_server.address) as client:
        (found, none) = client.detect([ASTRONAUT, CAT])
        assert len(found.faces) == 1 and found.faces[0].landmarks.shape == (5, 2)
        assert none.reason == "NO_FACE"
        results = client.embed_results(
            [two_faces(), CAT], alignment="detect", detection=DetectionOptions(selection="all")
        )
        assert len(results[0].faces) == 2 and results[0].ok
        assert results[1].reason == "NO_FACE"


def test_cli_on_raw_photos_counts_faceless_images(embed_server, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "astronaut.jpg").write_bytes(encode(ASTRONAUT, "JPEG"))
    (photos / "two.png").write_bytes(encode(two_faces()))
    (photos / "cat.png").write_bytes(encode(CAT))
    out = tmp_path / "features.npz"
    args = ["--server", embed_server.address, "--out", str(out), "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "client/embed.py", str(photos), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "embedded 2 of 3 images" in proc.stderr and "1 had no face" in proc.stderr
    assert "cat.png: NO_FACE" in proc.stderr
    saved = np.load(out)
    assert list(saved["labels"]) == ["astronaut.jpg", "two.png"]


def test_missing_weights_stop_the_server_at_start_up(ir18_repository, tmp_path: Path) -> None:
    repository, name = ir18_repository
    with pytest.raises(StartupError, match=r"pnet\.pt is missing; fetch them with"):
        App(server_settings(repository, name, mtcnn_weights=tmp_path))


def test_a_detector_precision_the_device_lacks_stops_the_server_at_start_up(
    ir18_repository,
) -> None:
    repository, name = ir18_repository
    settings = server_settings(repository, name, detect_device="cpu", detect_precision="fp16")
    with pytest.raises(StartupError, match=r"--detect-precision fp16 needs a CUDA device"):
        App(settings)
