"""Every .proto carries the options other languages' code generators need."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaface.v1 import common_pb2, embedder_pb2, gallery_pb2, sampling_pb2


@pytest.mark.parametrize("module", [common_pb2, embedder_pb2, gallery_pb2, sampling_pb2])
def test_language_options_are_set(module) -> None:
    options = module.DESCRIPTOR.GetOptions()
    assert options.go_package.endswith("/adaface/v1;adafacev1")
    assert options.java_package == "dev.adaface.v1"
    assert options.java_multiple_files
    assert options.java_outer_classname.endswith("Proto")
    assert options.csharp_namespace == "Adaface.V1"
    assert options.php_namespace == "Adaface\\V1"
    assert options.ruby_package == "Adaface::V1"


def test_embedding_docs_say_how_to_decode_unaligned_bytes() -> None:
    text = (Path(__file__).resolve().parents[2] / "protos/adaface/v1/common.proto").read_text()
    assert "NOT a multiple of 4" in text and "copy first" in text
