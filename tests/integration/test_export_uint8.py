"""uint8-input exports (adaface-export --input-dtype uint8): config and metadata, numerics
against the fp32 export and the upstream golden vectors, and the embedded backend serving one."""

from __future__ import annotations

import json
import logging

import grpc
import numpy as np
import pytest
import torch
from tritonclient.grpc import model_config_pb2 as mc

from adaface.v1 import embedder_pb2, embedder_pb2_grpc
from adaface_server.backends import precision
from adaface_server.backends.precision import ModelRunner
from adaface_server.models.export import (
    build_parser,
    existing_export_matches,
    export_model,
    main,
    render_config,
)
from adaface_server.models.repository import (
    ModelRepositoryError,
    load_model_spec,
    read_model_config,
)
from adaface_server.preprocess.pipeline import to_model_input

from .server_harness import ServerThread, server_settings
from .test_embed_rpc import aligned, crop, vectors

ATOL = 1e-5


def load(repository_and_name) -> torch.jit.ScriptModule:
    spec = load_model_spec(*repository_and_name)
    return torch.jit.load(str(spec.model_path), map_location="cpu").eval()


def test_config_and_metadata_declare_uint8(ir18_uint8_repository):
    repository, name = ir18_uint8_repository
    text = (repository / name / "config.pbtxt").read_text()
    assert text == render_config(name, 16, input_dtype="uint8")
    config = read_model_config(repository / name / "config.pbtxt")
    (inp,) = config.input
    assert (inp.name, inp.data_type, list(inp.dims)) == ("INPUT__0", mc.TYPE_UINT8, [3, 112, 112])
    assert [o.data_type for o in config.output] == [mc.TYPE_FP32, mc.TYPE_FP32]
    (warmup,) = config.model_warmup
    assert warmup.inputs["INPUT__0"].data_type == mc.TYPE_UINT8
    assert config.parameters["channel_order"].string_value == "BGR"
    metadata = json.loads((repository / name / "1" / "metadata.json").read_text())
    assert metadata["input_dtype"] == "uint8"
    assert metadata["input"] == {"channel_order": "BGR", "normalisation": "(x/255-0.5)/0.5"}
    assert metadata["preprocessing"]["dtype"] == "uint8"
    assert metadata["preprocessing"]["scaled_by"] == "model"
    assert 0 <= metadata["max_abs_diff"] <= 1e-5  # the fp32 parity gate, on pixels
    assert load_model_spec(repository, name).input_dtype == "uint8"


def test_fp32_exports_record_fp32(ir18_repository):
    repository, name = ir18_repository
    metadata = json.loads((repository / name / "1" / "metadata.json").read_text())
    assert metadata["input_dtype"] == "fp32" and metadata["preprocessing"]["dtype"] == "float32"
    assert load_model_spec(repository, name).input_dtype == "fp32"


