"""adaface_client.utils against the AdaFace seed's formulas, on numpy and torch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from adaface_client.utils import (
    all_gather,
    dotdict,
    fuse_features_with_norm,
    get_local_rank,
    get_num_class,
    get_world_size,
    is_dist_avail_and_initialized,
    l2_norm,
    to_input,
)


def _seed_l2_norm(x: torch.Tensor, axis: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    norm = torch.norm(x, 2, axis, True)
    return torch.div(x, norm), norm


def _seed_fuse(emb: torch.Tensor, norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _seed_l2_norm((emb * norms).sum(dim=0), axis=1)


def test_dotdict_attribute_access_like_the_seed() -> None:
    d = dotdict({"a": 1})
    d.b = 2
    assert d.a == 1 and d["b"] == 2
    assert d.missing is None
    del d.a
    assert "a" not in d
    with pytest.raises(AttributeError):
        del d.a
    # Dunder lookups must not read as None, or copy/pickle would break.
    import copy
    import pickle

    assert copy.deepcopy(d) == d
    assert pickle.loads(pickle.dumps(d)) == d


@pytest.mark.parametrize("axis", [0, 1])
def test_l2_norm_matches_seed_on_torch_and_numpy(axis: int) -> None:
    x = torch.randn(7, 512, generator=torch.Generator().manual_seed(0)) * 3
    ref_out, ref_norm = _seed_l2_norm(x, axis)

    t_out, t_norm = l2_norm(x, axis=axis)
    assert isinstance(t_out, torch.Tensor) and isinstance(t_norm, torch.Tensor)
    assert torch.equal(t_out, ref_out) and torch.equal(t_norm, ref_norm)

    n_out, n_norm = l2_norm(x.numpy(), axis=axis)
    assert isinstance(n_out, np.ndarray) and n_out.dtype == np.float32
    assert n_norm.dtype == np.float32 and n_norm.shape == tuple(ref_norm.shape)
    np.testing.assert_allclose(n_out, ref_out.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(n_norm, ref_norm.numpy(), rtol=1e-6)


def test_l2_norm_float64_and_int_numpy() -> None:
    out, norm = l2_norm(np.array([[3.0, 4.0]]))
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [[0.6, 0.8]])
    np.testing.assert_array_equal(norm, [[5.0]])
    out, norm = l2_norm(np.array([[3, 4]]))
    assert out.dtype == np.float64 and norm[0, 0] == 5.0


def test_fuse_features_matches_seed() -> None:
    g = torch.Generator().manual_seed(1)
    emb, _ = _seed_l2_norm(torch.randn(2, 5, 512, generator=g), axis=2)
    norms = torch.rand(2, 5, 1, generator=g) * 20 + 1
    ref_fused, ref_norm = _seed_fuse(emb, norms)

    t_fused, t_norm = fuse_features_with_norm(emb, norms)
    assert torch.equal(t_fused, ref_fused) and torch.equal(t_norm, ref_norm)

    n_fused, n_norm = fuse_features_with_norm(emb.numpy(), norms.numpy())
    assert n_fused.dtype == np.float32 and n_norm.dtype == np.float32
    assert n_fused.shape == (5, 512) and n_norm.shape == (5, 1)
    np.testing.assert_allclose(n_fused, ref_fused.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(n_norm, ref_norm.numpy(), rtol=1e-5)


def test_fuse_features_asserts_like_seed() -> None:
    with pytest.raises(AssertionError, match="stacked_embeddings"):
        fuse_features_with_norm(np.zeros((5, 512), np.float32), np.zeros((2, 5, 1), np.float32))
    with pytest.raises(AssertionError, match="stacked_norms"):
        fuse_features_with_norm(np.zeros((2, 5, 512), np.float32), np.zeros((2, 5), np.float32))
    with pytest.raises(TypeError, match="both"):
        fuse_features_with_norm(torch.zeros(2, 5, 512), np.zeros((2, 5, 1), np.float32))


def test_numpy_paths_do_not_import_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        from adaface_client.utils import fuse_features_with_norm, l2_norm, get_world_size
        e = np.ones((2, 3, 4), np.float32)
        n = np.ones((2, 3, 1), np.float32)
        f, fn = fuse_features_with_norm(e, n)
        assert f.dtype == np.float32 and fn.dtype == np.float32
        l2_norm(e[0])
        assert get_world_size() == 1
        assert "torch" not in sys.modules, "torch was imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


_CLASSES = [
    ("/data/faces_emore", False, 85742),
    ("/data/FACES_EMORE/train", True, 70722),
    ("/data/ms1m-retinaface-t1", False, 93431),
    ("/data/faces_vgg_112x112", False, 9131),
    ("/data/faces_webface_112x112", False, 10572),
    ("/data/WebFace4M", False, 205990),
    ("/data/webface12m", False, 617970),
    ("/data/webface42m", False, 2059906),
]


@pytest.mark.parametrize(("path", "subset", "expected"), _CLASSES)
def test_get_num_class_every_dataset(path: str, subset: bool, expected: int) -> None:
    hparams = dotdict(custom_num_class=-1, train_data_path=path, train_data_subset=subset)
    assert get_num_class(hparams) == expected


@pytest.mark.parametrize("path", [p for p, subset, _ in _CLASSES if "emore" not in p.lower()])
def test_get_num_class_subset_only_for_ms1mv2(path: str) -> None:
    hparams = dotdict(custom_num_class=-1, train_data_path=path, train_data_subset=True)
    with pytest.raises(AssertionError):
        get_num_class(hparams)


def test_get_num_class_custom_and_unknown() -> None:
    custom = dotdict(custom_num_class=42, train_data_path="/nowhere", train_data_subset=True)
    assert get_num_class(custom) == 42
    unknown = dotdict(custom_num_class=-1, train_data_path="/data/mystery", train_data_subset=False)
    with pytest.raises(ValueError, match="Check your train_data_path") as info:
        get_num_class(unknown)
    assert info.value.args == ("Check your train_data_path", "/data/mystery")


def test_to_input_matches_seed() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
    img = Image.fromarray(rgb, "RGB")
    # The seed: torch.tensor([bgr.transpose(2,0,1)]).float() of ((rgb[..., ::-1]/255)-0.5)/0.5
    bgr = ((np.array(img)[:, :, ::-1] / 255.0) - 0.5) / 0.5
    ref = torch.tensor(np.array([bgr.transpose(2, 0, 1)])).float()
    out = to_input(img)
    assert out.shape == (1, 3, 112, 112) and out.dtype == torch.float32
    assert out.is_contiguous()
    assert torch.equal(out, ref)
    # channel 0 is blue
    assert out[0, 0, 0, 0].item() == pytest.approx(rgb[0, 0, 2] / 127.5 - 1, abs=1e-6)
    with pytest.raises(ValueError, match="HxWx3"):
        to_input(np.zeros((112, 112), np.uint8))


def test_distributed_helpers_single_process() -> None:
    assert not is_dist_avail_and_initialized()
    assert get_world_size() == 1
    assert get_local_rank() == 0
    payload = {"a": [1, 2, 3]}
    gathered = all_gather(payload)
    assert gathered == [payload] and gathered[0] is payload


_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch.distributed as dist
    from adaface_client.utils import (
        all_gather, get_local_rank, get_world_size, is_dist_avail_and_initialized)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method=sys.argv[1], rank=rank, world_size=2)
    try:
        assert is_dist_avail_and_initialized()
        # Different sizes per rank: the gather must not depend on equal payloads.
        data = {"rank": rank, "text": "x" * (1 + 5000 * rank), "local": get_local_rank()}
        out = all_gather(data)
        print(json.dumps({"world": get_world_size(), "out": out}))
    finally:
        dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_gather_two_processes_gloo() -> None:
    init = f"tcp://127.0.0.1:{_free_port()}"
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        env.pop("MASTER_ADDR", None)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _WORKER, init],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        finally:
            p.kill()
        assert p.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    expected = [{"rank": r, "text": "x" * (1 + 5000 * r), "local": r} for r in range(2)]
    for result in outputs:
        assert result["world"] == 2
        assert result["out"] == expected
