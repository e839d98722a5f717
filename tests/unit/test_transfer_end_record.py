"""The native export file ends with a record counting identities and samples and carrying a
sha256 of everything before it; gallery.pth zips must be whole. Anything else is refused."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from adaface_server.errors import Cancelled, InvalidArgument
from adaface_server.gallery.transfer import (
    TransferIdentity,
    export_stream,
    parse_native,
    parse_seed_pth,
)

HEADER = {"name": "g", "model_checksum": "a" * 64, "model_name": "m", "dim": 4, "metadata": {}}


def exported() -> bytes:
    rng = np.random.default_rng(0)
    people = [
        TransferIdentity(f"p{i}", {}, 0.0, rng.standard_normal((2, 4)).astype(np.float32),
                         np.ones(2, np.float32), [2 * i, 2 * i + 1], [0.0, 0.0])
        for i in range(3)
    ]  # fmt: skip
    return b"".join(export_stream(HEADER, people))


def test_the_end_record_counts_and_digests_the_file() -> None:
    data = exported()
    end = json.loads(data[data.rindex(b'{"end":') :])
    assert end["end"] is True and end["identities"] == 3 and end["samples"] == 6
    assert len(end["sha256"]) == 64
    assert [i.name for i in parse_native(data).identities] == ["p0", "p1", "p2"]


def test_an_altered_vector_is_refused_by_the_digest() -> None:
    data = bytearray(exported())
    at = data.index(b'"p1"')
    at = data.index(b"\n", at) + 5  # inside p1's vectors
    data[at] ^= 0x01
    with pytest.raises(InvalidArgument, match="sha256") as err:
        parse_native(bytes(data))
    assert "altered or damaged" in str(err.value)


def test_a_file_without_its_end_record_counts_as_cancelled() -> None:
    data = exported()
    end = data.rindex(b'{"end":')
    # Cut at a record boundary, inside the end record, inside vectors, inside the magic.
    for cut in (end, len(data) - 1, len(data) - 30, data.index(b'"p1"') + 40, 3, 0):
        with pytest.raises(Cancelled, match="no end record") as err:
            parse_native(data[:cut])
        assert err.value.status == "CANCELLED"
        assert f"ended at byte {cut}" in str(err.value)


def test_files_from_servers_without_a_digest_still_import() -> None:
    data = exported()
    at = data.rindex(b'{"end":')
    record = json.loads(data[at:])
    del record["sha256"]
    old = data[:at] + json.dumps(record).encode() + b"\n"
    assert len(parse_native(old).identities) == 3


def seed_file() -> bytes:
    buffer = io.BytesIO()
    torch.save({"features": torch.randn(6, 4), "labels": torch.arange(6) % 3}, buffer)
    return buffer.getvalue()


def test_a_truncated_gallery_pth_is_refused() -> None:
    data = seed_file()
    assert len(parse_seed_pth(data, "g", "a" * 64).identities) == 3
    for cut in (len(data) - 1, len(data) - 30, len(data) // 2):
        with pytest.raises(InvalidArgument, match=r"gallery\.pth"):
            parse_seed_pth(data[:cut], "g", "a" * 64)


def test_a_damaged_pickle_in_a_gallery_pth_is_refused() -> None:
    data = bytearray(seed_file())
    at = data.index(b"data.pkl") + 40  # inside the stored pickle, past its local header
    data[at] ^= 0x01
    with pytest.raises(InvalidArgument, match=r"gallery\.pth"):
        parse_seed_pth(bytes(data), "g", "a" * 64)


def test_an_import_told_to_stop_stops_between_records() -> None:
    from adaface_server.gallery.index import Stopped
    from adaface_server.gallery.transfer import STOP_CHECK_RECORDS

    n = 3 * STOP_CHECK_RECORDS
    people = [
        TransferIdentity(f"p{i}", {}, 0.0, np.ones((1, 4), np.float32), np.ones(1, np.float32),
                         [i], [0.0])
        for i in range(n)
    ]  # fmt: skip
    data = b"".join(export_stream(HEADER, people))
    asked = []

    def second_time() -> bool:
        asked.append(1)
        return len(asked) >= 2

    with pytest.raises(Stopped, match=r"import stopped at byte \d+ of \d+"):
        parse_native(data, should_stop=second_time)
    assert len(asked) == 2  # at record 0 and at record STOP_CHECK_RECORDS
    assert len(parse_native(data, should_stop=lambda: False).identities) == n
