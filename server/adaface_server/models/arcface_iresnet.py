"""InsightFace arcface_torch iResNets (r18/r34/r50/r100) with its key names, and their loading.

arcface_torch trains ``backbones/iresnet.py`` and saves ``backbone.pth``: a plain state_dict
(keys ``conv1``, ``bn1``, ``prelu``, ``layer1..4.<i>.{bn1,conv1,bn2,prelu,conv2,bn3,
downsample.0,downsample.1}``, ``bn2``, ``fc``, ``features``), sometimes with DDP's
``module.`` prefix. Its net returns the raw 512-d feature; ours returns the served contract
(L2-normalised embedding, its norm) like the AdaFace backbone. Its input is RGB in
``(x/255 - 0.5)/0.5``, where AdaFace's is BGR.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from adaface_server.models.checkpoint import CheckpointError, read_checkpoint, seeded_weights
from adaface_server.models.iresnet import EMBEDDING_DIM, INPUT_SIZE, Flatten

ARCFACE_ARCHS: tuple[str, ...] = ("r18", "r34", "r50", "r100")
_DEPTHS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
}
_WIDTHS = (64, 128, 256, 512)
_EPS = 1e-5
DDP_PREFIX = "module."


class IBasicBlock(nn.Module):
    """BN-conv3x3-BN-PReLU-conv3x3(stride)-BN branch plus an identity or 1x1-conv shortcut."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=_EPS)
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width, eps=_EPS)
        self.prelu = nn.PReLU(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width, eps=_EPS)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != width:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, width, 1, stride, bias=False),
                nn.BatchNorm2d(width, eps=_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + self.downsample(x)


class ArcFaceIResNet(nn.Module):
    """arcface_torch IResNet for 112x112 RGB inputs returning (unit embedding, its norm)."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        if arch not in _DEPTHS:
            raise ValueError(
                f"unknown arcface_torch arch {arch!r}; valid names: {', '.join(ARCFACE_ARCHS)}"
            )
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=_EPS)
        self.prelu = nn.PReLU(64)
        in_channels = 64
        for index, (width, count) in enumerate(zip(_WIDTHS, _DEPTHS[arch], strict=True), start=1):
            blocks = [IBasicBlock(in_channels, width, 2)]
            blocks.extend(IBasicBlock(width, width, 1) for _ in range(count - 1))
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
            in_channels = width
        spatial = INPUT_SIZE // 16
        self.bn2 = nn.BatchNorm2d(512, eps=_EPS)
        # Upstream's dropout (p=0 by default, identity in eval) is left out: it has no weights.
        self.flatten = Flatten()
        self.fc = nn.Linear(512 * spatial * spatial, EMBEDDING_DIM)
        self.features = nn.BatchNorm1d(EMBEDDING_DIM, eps=_EPS)

    def unnormalised(self, x: torch.Tensor) -> torch.Tensor:
        """The 512-d features before L2 normalisation (upstream's output)."""
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(self.flatten(self.bn2(x))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.unnormalised(x)
        norm = torch.norm(x, 2, 1, True)
        return torch.div(x, norm), norm


def build_arcface_model(arch: str) -> ArcFaceIResNet:
    """An untrained arcface_torch iResNet by arch name (r18, r34, r50, r100)."""
    return ArcFaceIResNet(arch)


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(d) for d in v.shape) for k, v in state.items()}


def arcface_state_dict_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of arch's state_dict, in order (built on the meta device)."""
    with torch.device("meta"):
        return _shapes(build_arcface_model(arch).state_dict())


def load_arcface_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """The tensors of an arcface_torch backbone.pth, DDP's ``module.`` prefix removed."""
    path = Path(path)
    obj = read_checkpoint(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith(DDP_PREFIX) for k in tensors):
        tensors = {k[len(DDP_PREFIX) :]: v for k, v in tensors.items()}
    return tensors


def check_arcface_state_dict(
    state_dict: Mapping[str, torch.Tensor], arch: str, source: str = "checkpoint"
) -> None:
    """Raise CheckpointError naming the first key that keeps a strict load from working."""
    expected = arcface_state_dict_shapes(arch)
    found = _shapes(state_dict)
    if found == expected:
        return
    problems = [
        f"{k} has shape {found[k]} in the checkpoint but {shape} in {arch}"
        for k, shape in expected.items()
        if k in found and found[k] != shape
    ]
    problems += [f"{k} is missing from the checkpoint" for k in expected if k not in found]
    problems += [
        f"{k} in the checkpoint is not a key of {arch}" for k in found if k not in expected
    ]
    fits = [a for a in ARCFACE_ARCHS if a != arch and arcface_state_dict_shapes(a) == found]
    hint = f"; the weights fit {fits[0]}" if fits else ""
    if any(k.startswith(("model.", "input_layer.", "body.")) for k in found):
        hint += "; this looks like an AdaFace checkpoint: use --format adaface"
    raise CheckpointError(
        f"{source} is not an arcface_torch {arch} backbone: {problems[0]} "
        f"({len(problems)} problems){hint}"
    )


def load_arcface_backbone(path: Path | str, arch: str) -> ArcFaceIResNet:
    """Build arch, load backbone.pth strictly, and return it in eval mode."""
    model = build_arcface_model(arch)
    state_dict = load_arcface_state_dict(path)
    check_arcface_state_dict(state_dict, arch, source=f"checkpoint {path}")
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def random_arcface_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random weights in backbone.pth layout (same bytes on every machine).

    Scales as checkpoint.random_state_dict: He-normal convs/fc, BN weights near 1 (0.1 on
    each block's last BN so activations stay finite without trained statistics), running
    variances in [0.5, 1.5], PReLU 0.25; ``features.weight`` is exactly 1 as upstream freezes it.
    """
    with torch.device("meta"):
        model = build_arcface_model(arch)
    return seeded_weights(model, seed, _is_branch_end, ones=frozenset({"features"}))


def _is_branch_end(bn_name: str) -> bool:
    return bn_name.endswith(".bn3")  # each block's last BN
