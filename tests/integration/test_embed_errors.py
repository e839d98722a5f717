"""The error table on a real server: status code and message for every failure mode."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from adaface.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc

from ..unit.test_decode import png_bomb
from .server_harness import ServerThread, server_settings

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


GOOD = common_pb2.ImageInput(encoded=png(np.full((112, 112, 3), 90, np.uint8)))
CORRUPT = common_pb2.ImageInput(encoded=b"\xff\xd8\xff\xe0 definitely not a jpeg")


def call_error(stub, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(request, timeout=30)
    return err.value


@pytest.fixture(scope="module")
def tight_server(ir18_repository):
    repository, name = ir18_repository
    settings = server_settings(
        repository,
        name,
        max_images_per_request=8,
        max_queue=4,
        max_image_bytes=60_000,
        max_image_pixels=300 * 300,
        detector="none",
    )
    server = ServerThread(settings).start().wait_serving()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(tight_server):
    with grpc.insecure_channel(tight_server.address) as channel:
        yield embedder_pb2_grpc.EmbedderStub(channel)


def landmarks_image(values: list[float]) -> common_pb2.ImageInput:
    return common_pb2.ImageInput(encoded=GOOD.encoded, landmarks=values)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([], "images: at least one image is required"),
        ([GOOD] * 9, "images: at most 8 per request (max_images_per_request), got 9"),
        ([GOOD] * 3 + [landmarks_image([1.0] * 6)], "images[3].landmarks: need 10 values, got 6"),
        (
            [landmarks_image([1.0] * 9 + [float("nan")])],
            "images[0].landmarks: values must be finite",
        ),
        (
            [common_pb2.ImageInput(encoded=GOOD.encoded, alignment=7)],
            "images[0].alignment: unknown value 7",
        ),
        (
            [
                GOOD,
                common_pb2.ImageInput(
                    encoded=GOOD.encoded,
                    alignment=common_pb2.ALIGNMENT_ALIGNED,
                    landmarks=[1.0] * 10,
                ),
            ],
            "images[1].landmarks: must be empty for ALIGNMENT_ALIGNED, got 10 values",
        ),
        ([GOOD, common_pb2.ImageInput()], "images[1]: set either encoded or raw"),
        (
            [common_pb2.ImageInput(raw=common_pb2.RawImage(height=10, width=10, data=b"x" * 299))],
            "images[0].raw.data: need 10*10*3 = 300 bytes of RGB, got 299",
        ),
        (
            [common_pb2.ImageInput(raw=common_pb2.RawImage(height=0, width=10))],
            "images[0].raw.height: must be 1..65535, got 0",
        ),
    ],
)
def test_malformed_requests_are_invalid_argument_naming_the_field(stub, images, message):
    err = call_error(stub, embedder_pb2.EmbedRequest(images=images))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details()


def test_overlong_request_id_is_invalid_argument(stub):
    err = call_error(stub, embedder_pb2.EmbedRequest(request_id="x" * 129, images=[GOOD]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "request_id: at most 128 characters, got 129"


def test_detect_mode_is_unimplemented_without_a_detector(stub):
    image = common_pb2.ImageInput(encoded=GOOD.encoded, alignment=common_pb2.ALIGNMENT_DETECT)
    err = call_error(stub, embedder_pb2.EmbedRequest(images=[GOOD, image]))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "images[1].alignment: ALIGNMENT_DETECT needs a face detector" in err.details()


def test_bad_images_fail_alone_and_the_rest_of_the_batch_succeeds(stub):
    big = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    images = [
        GOOD,
        CORRUPT,
        common_pb2.ImageInput(encoded=png(big)),  # ~120 kB > 60 kB limit
        common_pb2.ImageInput(encoded=png_bomb(40_000, 40_000)),
        common_pb2.ImageInput(encoded=png(np.zeros((100, 120, 3), np.uint8))),  # not 112x112
        common_pb2.ImageInput(encoded=GOOD.encoded, landmarks=[5.0] * 10),  # all points equal
        GOOD,
    ]
    response = stub.Embed(embedder_pb2.EmbedRequest(images=images), timeout=30)
    results = response.results
    assert [r.HasField("embedding") for r in results] == [
        True,
        False,
        False,
        False,
        False,
        False,
        True,
    ]
    reasons = [common_pb2.ImageError.Reason.Name(r.error.reason) for r in results[1:6]]
    assert reasons == [
        "REASON_UNDECODABLE",
        "REASON_TOO_MANY_BYTES",
        "REASON_TOO_MANY_PIXELS",
        "REASON_NOT_ALIGNED",
        "REASON_ALIGNMENT_FAILED",
    ]
    assert results[1].error.message.startswith("images[1]: not a decodable")
    assert (
        f"images[2]: image is {len(images[2].encoded)} bytes, the limit is 60000 "
        "(max_image_bytes)" in results[2].error.message
    )
    assert (
        "images[3]: image is 40000x40000 = 1600000000 pixels, the limit is 90000 "
        "(max_image_pixels)" in results[3].error.message
    )
    assert (
        "images[4]: an aligned face crop must be 112x112, got 120x100" in results[4].error.message
    )
    assert results[5].error.message.startswith("images[5]: ")
    np.testing.assert_array_equal(results[0].embedding.vector, results[6].embedding.vector)


def test_request_where_every_image_fails_is_invalid_argument(stub):
    err = call_error(stub, embedder_pb2.EmbedRequest(images=[CORRUPT, CORRUPT]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("every image failed: images[0]: not a decodable")
    assert "images[1]: not a decodable" in err.details()


def test_more_images_than_the_queue_holds_is_resource_exhausted(stub, tight_server):
    err = call_error(stub, embedder_pb2.EmbedRequest(images=[GOOD] * 5))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "exceed the queue limit of 4 (max_queue)" in err.details()
    # The server is still healthy and serving afterwards.
    assert len(stub.Embed(embedder_pb2.EmbedRequest(images=[GOOD] * 2)).results) == 2
    assert tight_server.health() == SERVING


def test_overload_under_concurrency_is_refused_not_queued(stub):
    """Many concurrent 4-image requests against a 4-image queue: some are refused at once
    with RESOURCE_EXHAUSTED, none time out, and all accepted ones succeed."""
    futures = [
        stub.Embed.future(embedder_pb2.EmbedRequest(images=[GOOD] * 4), timeout=60)
        for _ in range(12)
    ]
    codes = []
    for f in futures:
        try:
            f.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            codes.append(err.code())
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert grpc.StatusCode.OK in codes


def test_model_missing_then_exported_goes_from_unavailable_to_serving(ir18_repository, tmp_path):
    source_repo, name = ir18_repository
    server = ServerThread(server_settings(tmp_path, "late_model")).start()
    try:
        time.sleep(0.3)
        assert server.health() == NOT_SERVING
        with grpc.insecure_channel(server.address) as channel:
            stub = embedder_pb2_grpc.EmbedderStub(channel)
            err = call_error(stub, embedder_pb2.EmbedRequest(images=[GOOD]))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert "model 'late_model' is not ready" in err.details()
            with pytest.raises(grpc.RpcError) as info_err:
                stub.Info(embedder_pb2.InfoRequest())
            assert info_err.value.code() == grpc.StatusCode.UNAVAILABLE
            # The model repository gets populated after start-up (e.g. by an init container).
            target = tmp_path / "late_model"
            shutil.copytree(source_repo / name, target)
            config = (target / "config.pbtxt").read_text().replace(name, "late_model")
            (target / "config.pbtxt").write_text(config)
            server.wait_serving(timeout=60)
            assert len(stub.Embed(embedder_pb2.EmbedRequest(images=[GOOD])).results) == 1
    finally:
        server.stop()


class FailsOnBrightInput(torch.nn.Module):
    """A model that fails at run time for some inputs (as a corrupt GPU or bad op would)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if bool((x > 0.9).any()):
            raise RuntimeError("kernel failure")
        return torch.nn.functional.normalize(torch.ones(x.shape[0], 512), dim=1), torch.ones(
            x.shape[0], 1
        )