def test_uint8_model_reproduces_upstream_golden_vectors(ir18_uint8_repository, golden_ir18):
    with torch.inference_mode():
        embedding, norm = load(ir18_uint8_repository)(golden_ir18["pixels"])
    assert embedding.dtype == norm.dtype == torch.float32
    assert (embedding - golden_ir18["embeddings"]).abs().max().item() <= ATOL
    torch.testing.assert_close(norm, golden_ir18["norms"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("flip", [False, True])
def test_uint8_model_equals_fp32_model_on_the_same_crops(
    ir18_repository, ir18_uint8_repository, flip
):
    """The graph normalises with a table made by the server's own arithmetic: the uint8
    model fed pixels gives what the fp32 model gives for the server's floats, bit for bit."""
    crops = [crop(700 + s) for s in range(5)]
    floats = to_model_input(crops, flip, "BGR", "fp32")
    pixels = to_model_input(crops, flip, "BGR", "uint8")
    assert pixels.dtype == np.uint8 and pixels.nbytes * 4 == floats.nbytes
    with torch.inference_mode():
        expected = load(ir18_repository)(torch.from_numpy(floats))
        got = load(ir18_uint8_repository)(torch.from_numpy(pixels))
    assert (got[0] - expected[0]).abs().max().item() <= ATOL
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=0)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_bf16_uint8_export_normalises_in_fp32_then_runs_reduced(tmp_path, golden_ir18):
    logging.getLogger("adaface_server.export").setLevel(logging.ERROR)
    try:
        report = export_model(
            None, "ir_18", tmp_path, "bf16_u8", max_batch_size=4, precision="bf16",
            input_dtype="uint8",
        )  # fmt: skip
    finally:
        logging.getLogger("adaface_server.export").setLevel(logging.NOTSET)
    assert report.input_dtype == "uint8" and report.precision == "bf16"
    config = read_model_config(tmp_path / "bf16_u8" / "config.pbtxt")
    assert config.input[0].data_type == mc.TYPE_UINT8
    module = torch.jit.load(str(report.model_path), map_location="cpu").eval()
    with torch.inference_mode():
        emb, norms = module(golden_ir18["pixels"])
    assert emb.dtype == torch.float32
    cos, rel = precision.parity(
        (golden_ir18["embeddings"].numpy(), golden_ir18["norms"].numpy()),
        (emb.numpy(), norms.numpy()),
    )
    assert cos >= 0.999 and rel <= 1e-2, (cos, rel)


def test_cli_flag_and_if_missing(tmp_path, capsys):
    help_text = build_parser().format_help()
    assert "--input-dtype {fp32,uint8}" in help_text and "37,632" in help_text
    argv = ["--arch", "ir_18", "--repository", str(tmp_path), "--name", "m",
            "--max-batch-size", "4"]  # fmt: skip
    assert main([*argv, "--input-dtype", "uint8"]) == 0
    assert load_model_spec(tmp_path, "m").input_dtype == "uint8"
    assert existing_export_matches(tmp_path, "m", 1, "ir_18", None, input_dtype="uint8")
    assert not existing_export_matches(tmp_path, "m", 1, "ir_18", None)
    capsys.readouterr()
    # --if-missing with the other dtype is not "this export": it exports again.
    assert main([*argv, "--if-missing"]) == 0
    assert "skipped" not in capsys.readouterr().out
    assert load_model_spec(tmp_path, "m").input_dtype == "fp32"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--input-dtype", "fp16"])


def test_unknown_input_dtype_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown input dtype 'int8'"):
        export_model(None, "ir_18", tmp_path, "x", input_dtype="int8")


def copy_export(source, target, name: str) -> None:
    for path in (source / name).rglob("*"):
        if path.is_file():
            dest = target / name / path.relative_to(source / name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(path.read_bytes())


def test_spec_refuses_unsupported_or_contradicting_input_types(ir18_uint8_repository, tmp_path):
    repository, name = ir18_uint8_repository
    copy_export(repository, tmp_path, name)
    config_path = tmp_path / name / "config.pbtxt"
    original = config_path.read_text()
    config_path.write_text(original.replace("TYPE_UINT8", "TYPE_FP16"))
    with pytest.raises(ModelRepositoryError) as err:
        load_model_spec(tmp_path, name)
    assert f"{config_path}: input INPUT__0 is FP16; this server feeds only FP32, UINT8" in str(
        err.value
    )
    assert "adaface-export --input-dtype fp32|uint8" in str(err.value)
    config_path.write_text(original.replace("TYPE_UINT8", "TYPE_FP32"))
    with pytest.raises(ModelRepositoryError, match="says input_dtype 'uint8': re-export"):
        load_model_spec(tmp_path, name)
    config_path.write_text(original)
    metadata_path = tmp_path / name / "1" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["input_dtype"] = "int4"
    metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(ModelRepositoryError, match="input_dtype must be one of fp32, uint8"):
        load_model_spec(tmp_path, name)


def test_runner_feeds_uint8_and_auto_gates_on_pixels(ir18_uint8_repository, golden_ir18):
    cpu = torch.device("cpu")
    module = load(ir18_uint8_repository)
    runner = ModelRunner(module, cpu, "fp32", 16, input_dtype="uint8")
    emb, norms = runner(golden_ir18["pixels"].numpy())
    np.testing.assert_allclose(emb, golden_ir18["embeddings"].numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(norms, golden_ir18["norms"].numpy(), rtol=1e-5)
    selection = precision.select_runner(module, cpu, "auto", 16, input_dtype="uint8")
    assert selection.runner.input_dtype == "uint8"
    for trial in selection.trials[1:]:
        assert trial.passed, trial


def embed(address: str, crops, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    request = embedder_pb2.EmbedRequest(
        images=[aligned(c) for c in crops], options=embedder_pb2.EmbedOptions(flip_fusion=flip)
    )
    with grpc.insecure_channel(address) as channel:
        return vectors(embedder_pb2_grpc.EmbedderStub(channel).Embed(request, timeout=60))


def test_embedded_backend_serves_a_uint8_export(ir18_repository, ir18_uint8_repository, caplog):
    crops = [crop(800 + s) for s in range(5)]
    caplog.set_level(logging.INFO)
    results = {}
    for label, (repository, name) in (
        ("fp32", ir18_repository),
        ("uint8", ir18_uint8_repository),
    ):
        server = ServerThread(server_settings(repository, name)).start().wait_serving()
        try:
            assert server.app.embedding.backend.spec.input_dtype == label
            results[label] = [embed(server.address, crops, flip) for flip in (False, True)]
        finally:
            server.stop()
    assert "input BGR uint8 pixels (normalised by the model)" in caplog.text
    assert "in fp32 with uint8 input" in caplog.text
    for (emb32, norm32), (emb8, norm8) in zip(results["fp32"], results["uint8"], strict=True):
        assert np.abs(emb32 - emb8).max() <= ATOL
        np.testing.assert_allclose(norm32, norm8, rtol=1e-5)
