"""arcface_torch iResNets: upstream key/shape parity, golden outputs, backbone.pth loading."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaface_server.models.arcface_iresnet import (
    ARCFACE_ARCHS,
    build_arcface_model,
    load_arcface_backbone,
    random_arcface_state_dict,
)
from adaface_server.models.checkpoint import (
    CheckpointError,
    random_state_dict,
    save_adaface_checkpoint,
)

DATA = Path(__file__).resolve().parents[1] / "data"
SHAPES = DATA / "arcface_torch_state_dict_shapes.json.gz"
GOLDEN = DATA / "golden_arcface_r18.npz"
IMAGE_NAMES = ("golden_gradient.png", "golden_checker.png", "golden_noise.png")


@pytest.fixture(scope="module")
def upstream_shapes() -> dict[str, list[list]]:
    return json.loads(gzip.decompress(SHAPES.read_bytes()))["archs"]


def test_all_upstream_archs_are_offered(upstream_shapes):
    assert set(ARCFACE_ARCHS) == set(upstream_shapes) == {"r18", "r34", "r50", "r100"}


@pytest.mark.parametrize("arch", ARCFACE_ARCHS)
def test_state_dict_keys_and_shapes_equal_upstream_in_order(arch, upstream_shapes):
    with torch.device("meta"):
        model = build_arcface_model(arch)
    ours = [[key, list(t.shape)] for key, t in model.state_dict().items()]
    assert ours == upstream_shapes[arch]


def test_batchnorm_eps_is_upstreams():
    model = build_arcface_model("r18")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(m.eps == 1e-5 for m in norms)


def test_r18_equals_upstream_golden_features_fed_rgb():
    golden = np.load(GOLDEN)
    model = build_arcface_model("r18")
    model.load_state_dict(random_arcface_state_dict("r18", 0), strict=True)
    model.eval()
    images = [np.array(Image.open(DATA / name).convert("RGB")) for name in IMAGE_NAMES]
    rgb = np.stack(images).astype(np.float32).transpose(0, 3, 1, 2)
    x = torch.from_numpy((rgb / np.float32(255) - np.float32(0.5)) / np.float32(0.5))
    with torch.inference_mode():
        embeddings, norms = model(x)
    features = golden["features"]
    expected_norms = np.linalg.norm(features, axis=1, keepdims=True)
    np.testing.assert_allclose(norms.numpy(), expected_norms, rtol=1e-5)
    np.testing.assert_allclose(embeddings.numpy(), features / expected_norms, atol=1e-5, rtol=0)
    # The three inputs are distinct, so a degenerate (constant) net could not pass.
    assert np.abs(features[0] / expected_norms[0] - features[1] / expected_norms[1]).max() > 0.01


def test_loads_backbone_pth_with_and_without_ddp_prefix(tmp_path):
    state = random_arcface_state_dict("r18", 3)
    plain = tmp_path / "backbone.pth"
    torch.save(state, plain)
    ddp = tmp_path / "ddp_backbone.pth"
    torch.save({"module." + k: v for k, v in state.items()}, ddp)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.inference_mode():
        a = load_arcface_backbone(plain, "r18")(x)[0]
        b = load_arcface_backbone(ddp, "r18")(x)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.allclose(a.norm(dim=1), torch.ones(2))


def test_wrong_arch_names_the_key_and_the_arch_that_fits(tmp_path):
    path = tmp_path / "backbone.pth"
    torch.save(random_arcface_state_dict("r34", 0), path)
    with pytest.raises(CheckpointError) as err:
        load_arcface_backbone(path, "r18")
    message = str(err.value)
    assert "not an arcface_torch r18 backbone" in message
    assert "layer1.2." in message
    assert "the weights fit r34" in message


def test_adaface_checkpoint_is_refused_with_a_hint(tmp_path):
    path = save_adaface_checkpoint(random_state_dict("ir_18", 0), tmp_path / "a.ckpt")
    with pytest.raises(CheckpointError, match="use --format adaface"):
        load_arcface_backbone(path, "r18")