def test_model_failure_is_internal_and_the_server_stays_healthy(ir18_repository, tmp_path):
    source_repo, name = ir18_repository
    shutil.copytree(source_repo / name, tmp_path / name)
    version_dir = tmp_path / name / "1"
    torch.jit.script(FailsOnBrightInput()).save(str(version_dir / "model.pt"))
    meta = json.loads((version_dir / "metadata.json").read_text())
    (version_dir / "metadata.json").write_text(json.dumps(meta))
    server = ServerThread(server_settings(tmp_path, name)).start().wait_serving()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = embedder_pb2_grpc.EmbedderStub(channel)
            white = common_pb2.ImageInput(encoded=png(np.full((112, 112, 3), 255, np.uint8)))
            err = call_error(stub, embedder_pb2.EmbedRequest(images=[GOOD, white]))
            assert err.code() == grpc.StatusCode.INTERNAL
            assert err.details() == "internal error"  # the traceback stays in the log
            assert len(stub.Embed(embedder_pb2.EmbedRequest(images=[GOOD])).results) == 1
            assert server.health() == SERVING
    finally:
        server.stop()


def test_graceful_stop_finishes_in_flight_requests(ir18_repository):
    repository, name = ir18_repository
    server = ServerThread(server_settings(repository, name)).start().wait_serving()
    channel = grpc.insecure_channel(server.address)
    stub = embedder_pb2_grpc.EmbedderStub(channel)
    future = stub.Embed.future(embedder_pb2.EmbedRequest(images=[GOOD] * 32), timeout=60)
    time.sleep(0.05)
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 30.0})
    stopper.start()
    response = future.result()
    stopper.join(60)
    channel.close()
    assert len(response.results) == 32 and all(r.HasField("embedding") for r in response.results)


