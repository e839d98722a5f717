"""Checkpoint formats the exporter reads: how to build, load and feed each family of nets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adaface_server.models.arcface_iresnet import (
    ARCFACE_ARCHS,
    build_arcface_model,
    load_arcface_backbone,
    random_arcface_state_dict,
)
from adaface_server.models.checkpoint import load_backbone, random_state_dict
from adaface_server.models.iresnet import ARCHS, build_model
from adaface_server.models.repository import input_contract


@dataclass(frozen=True)
class ModelFormat:
    """One checkpoint family: its arch names, constructors and input channel order."""

    name: str
    archs: tuple[str, ...]
    default_arch: str
    channel_order: str  # "BGR" or "RGB": what the trained net expects in INPUT__0
    name_prefix: str  # default model name = prefix + arch without underscores
    build: Callable[[str], nn.Module]
    load: Callable[[Path, str], nn.Module]
    random_weights: Callable[[str, int], dict[str, torch.Tensor]]
    checkpoint_help: str

    def check_arch(self, arch: str) -> None:
        """ValueError naming the valid archs when arch is not one of this format's."""
        if arch not in self.archs:
            raise ValueError(
                f"unknown {self.name} arch {arch!r}; valid names: {', '.join(self.archs)}"
            )

    def input_contract(self) -> dict[str, str]:
        """The metadata.json "input" entry of models exported from this format."""
        return input_contract(self.channel_order)

    def preprocessing(self, input_dtype: str = "fp32") -> dict[str, object]:
        """The human-readable metadata.json "preprocessing" entry; with input_dtype "uint8"
        the scaling happens inside the exported model, which takes the pixels as uint8."""
        order = self.channel_order
        to_order = "" if order == "RGB" else f" -> {order}"
        if input_dtype == "uint8":
            steps = "uint8 NCHW (the model applies (x / 255 - 0.5) / 0.5 itself)"
        else:
            steps = "(x / 255 - 0.5) / 0.5 -> float32 NCHW"
        return {
            "description": f"aligned 112x112 RGB face{to_order} -> {steps}",
            "color_order": order,
            "scale": "(x / 255 - 0.5) / 0.5",
            "scaled_by": "model" if input_dtype == "uint8" else "server",
            "layout": "NCHW",
            "height": 112,
            "width": 112,
            "dtype": "uint8" if input_dtype == "uint8" else "float32",
        }

    def default_model_name(self, arch: str) -> str:
        """e.g. adaface ir_50 -> adaface_ir50, arcface_torch r100 -> arcface_r100."""
        return self.name_prefix + arch.replace("_", "")


ADAFACE = ModelFormat(
    name="adaface",
    archs=ARCHS,
    default_arch="ir_50",
    channel_order="BGR",
    name_prefix="adaface_",
    build=build_model,
    load=load_backbone,
    random_weights=random_state_dict,
    checkpoint_help="AdaFace .ckpt (Lightning, model.* keys) or backbone .pth",
)
ARCFACE_TORCH = ModelFormat(
    name="arcface_torch",
    archs=ARCFACE_ARCHS,
    default_arch="r50",
    channel_order="RGB",
    name_prefix="arcface_",
    build=build_arcface_model,
    load=load_arcface_backbone,
    random_weights=random_arcface_state_dict,
    checkpoint_help="InsightFace arcface_torch backbone.pth (plain state_dict, iresnet)",
)
FORMATS: dict[str, ModelFormat] = {f.name: f for f in (ADAFACE, ARCFACE_TORCH)}


def get_format(name: str) -> ModelFormat:
    """The format called name, or ValueError listing the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unknown checkpoint format {name!r}; valid: {', '.join(FORMATS)}"
        ) from None
