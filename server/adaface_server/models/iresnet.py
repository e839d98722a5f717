"""IR and IR-SE (iResNet) backbones whose state_dict keys match upstream AdaFace's net.py."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Every name upstream's net.py defines a constructor for (IR_18 ... IR_SE_200). Upstream's own
# build_model() accepts only ir_18/34/50/101 and ir_se_50; the others are in net.py unreachable
# by name, but released or self-trained checkpoints may use them.
ARCHS: tuple[str, ...] = (
    "ir_18",
    "ir_34",
    "ir_50",
    "ir_101",
    "ir_152",
    "ir_200",
    "ir_se_50",
    "ir_se_101",
    "ir_se_152",
    "ir_se_200",
)

EMBEDDING_DIM = 512
INPUT_SIZE = 112

# (in_channels, depth, units) per stage; the first unit of a stage has stride 2.
_BASIC_STAGES: dict[int, tuple[tuple[int, int, int], ...]] = {
    18: ((64, 64, 2), (64, 128, 2), (128, 256, 2), (256, 512, 2)),
    34: ((64, 64, 3), (64, 128, 4), (128, 256, 6), (256, 512, 3)),
    50: ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3)),
    # Upstream names this depth 100 internally although the arch is called ir_101.
    100: ((64, 64, 3), (64, 128, 13), (128, 256, 30), (256, 512, 3)),
}
_BOTTLENECK_STAGES: dict[int, tuple[tuple[int, int, int], ...]] = {
    152: ((64, 256, 3), (256, 512, 8), (512, 1024, 36), (1024, 2048, 3)),
    200: ((64, 256, 3), (256, 512, 24), (512, 1024, 36), (1024, 2048, 3)),
}
_DEPTH_OF_ARCH = {"18": 18, "34": 34, "50": 50, "101": 100, "152": 152, "200": 200}


class Flatten(nn.Module):
    """Flattens all but the batch dimension; works on channels_last tensors too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Upstream uses .view, which raises on channels_last inputs; flatten copies only if needed.
        return torch.flatten(x, 1)


class Subsample(nn.Module):
    """Strided spatial subsampling, identical to upstream's MaxPool2d(1, stride) shortcut."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A 1x1 max-pool is a pure strided pick; slicing avoids the pooling kernel and the copy.
        return x[:, :, :: self.stride, :: self.stride]


class SEModule(nn.Module):
    """Squeeze-and-excitation gate (keys fc1/fc2, both bias-free 1x1 convs)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * gate


def _shortcut(in_channels: int, depth: int, stride: int) -> nn.Module:
    if in_channels == depth:
        return Subsample(stride) if stride != 1 else nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, depth, (1, 1), stride, bias=False),
        nn.BatchNorm2d(depth),
    )


class BasicBlockIR(nn.Module):
    """Pre-activation basic residual unit (BN-conv-BN-PReLU-conv-BN [+SE]) + shortcut."""

    def __init__(self, in_channels: int, depth: int, stride: int, use_se: bool = False) -> None:
        super().__init__()
        self.shortcut_layer = _shortcut(in_channels, depth, stride)
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, (3, 3), (1, 1), 1, bias=False),
            nn.BatchNorm2d(depth),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        )
        if use_se:
            self.res_layer.add_module("se_block", SEModule(depth, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class BottleneckIR(nn.Module):
    """Bottleneck residual unit used by the 152/200-layer variants."""

    def __init__(self, in_channels: int, depth: int, stride: int, use_se: bool = False) -> None:
        super().__init__()
        mid = depth // 4
        self.shortcut_layer = _shortcut(in_channels, depth, stride)
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, mid, (1, 1), (1, 1), 0, bias=False),
            nn.BatchNorm2d(mid),
            nn.PReLU(mid),
            nn.Conv2d(mid, mid, (3, 3), (1, 1), 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.PReLU(mid),
            nn.Conv2d(mid, depth, (1, 1), stride, 0, bias=False),
            nn.BatchNorm2d(depth),
        )
        if use_se:
            self.res_layer.add_module("se_block", SEModule(depth, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class Backbone(nn.Module):
    """IR backbone for 112x112 inputs returning (L2-normalised embedding, its norm)."""

    def __init__(self, depth: int, use_se: bool = False) -> None:
        super().__init__()
        if depth in _BASIC_STAGES:
            stages: Sequence[tuple[int, int, int]] = _BASIC_STAGES[depth]
            unit: type[nn.Module] = BasicBlockIR
            out_channels = 512
        elif depth in _BOTTLENECK_STAGES:
            stages = _BOTTLENECK_STAGES[depth]
            unit = BottleneckIR
            out_channels = 2048
        else:
            raise ValueError(f"unsupported IR depth {depth}")
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, 64, (3, 3), 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)
        )
        # Registered before body so state_dict() lists keys in upstream's order.
        spatial = INPUT_SIZE // 16
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(out_channels),
            nn.Dropout(0.4),
            Flatten(),
            nn.Linear(out_channels * spatial * spatial, EMBEDDING_DIM),
            nn.BatchNorm1d(EMBEDDING_DIM, affine=False),
        )
        units: list[nn.Module] = []
        for in_channels, stage_depth, count in stages:
            units.append(unit(in_channels, stage_depth, 2, use_se))
            units.extend(unit(stage_depth, stage_depth, 1, use_se) for _ in range(count - 1))
        self.body = nn.Sequential(*units)

    def unnormalised(self, x: torch.Tensor) -> torch.Tensor:
        """The 512-d features before L2 normalisation."""
        return self.output_layer(self.body(self.input_layer(x)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.unnormalised(x)
        norm = torch.norm(x, 2, 1, True)
        return torch.div(x, norm), norm


def build_model(arch: str) -> Backbone:
    """Build an untrained backbone by AdaFace arch name (see ARCHS)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid names: {', '.join(ARCHS)}")
    use_se = arch.startswith("ir_se_")
    return Backbone(_DEPTH_OF_ARCH[arch.rsplit("_", 1)[1]], use_se=use_se)