def test_a_draining_server_refuses_new_calls_at_once_and_serves_open_streams(ir18_repository):
    """While a stop drains: an open stream is still served, a new call is refused at once
    (UNAVAILABLE naming the shutdown, not left waiting), health says NOT_SERVING, and an open
    Health.Watch stream does not keep the server for the rest of its grace."""
    repository, name = ir18_repository
    server = ServerThread(server_settings(repository, name)).start().wait_serving()
    channel = grpc.insecure_channel(server.address)
    stub = embedder_pb2_grpc.EmbedderStub(channel)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120)
    assert next(watch).status == SERVING
    release = threading.Event()

    def requests():
        yield embedder_pb2.EmbedRequest(images=[GOOD])
        release.wait(60)
        yield embedder_pb2.EmbedRequest(images=[GOOD, GOOD])

    stream = stub.EmbedStream(requests(), timeout=120)
    assert len(next(stream).results) == 1
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 120.0})
    try:
        stopper.start()
        assert next(watch).status == NOT_SERVING
        err = call_error(stub, embedder_pb2.EmbedRequest(images=[GOOD]))
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        assert "shutting down" in err.details(), err.details()
        assert server.health() == NOT_SERVING
        assert stopper.is_alive()  # the open stream keeps the server draining
    finally:
        release.set()
    last = next(stream)
    assert len(last.results) == 2 and all(r.HasField("embedding") for r in last.results)
    assert list(stream) == []  # the stream ends OK
    # Once the stream has ended the stop completes, far inside its 120 s of grace, though
    # the health watch is still open.
    stopper.join(60)
    assert not stopper.is_alive()
    with pytest.raises(grpc.RpcError):
        next(watch)
    channel.close()


def test_every_one_of_64_failed_images_comes_back_within_the_trailer_limit(ir18_repository):
    """All 64 images fail with long messages: the per-image results still fit in trailing
    metadata (gRPC clients refuse more than 8 KiB of it by default), so the answer is
    INVALID_ARGUMENT with every image's reason, not RESOURCE_EXHAUSTED."""
    repository, name = ir18_repository
    settings = server_settings(repository, name, max_images_per_request=64)
    server = ServerThread(settings).start().wait_serving()
    wide = png(np.full((113, 2000, 3), 7, np.uint8))
    images = [common_pb2.ImageInput(encoded=wide, alignment=common_pb2.ALIGNMENT_ALIGNED)] * 64
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = embedder_pb2_grpc.EmbedderStub(channel)
            err = call_error(stub, embedder_pb2.EmbedRequest(images=images))
    finally:
        server.stop()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    response = embedder_pb2.EmbedResponse.FromString(
        dict(err.trailing_metadata())["adaface-embed-response-bin"]
    )
    assert len(response.results) == 64
    for i, result in enumerate(response.results):
        assert result.error.reason == common_pb2.ImageError.REASON_NOT_ALIGNED, (i, result)
        assert result.error.message.startswith(f"images[{i}]"), result.error.message
