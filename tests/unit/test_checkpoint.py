"""Checkpoint loading: AdaFace/plain layouts, safe unpickling, and every error message."""

from __future__ import annotations

import argparse
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from adaface_server.models.checkpoint import (
    CheckpointError,
    UnpickledObject,
    guess_arch,
    load_backbone,
    load_backbone_state_dict,
    random_state_dict,
    read_checkpoint,
    save_adaface_checkpoint,
)
from adaface_server.models.iresnet import build_model


@pytest.fixture(scope="module")
def ir18_weights() -> dict[str, torch.Tensor]:
    return random_state_dict("ir_18", 0)


class AttributeDict(dict):
    """Stand-in for pytorch_lightning's AttributeDict (a dict subclass outside any allowlist)."""


class WritesMarker:
    """Unpickling this with a normal unpickler would create (truncate) the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_adaface_checkpoint_has_the_lightning_layout(ir18_checkpoint):
    ckpt = torch.load(ir18_checkpoint, map_location="cpu", weights_only=True)
    assert {
        "state_dict",
        "epoch",
        "global_step",
        "pytorch-lightning_version",
        "hyper_parameters",
    } <= set(ckpt)
    keys = list(ckpt["state_dict"])
    assert keys[0] == "model.input_layer.0.weight"
    assert "head.kernel" in keys
    assert all(k.startswith(("model.", "head.")) for k in keys)
    assert ckpt["hyper_parameters"]["arch"] == "ir_18"


def test_lightning_checkpoint_strips_model_prefix_and_skips_head(ir18_checkpoint, ir18_weights):
    state = load_backbone_state_dict(ir18_checkpoint)
    assert list(state) == list(ir18_weights)
    assert all(torch.equal(state[k], ir18_weights[k]) for k in state)


def test_load_backbone_is_strict_eval_and_matches_upstream_golden(ir18_checkpoint, golden_ir18):
    model = load_backbone(ir18_checkpoint, "ir_18")
    assert not model.training
    with torch.inference_mode():
        embedding, norm = model(golden_ir18["inputs"])
    assert (embedding - golden_ir18["embeddings"]).abs().max().item() <= 1e-5
    torch.testing.assert_close(norm, golden_ir18["norms"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("wrapped", [False, True])
def test_plain_backbone_state_dict_loads(tmp_path, ir18_weights, wrapped):
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": ir18_weights} if wrapped else ir18_weights, path)
    state = load_backbone_state_dict(path)
    assert list(state) == list(ir18_weights)
    load_backbone(path, "ir_18")


def test_hyper_parameters_with_foreign_classes_load_without_running_them(
    tmp_path, ir18_checkpoint, ir18_weights
):
    marker_open, marker_shell = tmp_path / "opened", tmp_path / "shell"
    ckpt = torch.load(ir18_checkpoint, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"] = AttributeDict(
        arch="ir_18", lr=0.1, payload=WritesMarker(marker_open)
    )
    ckpt["hparams_namespace"] = argparse.Namespace(arch="ir_18", head="adaface")
    ckpt["callbacks"] = {"evil": RunsShell(marker_shell)}
    path = tmp_path / "lightning.ckpt"
    torch.save(ckpt, path)
    # The safe default loader refuses this file, which is why the restricted fallback exists.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)

    loaded = read_checkpoint(path)
    assert not marker_open.exists() and not marker_shell.exists()
    hparams = loaded["hyper_parameters"]
    assert isinstance(hparams, UnpickledObject)
    assert hparams.pickle_global.endswith("test_checkpoint.AttributeDict")
    assert hparams["arch"] == "ir_18" and hparams["lr"] == 0.1
    assert isinstance(hparams["payload"], UnpickledObject)
    assert hparams["payload"].pickle_global in ("io.open", "builtins.open")
    assert loaded["hparams_namespace"]["head"] == "adaface"
    state = load_backbone_state_dict(path)
    assert all(torch.equal(state[k], ir18_weights[k]) for k in ir18_weights)
    assert not marker_open.exists() and not marker_shell.exists()


def test_legacy_format_is_also_restricted(tmp_path, ir18_weights):
    marker = tmp_path / "legacy_marker"
    path = tmp_path / "legacy.ckpt"
    payload = {
        "state_dict": {"model." + k: v for k, v in ir18_weights.items()},
        "x": RunsShell(marker),
    }
    torch.save(payload, path, _use_new_zipfile_serialization=False)
    state = load_backbone_state_dict(path)
    assert list(state) == list(ir18_weights)
    assert not marker.exists()


def test_globals_of_missing_modules_are_never_imported(tmp_path, ir18_weights):
    class Foreign:
        pass

    Foreign.__module__ = "no_such_package_xyz"
    Foreign.__qualname__ = Foreign.__name__ = "Thing"
    import sys
    import types

    fake = types.ModuleType("no_such_package_xyz")
    fake.Thing = Foreign
    sys.modules["no_such_package_xyz"] = fake
    try:
        path = tmp_path / "foreign.ckpt"
        torch.save(
            {"state_dict": {"model." + k: v for k, v in ir18_weights.items()}, "f": Foreign()}, path
        )
    finally:
        del sys.modules["no_such_package_xyz"]
    loaded = read_checkpoint(path)
    assert loaded["f"].pickle_global == "no_such_package_xyz.Thing"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.ckpt"
    with pytest.raises(CheckpointError) as err:
        load_backbone(path, "ir_18")
    assert str(err.value) == f"checkpoint {path} does not exist"


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_backbone_state_dict(tmp_path)
    assert str(err.value) == f"checkpoint {tmp_path} is not a file"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "the file is empty"),
        (b"hello, this is text\n", "neither a zip archive nor a pickle (starts with b'hello, t')"),
        (b"\x89PNG\r\n\x1a\n0000", "neither a zip archive nor a pickle"),
    ],
)
def test_non_checkpoint_files(tmp_path, content, reason):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_backbone_state_dict(path)
    assert str(err.value).startswith(f"{path} is not a readable PyTorch checkpoint: {reason}")


def test_random_bytes_that_look_like_a_pickle(tmp_path):
    path = tmp_path / "noise.ckpt"
    path.write_bytes(b"\x80\x02" + bytes(range(256)) * 8)
    with pytest.raises(CheckpointError) as err:
        load_backbone_state_dict(path)
    assert str(err.value).startswith(f"{path} is not a readable PyTorch checkpoint: ")


def test_truncated_checkpoint(tmp_path, ir18_checkpoint):
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(ir18_checkpoint.read_bytes()[:200_000])
    with pytest.raises(CheckpointError) as err:
        load_backbone_state_dict(path)
    message = str(err.value)
    assert message.startswith(f"{path} is not a readable PyTorch checkpoint: RuntimeError: ")
    assert "zip archive" in message


def test_torchscript_file_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.jit.script(nn.Linear(2, 2)).save(str(path))
    with pytest.raises(CheckpointError) as err:
        load_backbone_state_dict(path)
    assert str(err.value) == (
        f"{path} is a TorchScript model, not a checkpoint: pass the AdaFace .ckpt/.pth file"
    )


def test_non_dict_checkpoint(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError) as err:
        load_backbone_state_dict(path)
    assert str(err.value) == f"{path} holds a list, not a checkpoint dict or state_dict"


def test_checkpoint_without_backbone_keys(tmp_path):
    path = tmp_path / "head_only.ckpt"
    torch.save({"state_dict": OrderedDict([("head.kernel", torch.zeros(512, 4))])}, path)
    with pytest.raises(CheckpointError) as err:
        load_backbone_state_dict(path)
    assert str(err.value) == (
        f"{path} has no backbone weights: expected keys starting with 'model.' (AdaFace "
        "Lightning .ckpt) or unprefixed backbone keys (input_layer.*, body.*, output_layer.*); "
        "found 1 tensors (head.kernel)"
    )


def test_wrong_arch_names_first_mismatching_key_with_both_shapes(ir18_checkpoint):
    with pytest.raises(CheckpointError) as err:
        load_backbone(ir18_checkpoint, "ir_50")
    assert str(err.value) == (
        f"checkpoint {ir18_checkpoint} does not match ir_50: body.2.res_layer.1.weight has "
        "shape (128, 64, 3, 3) in the checkpoint but (64, 64, 3, 3) in ir_50 "
        "(72 shape mismatches, 306 missing keys, 18 unexpected keys); the weights fit ir_18"
    )


def test_missing_key_is_named(tmp_path, ir18_weights):
    weights = dict(ir18_weights)
    del weights["output_layer.3.bias"]
    path = save_adaface_checkpoint(weights, tmp_path / "missing_key.ckpt")
    with pytest.raises(CheckpointError) as err:
        load_backbone(path, "ir_18")
    assert str(err.value) == (
        f"checkpoint {path} does not match ir_18: output_layer.3.bias is missing from the "
        "checkpoint (0 shape mismatches, 1 missing keys, 0 unexpected keys)"
    )


def test_unexpected_key_is_named(tmp_path, ir18_weights):
    weights = dict(ir18_weights, **{"body.99.res_layer.0.weight": torch.zeros(3)})
    path = save_adaface_checkpoint(weights, tmp_path / "extra_key.ckpt")
    with pytest.raises(CheckpointError) as err:
        load_backbone(path, "ir_18")
    assert str(err.value) == (
        f"checkpoint {path} does not match ir_18: body.99.res_layer.0.weight in the checkpoint "
        "is not a key of ir_18 (0 shape mismatches, 0 missing keys, 1 unexpected keys)"
    )


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_guess_arch(ir18_weights):
    assert guess_arch(ir18_weights) == "ir_18"
    assert guess_arch({"x": torch.zeros(1)}) is None


def test_saved_checkpoint_loads_into_fresh_model_bit_exactly(tmp_path):
    weights = random_state_dict("ir_se_50", 3)
    path = save_adaface_checkpoint(weights, tmp_path / "se.ckpt", num_classes=5, arch="ir_se_50")
    model = load_backbone(path, "ir_se_50")
    reference = build_model("ir_se_50")
    reference.load_state_dict(weights)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key
    assert torch.load(path, weights_only=True)["state_dict"]["head.kernel"].shape == (512, 5)
