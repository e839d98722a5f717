"""IR / IR-SE backbones: upstream key/shape parity, output contract, layouts and tracing."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from adaface_server.models.checkpoint import random_state_dict
from adaface_server.models.iresnet import ARCHS, Subsample, build_model

UPSTREAM_SHAPES = (
    Path(__file__).resolve().parents[1] / "data" / "upstream_state_dict_shapes.json.gz"
)
REQUIRED = ("ir_18", "ir_34", "ir_50", "ir_101", "ir_se_50", "ir_se_101")


@pytest.fixture(scope="module")
def upstream_shapes() -> dict[str, list[list]]:
    return json.loads(gzip.decompress(UPSTREAM_SHAPES.read_bytes()))["archs"]


@pytest.fixture(scope="module")
def ir18() -> nn.Module:
    model = build_model("ir_18")
    model.load_state_dict(random_state_dict("ir_18", 0))
    return model.eval()


def test_required_archs_are_offered(upstream_shapes):
    assert set(REQUIRED) <= set(ARCHS)
    assert set(ARCHS) == set(upstream_shapes)


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_keys_and_shapes_equal_upstream_in_order(arch, upstream_shapes):
    with torch.device("meta"):
        model = build_model(arch)
    ours = [[key, list(t.shape)] for key, t in model.state_dict().items()]
    assert ours == upstream_shapes[arch]


def test_se_blocks_use_upstream_names():
    with torch.device("meta"):
        keys = set(build_model("ir_se_50").state_dict())
    assert "body.0.res_layer.se_block.fc1.weight" in keys
    assert "body.0.res_layer.se_block.fc2.weight" in keys


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_model("ir_77")
    message = str(err.value)
    assert "'ir_77'" in message
    for arch in ARCHS:
        assert arch in message


@pytest.mark.parametrize("batch", [1, 3])
def test_forward_returns_unit_embedding_and_norm(ir18, batch):
    x = torch.rand(batch, 3, 112, 112) * 2 - 1
    with torch.inference_mode():
        embedding, norm = ir18(x)
    assert embedding.shape == (batch, 512) and embedding.dtype == torch.float32
    assert norm.shape == (batch, 1)
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(batch), atol=1e-5, rtol=0)
    assert bool((norm > 0).all())


def test_eager_model_reproduces_upstream_golden_vectors(ir18, golden_ir18):
    with torch.inference_mode():
        embedding, norm = ir18(golden_ir18["inputs"])
    assert (embedding - golden_ir18["embeddings"]).abs().max().item() <= 1e-5
    torch.testing.assert_close(norm, golden_ir18["norms"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("arch", ["ir_18", "ir_se_50"])
def test_channels_last_matches_contiguous(arch):
    model = build_model(arch)
    model.load_state_dict(random_state_dict(arch, 1))
    model.eval()
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.inference_mode():
        reference = model(x)
        model.to(memory_format=torch.channels_last)
        result = model(x.contiguous(memory_format=torch.channels_last))
    assert (result[0] - reference[0]).abs().max().item() <= 1e-5
    torch.testing.assert_close(result[1], reference[1], rtol=1e-5, atol=0)


def test_trace_is_batch_agnostic(ir18):
    with torch.no_grad():
        traced = torch.jit.trace(ir18, torch.rand(2, 3, 112, 112), check_trace=False)
    x = torch.rand(5, 3, 112, 112)
    with torch.inference_mode():
        eager = ir18(x)
        scripted = traced(x)
    assert isinstance(scripted, tuple) and len(scripted) == 2
    assert (scripted[0] - eager[0]).abs().max().item() <= 1e-5


def test_subsample_equals_upstream_one_by_one_maxpool():
    x = torch.randn(2, 4, 9, 10)
    torch.testing.assert_close(Subsample(2)(x), nn.MaxPool2d(1, 2)(x), rtol=0, atol=0)


def test_random_weights_are_deterministic_and_seeded():
    first, again, other = (random_state_dict("ir_18", s) for s in (0, 0, 1))
    assert list(first) == list(again)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["input_layer.0.weight"], other["input_layer.0.weight"])
    assert first["input_layer.2.weight"].eq(0.25).all()
    assert first["body.0.res_layer.0.num_batches_tracked"].item() == 0


def test_random_weights_keep_the_deepest_basic_net_finite():
    model = build_model("ir_101")
    model.load_state_dict(random_state_dict("ir_101", 0))
    model.eval()
    with torch.inference_mode():
        embedding, norm = model(torch.rand(2, 3, 112, 112) * 2 - 1)
    assert bool(torch.isfinite(embedding).all()) and bool(torch.isfinite(norm).all())
    # Different faces must not collapse to one vector, or search tests would be vacuous.
    assert (embedding[0] @ embedding[1]).item() < 0.999
