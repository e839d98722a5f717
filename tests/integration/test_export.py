"""Exporter end to end: CLI, TorchScript fidelity, config.pbtxt, metadata and repository specs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from adaface_server.models.checkpoint import random_state_dict
from adaface_server.models.export import (
    DEFAULT_ARCH,
    ExportError,
    build_parser,
    default_model_name,
    export_model,
    render_config,
    verification_batch,
)
from adaface_server.models.iresnet import build_model
from adaface_server.models.repository import (
    ModelRepositoryError,
    build_model_config,
    load_model_spec,
    parse_model_config,
)

ROOT = Path(__file__).resolve().parents[2]
COMMITTED_CONFIG = ROOT / "model_repository" / "adaface_ir50" / "config.pbtxt"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ir18_eager() -> torch.nn.Module:
    model = build_model("ir_18")
    model.load_state_dict(random_state_dict("ir_18", 0))
    return model.eval()


@pytest.fixture(scope="module")
def ir18_scripted(ir18_repository) -> torch.jit.ScriptModule:
    repository, name = ir18_repository
    return torch.jit.load(str(load_model_spec(repository, name).model_path)).eval()


def test_cli_exports_random_weights_with_a_loud_warning(tmp_path):
    result = subprocess.run(
        [
            sys.executable, "-m", "adaface_server.models.export",
            "--arch", "ir_18", "--repository", str(tmp_path),
            "--max-batch-size", "8", "--instance-count", "2", "--seed", "0",
        ],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "RANDOM, UNTRAINED ir_18" in result.stderr
    assert "MEANINGLESS" in result.stderr
    assert "max abs diff of embeddings" in result.stdout
    model_dir = tmp_path / "adaface_ir18"
    config = parse_model_config((model_dir / "config.pbtxt").read_text())
    assert config.max_batch_size == 8
    assert config.instance_group[0].count == 2
    # No kind means KIND_AUTO: GPU when Triton has one, CPU otherwise.
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_AUTO
    assert "kind" not in (model_dir / "config.pbtxt").read_text()
    metadata = json.loads((model_dir / "1" / "metadata.json").read_text())
    assert metadata["weights"] == "random-untrained"
    assert metadata["model_sha256"] == sha256(model_dir / "1" / "model.pt")


def test_cli_reports_a_bad_checkpoint_with_exit_status_2(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_text("not a checkpoint")
    result = subprocess.run(
        [sys.executable, "-m", "adaface_server.models.export", "--checkpoint", str(bad),
         "--arch", "ir_18", "--repository", str(tmp_path / "repo")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"adaface-export: error: {bad} is not a readable PyTorch checkpoint" in result.stderr
    assert not (tmp_path / "repo" / "adaface_ir18").exists()


def test_cli_rejects_unknown_arch():
    with pytest.raises(SystemExit) as err:
        build_parser().parse_args(["--arch", "ir_77"])
    assert err.value.code == 2


def test_committed_config_matches_the_exporters_defaults():
    defaults = build_parser().parse_args([])
    assert defaults.model_format == "adaface" and defaults.arch is None
    name = defaults.name or default_model_name(DEFAULT_ARCH)
    assert name == "adaface_ir50"
    expected = render_config(
        name, defaults.max_batch_size, defaults.instance_count, defaults.max_queue_delay_us
    )
    assert COMMITTED_CONFIG.read_text() == expected, (
        "model_repository/adaface_ir50/config.pbtxt drifted from the exporter; regenerate with "
        "`adaface-export` (defaults) and commit the config"
    )


def test_export_writes_exactly_the_rendered_config(ir18_repository):
    repository, name = ir18_repository
    assert (repository / name / "config.pbtxt").read_text() == render_config(name, 16)


def test_config_is_the_triton_contract(ir18_repository):
    repository, name = ir18_repository
    text = (repository / name / "config.pbtxt").read_text()
    config = text_format.Parse(text, mc.ModelConfig())
    assert config == build_model_config(name, 16)
    assert config.name == name and config.platform == "pytorch_libtorch"
    assert config.max_batch_size == 16
    (inp,) = config.input
    assert (inp.name, inp.data_type, list(inp.dims)) == ("INPUT__0", mc.TYPE_FP32, [3, 112, 112])
    outputs = {o.name: (o.data_type, list(o.dims)) for o in config.output}
    assert outputs == {"OUTPUT__0": (mc.TYPE_FP32, [512]), "OUTPUT__1": (mc.TYPE_FP32, [1])}
    assert 0 < config.dynamic_batching.max_queue_delay_microseconds <= 5000
    assert config.instance_group[0].count == 1
    assert config.parameters["INFERENCE_MODE"].string_value == "true"
    (warmup,) = config.model_warmup
    assert warmup.batch_size >= 1
    assert warmup.inputs["INPUT__0"].zero_data
    assert list(warmup.inputs["INPUT__0"].dims) == [3, 112, 112]


def test_metadata_fields(ir18_repository):
    repository, name = ir18_repository
    version_dir = repository / name / "1"
    metadata = json.loads((version_dir / "metadata.json").read_text())
    assert metadata["arch"] == "ir_18"
    assert metadata["embedding_dim"] == 512
    assert (metadata["input_name"], metadata["embedding_name"], metadata["norm_name"]) == (
        "INPUT__0", "OUTPUT__0", "OUTPUT__1",
    )  # fmt: skip
    assert metadata["preprocessing"]["color_order"] == "BGR"
    assert metadata["preprocessing"]["scale"] == "(x / 255 - 0.5) / 0.5"
    assert metadata["weights"] == "random-untrained"
    assert metadata["checkpoint_file"] is None and metadata["checkpoint_sha256"] is None
    assert metadata["model_sha256"] == sha256(version_dir / "model.pt")
    assert metadata["torch_version"] == torch.__version__
    assert 0 <= metadata["max_abs_diff"] <= 1e-5
    assert metadata["exporter_version"]
    assert datetime.fromisoformat(metadata["exported_at"]).utcoffset().total_seconds() == 0


def test_model_spec_describes_the_export(ir18_repository):
    repository, name = ir18_repository
    spec = load_model_spec(repository, name)
    assert (spec.name, spec.version, spec.arch) == (name, 1, "ir_18")
    assert spec.input_name == "INPUT__0" and spec.input_dims == (3, 112, 112)
    assert (spec.embedding_name, spec.norm_name, spec.embedding_dim) == (
        "OUTPUT__0",
        "OUTPUT__1",
        512,
    )
    assert spec.max_batch_size == 16
    assert spec.model_path == repository / name / "1" / "model.pt"
    assert spec.checksum == sha256(spec.model_path)
    assert spec.untrained


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_torchscript_matches_eager_for_any_batch(ir18_scripted, ir18_eager, batch):
    x = torch.rand(batch, 3, 112, 112) * 2 - 1
    with torch.inference_mode():
        embedding, norm = ir18_scripted(x)
        ref_embedding, ref_norm = ir18_eager(x)
    assert embedding.shape == (batch, 512) and norm.shape == (batch, 1)
    assert embedding.dtype == norm.dtype == torch.float32
    assert (embedding - ref_embedding).abs().max().item() <= 1e-5
    torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)


def test_torchscript_reproduces_upstream_golden_vectors(ir18_scripted, golden_ir18):
    with torch.inference_mode():
        embedding, norm = ir18_scripted(golden_ir18["inputs"])
    assert (embedding - golden_ir18["embeddings"]).abs().max().item() <= 1e-5
    torch.testing.assert_close(norm, golden_ir18["norms"], rtol=1e-5, atol=0)


def test_export_from_checkpoint_records_it(tmp_path, ir18_checkpoint, golden_ir18):
    report = export_model(ir18_checkpoint, "ir_18", tmp_path, "from_ckpt", max_batch_size=16)
    metadata = json.loads(report.metadata_path.read_text())
    assert metadata["weights"] == "checkpoint"
    assert metadata["checkpoint_file"] == ir18_checkpoint.name
    assert metadata["checkpoint_sha256"] == sha256(ir18_checkpoint)
    assert metadata["seed"] is None
    assert not report.untrained and not load_model_spec(tmp_path, "from_ckpt").untrained
    assert report.max_abs_diff <= 1e-5 and report.max_rel_norm_diff <= 1e-5
    scripted = torch.jit.load(str(report.model_path))
    with torch.inference_mode():
        embedding, _ = scripted(golden_ir18["inputs"])
    assert (embedding - golden_ir18["embeddings"]).abs().max().item() <= 1e-5


def test_failed_verification_raises_and_leaves_no_model(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="adaface_server.export")
    with pytest.raises(ExportError) as err:
        export_model(None, "ir_18", tmp_path, "strict", tolerance=-1.0)
    assert "does not reproduce the eager model: max abs embedding diff" in str(err.value)
    assert not (tmp_path / "strict" / "1" / "model.pt").exists()
    assert not (tmp_path / "strict" / "config.pbtxt").exists()
    assert os.listdir(tmp_path / "strict" / "1") == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("RANDOM, UNTRAINED ir_18" in w for w in warnings)


def test_verification_batch_is_deterministic():
    assert torch.equal(verification_batch(4), verification_batch(4))


def test_spec_errors_name_the_path(tmp_path, ir18_repository):
    with pytest.raises(ModelRepositoryError, match=r"model repository .* does not exist"):
        load_model_spec(tmp_path / "absent", "m")
    (tmp_path / "other").mkdir()
    with pytest.raises(ModelRepositoryError) as err:
        load_model_spec(tmp_path, "m")
    assert (
        str(err.value)
        == f"model 'm' not found: {tmp_path / 'm'} does not exist (models present: other)"
    )
    model_root = tmp_path / "m"
    model_root.mkdir()
    with pytest.raises(ModelRepositoryError, match=r"config\.pbtxt does not exist"):
        load_model_spec(tmp_path, "m")
    (model_root / "config.pbtxt").write_text("name: 'm'\nmax_batch_size: oops\n")
    with pytest.raises(ModelRepositoryError, match="is not a valid model config"):
        load_model_spec(tmp_path, "m")
    (model_root / "config.pbtxt").write_text(render_config("m", 4))
    with pytest.raises(ModelRepositoryError, match="has no numeric version directory"):
        load_model_spec(tmp_path, "m")
    (model_root / "1").mkdir()
    with pytest.raises(ModelRepositoryError) as err:
        load_model_spec(tmp_path, "m")
    assert str(err.value) == f"{model_root / '1' / 'model.pt'} does not exist"
    source, name = ir18_repository
    os.link(source / name / "1" / "model.pt", model_root / "1" / "model.pt")
    with pytest.raises(ModelRepositoryError, match=r"metadata\.json does not exist"):
        load_model_spec(tmp_path, "m")
    (model_root / "1" / "metadata.json").write_text("{broken")
    with pytest.raises(ModelRepositoryError, match="is not valid JSON"):
        load_model_spec(tmp_path, "m")


def test_spec_picks_the_newest_numeric_version(tmp_path, ir18_repository):
    source, name = ir18_repository
    target = tmp_path / name
    target.mkdir()
    (target / "config.pbtxt").write_text((source / name / "config.pbtxt").read_text())
    for version in ("2", "10"):
        (target / version).mkdir()
        os.link(source / name / "1" / "model.pt", target / version / "model.pt")
        (target / version / "metadata.json").write_text(
            (source / name / "1" / "metadata.json").read_text()
        )
    (target / "latest").mkdir()
    spec = load_model_spec(tmp_path, name)
    assert spec.version == 10 and spec.model_dir == target / "10"


def test_config_naming_another_model_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text(render_config("other", 4))
    with pytest.raises(ModelRepositoryError, match="names model 'other', not 'm'"):
        load_model_spec(tmp_path, "m")
