"""InsightFace .bin loading: every pickle layout of (images, issame), and crafted files refused."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from adaface_client.bin_format import BinFormatError, load_bin, loads_bin

IMAGES = [b"\xff\xd8jpeg-0", b"\xff\xd8jpeg-1", b"\xff\xd8jpeg-2", b"\xff\xd8jpeg-3"]


def _short_binstring(b: bytes) -> bytes:
    return b"U" + bytes([len(b)]) + b


def python2_bin() -> bytes:
    """What Python 2 + numpy wrote for (list of str, bool array) at protocol 2, opcode by
    opcode (no Python 2 here to produce it)."""
    s = _short_binstring
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
        + s(b"b")
        + b"\x87R(K\x01K\x02\x85cnumpy\ndtype\n("
        + s(b"b1")
        + b"K\x00K\x01tR(K\x03"
        + s(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
        + s(b"\x01\x00")
        + b"tb"
    )
    return b"\x80\x02(](" + b"".join(s(i) for i in IMAGES) + b"e" + array + b"t."


LABELS = [
    np.array([True, False]),
    [True, False],
    (True, False),
    [np.bool_(True), np.bool_(False)],
    np.array([[True, False]], order="F")[0],
]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("labels", LABELS, ids=["array", "list", "tuple", "np_bools", "view"])
def test_python3_layouts(protocol: int, labels: object) -> None:
    vs = loads_bin(pickle.dumps((IMAGES, labels), protocol=protocol))
    assert vs.images == IMAGES
    assert vs.issame.dtype == np.bool_
    assert vs.issame.tolist() == [True, False]
    assert vs.pairs == 2


def test_python2_layout(tmp_path: Path) -> None:
    path = tmp_path / "lfw.bin"
    path.write_bytes(python2_bin())
    vs = load_bin(path)
    assert vs.name == "lfw"
    assert vs.images == IMAGES
    assert vs.issame.tolist() == [True, False]


class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (self.command,))


class _Evals:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


def _payloads(marker: Path) -> dict[str, bytes]:
    command = f"touch {marker}"
    return {
        "os.system at top level": pickle.dumps(_RunsCommand(command)),
        "os.system among the images": pickle.dumps(
            ([*IMAGES[:3], _RunsCommand(command)], [True, False])
        ),
        "eval as the labels": pickle.dumps((IMAGES, _Evals(marker)), protocol=2),
        "object array": pickle.dumps((IMAGES, np.array([_RunsCommand(command)], dtype=object))),
    }


def test_malicious_pickles_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for what, payload in _payloads(marker).items():
        # The payloads are live: plain pickle.loads of one would create the marker.
        path = tmp_path / "evil.bin"
        path.write_bytes(payload)
        with pytest.raises(BinFormatError, match=r"evil\.bin: not a validation \.bin: .*refused"):
            load_bin(path)
        assert not marker.exists(), what
    pickle.loads(_payloads(marker)["os.system at top level"])
    assert marker.exists()  # the same bytes do run code when unpickled without restriction


def test_crafted_dtype_state_refused() -> None:
    # A bool dtype whose state claims fields / object flags would make numpy read raw bytes
    # as object pointers: the state is checked and refused before numpy could see it.
    good = python2_bin()
    flags_object = good.replace(b"K\x00tb\x89", b"K\x3ftb\x89", 1)
    assert flags_object != good
    with pytest.raises(BinFormatError, match="numpy dtype state refused"):
        loads_bin(flags_object)
    with_fields = good.replace(b"NNNJ", b"N(U\x01at}J", 1)
    with pytest.raises(BinFormatError, match="refused"):
        loads_bin(with_fields)


def test_wrong_number_of_bytes_for_the_shape() -> None:
    bad = python2_bin().replace(b"U\x02\x01\x00tb", b"U\x01\x01tb")
    with pytest.raises(BinFormatError, match="1 bytes for 2 values"):
        loads_bin(bad, "cfp_fp.bin")


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ((IMAGES[:3], [True, False]), "3 images for 2 pairs"),
        ((IMAGES, np.array([1, 0], dtype=np.uint8)), "dtype 'u1' refused"),
        (([*IMAGES[:3], "text"], [True, False]), r"images\[3\] is str"),
        ((IMAGES, [True, 1]), "only booleans"),
        ((IMAGES,), r"\(images, issame\)"),
        (([], []), "no pairs"),
        ({"images": IMAGES}, r"\(images, issame\)"),
    ],
)
def test_wrong_structure_named(obj: object, message: str) -> None:
    with pytest.raises(BinFormatError, match=r"^agedb_30\.bin: .*" + message):
        loads_bin(pickle.dumps(obj), "agedb_30.bin")


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(BinFormatError, match=r"missing\.bin: cannot read"):
        load_bin(tmp_path / "missing.bin")
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(pickle.dumps((IMAGES, [True, False]))[:-8])
    with pytest.raises(BinFormatError, match=r"truncated\.bin: .*truncated"):
        load_bin(truncated)
    text = tmp_path / "notes.bin"
    text.write_text("hello")
    with pytest.raises(BinFormatError, match=r"notes\.bin"):
        load_bin(text)
