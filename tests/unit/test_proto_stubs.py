"""The committed generated stubs are exactly what `make proto` produces from the .proto files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"


def test_generated_stubs_match_proto_sources(tmp_path):
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob("adaface/v1/*.proto"))
    assert sources, "no .proto files found"
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        *sources,
    ]
    assert protoc.main(args) == 0
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    committed = sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.glob("adaface/v1/*_pb2*.py*"))
    assert generated == committed, "run `make proto` and commit the result"
    for rel in generated:
        if (tmp_path / rel).read_bytes() != (PROTO_ROOT / rel).read_bytes():
            pytest.fail(f"{rel} is stale: run `make proto` and commit the result")


def test_every_proto_field_is_commented():
    """The .proto files are the API documentation: no field or rpc without a comment."""
    undocumented = []
    for path in PROTO_ROOT.glob("adaface/v1/*.proto"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            text = line.strip()
            is_field = (
                text.endswith(";")
                and "=" in text
                and not text.startswith(("option", "syntax", "package", "import", "//"))
            )
            is_rpc = text.startswith("rpc ")
            if not (is_field or is_rpc):
                continue
            enum_value = text.split("=")[0].strip().isupper()
            if enum_value and text.split("=")[0].strip().endswith("UNSPECIFIED"):
                continue
            if not lines[i - 1].strip().startswith("//") and "//" not in text:
                undocumented.append(f"{path.name}:{i + 1}: {text}")
    assert not undocumented, "\n".join(undocumented)


def test_stubs_import_as_one_package():
    from adaface.v1 import common_pb2, embedder_pb2_grpc

    assert common_pb2.DESCRIPTOR.package == "adaface.v1"
    assert hasattr(embedder_pb2_grpc, "EmbedderStub")
    assert "server" not in sys.modules and "client" not in sys.modules
