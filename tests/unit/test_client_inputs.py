"""Client input conversion: paths, bytes, PIL, arrays and landmarks -> ImageInput fields."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from adaface.v1 import common_pb2, embedder_pb2
from adaface_client import (
    AdafaceError,
    AlreadyExists,
    Client,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
    make_image_input,
)
from adaface_client.client import _jobs, _prepared

LANDMARKS = [38.3, 51.7, 73.5, 51.5, 56.0, 71.7, 41.5, 92.4, 70.7, 92.2]


def _rgb(h: int = 4, w: int = 5) -> np.ndarray:
    return np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rgb(112, 112)).save(buf, "JPEG")
    return buf.getvalue()


def test_path_is_read_and_sent_as_is(tmp_path: Path) -> None:
    data = _jpeg()
    path = tmp_path / "face.jpg"
    path.write_bytes(data)
    for source in (path, str(path)):
        msg = make_image_input(source)
        assert msg.WhichOneof("source") == "encoded"
        assert msg.encoded == data
        assert msg.alignment == common_pb2.ALIGNMENT_DETECT  # a photo unless told otherwise
        assert list(msg.landmarks) == []


def test_missing_path_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        make_image_input(tmp_path / "nope.jpg")


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_bytes_are_sent_as_encoded(kind: type) -> None:
    data = _jpeg()
    msg = make_image_input(kind(data))
    assert msg.WhichOneof("source") == "encoded" and msg.encoded == data


def test_empty_bytes_still_set_the_source() -> None:
    # The server reports an empty file as a per-image UNDECODABLE error.
    msg = make_image_input(b"")
    assert msg.WhichOneof("source") == "encoded"
    assert common_pb2.ImageInput.FromString(msg.SerializeToString()).WhichOneof("source")


def test_ndarray_becomes_exact_raw_pixels() -> None:
    arr = _rgb(4, 5)
    msg = make_image_input(arr)
    assert msg.WhichOneof("source") == "raw"
    assert (msg.raw.height, msg.raw.width) == (4, 5)
    assert msg.raw.data == arr.tobytes()


def test_non_contiguous_ndarray_is_made_contiguous() -> None:
    arr = _rgb(6, 8)[::2, ::-1]
    msg = make_image_input(arr)
    assert (msg.raw.height, msg.raw.width) == (3, 8)
    np.testing.assert_array_equal(np.frombuffer(msg.raw.data, np.uint8).reshape(3, 8, 3), arr)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_pil_image_is_converted_to_rgb_pixels(mode: str) -> None:
    img = Image.fromarray(_rgb(7, 9)).convert(mode)
    msg = make_image_input(img)
    assert msg.WhichOneof("source") == "raw"
    assert (msg.raw.height, msg.raw.width) == (7, 9)
    expected = np.asarray(img.convert("RGB"))
    assert msg.raw.data == expected.tobytes()


@pytest.mark.parametrize(
    "landmarks", [LANDMARKS, tuple(LANDMARKS), np.array(LANDMARKS).reshape(5, 2)]
)
def test_landmarks_select_landmark_alignment(landmarks: object) -> None:
    msg = make_image_input(_jpeg(), landmarks=landmarks)
    assert msg.alignment == common_pb2.ALIGNMENT_LANDMARKS
    np.testing.assert_allclose(list(msg.landmarks), LANDMARKS, rtol=1e-6)


@pytest.mark.parametrize(
    ("alignment", "expected"),
    [
        ("aligned", common_pb2.ALIGNMENT_ALIGNED),
        ("ALIGNMENT_DETECT", common_pb2.ALIGNMENT_DETECT),
        ("unspecified", common_pb2.ALIGNMENT_UNSPECIFIED),
        (common_pb2.ALIGNMENT_DETECT, common_pb2.ALIGNMENT_DETECT),
    ],
)
def test_explicit_alignment(alignment: object, expected: int) -> None:
    assert make_image_input(b"x", alignment=alignment).alignment == expected


@pytest.mark.parametrize(
    ("landmarks", "error", "match"),
    [
        ([1.0] * 6, ValueError, r"10 numbers .* got shape \(6,\)"),
        (np.zeros((2, 5)), ValueError, r"got shape \(2, 5\)"),
        ([1.0] * 9 + [float("nan")], ValueError, "finite"),
        ([1.0] * 9 + [float("inf")], ValueError, "finite"),
        ("1,2,3", TypeError, "string"),
        ([object()] * 10, TypeError, "landmarks must be"),
    ],
)
def test_bad_landmarks(landmarks: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make_image_input(b"x", landmarks=landmarks)


def test_landmarks_and_alignment_must_agree() -> None:
    with pytest.raises(ValueError, match="needs landmarks"):
        make_image_input(b"x", alignment="landmarks")
    with pytest.raises(ValueError, match="only used with ALIGNMENT_LANDMARKS"):
        make_image_input(b"x", landmarks=LANDMARKS, alignment="aligned")
    with pytest.raises(ValueError, match="unknown alignment"):
        make_image_input(b"x", alignment="sideways")
    with pytest.raises(ValueError, match="unknown alignment value"):
        make_image_input(b"x", alignment=99)
    with pytest.raises(TypeError, match="alignment must be"):
        make_image_input(b"x", alignment=1.5)


@pytest.mark.parametrize(
    ("image", "error", "match"),
    [
        (np.zeros((4, 4, 3), np.float32), TypeError, "dtype uint8"),
        (np.zeros((4, 4), np.uint8), ValueError, r"HxWx3 .* shape \(4, 4\)"),
        (np.zeros((4, 4, 4), np.uint8), ValueError, "HxWx3"),
        (np.zeros((0, 4, 3), np.uint8), ValueError, "pixels on each side"),
        (np.zeros((1, 65536, 3), np.uint8), ValueError, "pixels on each side"),
        (12, TypeError, "unsupported image type int"),
        ([1, 2, 3], TypeError, "unsupported image type list"),
    ],
)
def test_bad_images(image: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make_image_input(image)


def test_image_input_message_is_not_converted_twice() -> None:
    with pytest.raises(TypeError, match="sent as given"):
        make_image_input(common_pb2.ImageInput(encoded=b"x"))


def test_batch_mixes_sources_and_passes_messages_through(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(_rgb(112, 112)).save(path)
    ready = common_pb2.ImageInput(encoded=b"abc", alignment=common_pb2.ALIGNMENT_LANDMARKS)
    ready.landmarks.extend([1.0] * 6)  # malformed on purpose: the server must see it as is
    images = [path, _jpeg(), Image.fromarray(_rgb()), _rgb(), ready]
    msgs = list(_prepared(images, [None, LANDMARKS, None, None, None], None))
    assert [m.WhichOneof("source") for m in msgs] == ["encoded", "encoded", "raw", "raw", "encoded"]
    assert msgs[1].alignment == common_pb2.ALIGNMENT_LANDMARKS
    assert msgs[0].alignment == common_pb2.ALIGNMENT_DETECT
    assert msgs[4] is ready


def test_batch_errors_name_the_index_before_anything_is_read(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"images\[2\]: .*HxWx3"):
        list(_prepared([b"a", b"b", np.zeros((3, 3), np.uint8)], None, None))
    with pytest.raises(ValueError, match=r"images\[1\]: landmarks"):
        list(_prepared([b"a", b"b"], [None, [1.0] * 6], None))
    with pytest.raises(ValueError, match="landmarks has 1 entries for 2 images"):
        list(_prepared([b"a", b"b"], [None], None))
    with pytest.raises(ValueError, match="set its landmarks field"):
        list(_prepared([common_pb2.ImageInput(encoded=b"a")], [LANDMARKS], None))
    with pytest.raises(TypeError, match="sequence of images"):
        list(_prepared(b"abc", None, None))
    # A lazily generated batch reports a short landmarks iterable when it runs out.
    with pytest.raises(ValueError, match="landmarks ran out at image 1"):
        list(_prepared((b for b in [b"a", b"b"]), iter([None]), None))


def test_per_image_alignment_sequence() -> None:
    msgs = list(_prepared([b"a", b"b"], [LANDMARKS, None], ["landmarks", "detect"]))
    assert [m.alignment for m in msgs] == [
        common_pb2.ALIGNMENT_LANDMARKS,
        common_pb2.ALIGNMENT_DETECT,
    ]


def test_chunking_by_count_and_bytes() -> None:
    msgs = [common_pb2.ImageInput(encoded=bytes(10)) for _ in range(10)]
    jobs = list(_jobs(iter(msgs), 4))
    assert [(j.start, len(j.inputs)) for j in jobs] == [(0, 4), (4, 4), (8, 2)]
    big = [common_pb2.ImageInput(encoded=bytes(20 * 1024 * 1024)) for _ in range(3)]
    jobs = list(_jobs(iter(big), 64))
    assert [len(j.inputs) for j in jobs] == [1, 1, 1]


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple = ()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def trailing_metadata(self) -> tuple:
        return self._trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.ALREADY_EXISTS, AlreadyExists),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
        (grpc.StatusCode.INTERNAL, Internal),
    ],
)
def test_from_rpc_error_maps_codes(code: grpc.StatusCode, cls: type) -> None:
    err = from_rpc_error(_FakeRpcError(code, "the details"))
    assert type(err) is cls and isinstance(err, AdafaceError)
    assert err.code == code and err.details == "the details"
    assert "the details" in str(err)


def test_from_rpc_error_unknown_code_gives_base() -> None:
    err = from_rpc_error(_FakeRpcError(grpc.StatusCode.DATA_LOSS, "x"))
    assert type(err) is AdafaceError and err.code == grpc.StatusCode.DATA_LOSS


def test_client_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        Client("127.0.0.1:1", max_in_flight=0)
    with pytest.raises(ValueError, match="timeout"):
        Client("127.0.0.1:1", timeout=0)


def test_import_and_client_do_not_import_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        import adaface_client
        from adaface_client import Client, make_image_input
        with Client("127.0.0.1:1") as client:
            make_image_input(np.zeros((112, 112, 3), np.uint8))
        assert "torch" not in sys.modules, "importing adaface_client imported torch"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_recover_reads_per_image_results_from_trailing_metadata() -> None:
    from adaface_client.client import FAILED_RESPONSE_KEY, _Job, _recover

    msgs = [common_pb2.ImageInput(encoded=b"x") for _ in range(2)]
    failed = embedder_pb2.EmbedResponse(request_id="r")
    for i, reason in enumerate(
        [common_pb2.ImageError.REASON_UNDECODABLE, common_pb2.ImageError.REASON_NOT_ALIGNED]
    ):
        failed.results.add(index=i).error.CopyFrom(
            common_pb2.ImageError(reason=reason, message=f"images[{i}]: bad")
        )
    err = _FakeRpcError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "every image failed: ...",
        ((FAILED_RESPONSE_KEY, failed.SerializeToString()),),
    )
    results = _recover(_Job(8, msgs), err)
    assert [(r.index, r.reason, r.message) for r in results] == [
        (8, "UNDECODABLE", "images[8]: bad"),
        (9, "NOT_ALIGNED", "images[9]: bad"),
    ]
    # Without the metadata the request itself was malformed.
    with pytest.raises(InvalidArgument):
        _recover(_Job(8, msgs), _FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "images: bad"))


def test_from_rpc_error_reads_the_request_id_from_trailing_metadata() -> None:
    trailing = (("other", "x"), ("x-request-id", "abc123"))
    err = from_rpc_error(_FakeRpcError(grpc.StatusCode.UNAUTHENTICATED, "invalid token", trailing))
    assert type(err) is Unauthenticated and err.request_id == "abc123"
    assert str(err) == "UNAUTHENTICATED: invalid token (request id abc123)"
    plain = from_rpc_error(_FakeRpcError(grpc.StatusCode.NOT_FOUND, "gone"))
    assert plain.request_id == "" and str(plain) == "NOT_FOUND: gone"


def _connection(argv: list[str], env: dict[str, str]) -> dict:
    from adaface_client.cli import _parser, connection_options

    return connection_options(_parser().parse_args(["photos", *argv]), env)


def test_cli_token_sources_and_tls_flags(tmp_path: Path, capsys) -> None:
    from adaface_client.cli import UsageError

    secret = "s3cret-" + "x" * 20
    token_file = tmp_path / "token"
    token_file.write_text(secret + "\n")
    assert _connection([], {})["token"] is None
    assert _connection([], {"ADAFACE_TOKEN": f" {secret} "})["token"] == secret
    assert _connection(["--token-file", str(token_file)], {"ADAFACE_TOKEN": "other"}) == {
        "credentials": None,
        "token": secret,
    }
    with pytest.raises(UsageError, match="--tls-cert and --tls-key go together"):
        _connection(["--tls-cert", str(token_file)], {})
    with pytest.raises(UsageError, match="not a PEM file") as info:
        _connection(["--tls-ca", str(token_file)], {})
    assert secret not in str(info.value)
    # --token VALUE would show in process lists: refused, and the value is not echoed.
    with pytest.raises(SystemExit) as exit_info:
        _connection(["--token", secret], {})
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--token-file" in err and secret not in err
