"""AdaFace seed helpers: norms, flip fusion, class counts, input tensors, distributed gather."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "all_gather",
    "dotdict",
    "fuse_features_with_norm",
    "get_local_rank",
    "get_num_class",
    "get_world_size",
    "is_dist_avail_and_initialized",
    "l2_norm",
    "to_input",
]

ArrayT = TypeVar("ArrayT")


class dotdict(dict):
    """A dict whose keys are also attributes; a missing key reads as None, like the seed's."""

    def __getattr__(self, name: str) -> Any:
        # Dunder lookups (copy, pickle) must keep raising, or protocols see None as a hook.
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self.get(name)

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None


def _torch_tensor_type() -> type | None:
    # A tensor can only exist once torch was imported, so numpy callers never pay for torch.
    torch = sys.modules.get("torch")
    return getattr(torch, "Tensor", None)


def _is_tensor(x: object) -> bool:
    tensor_type = _torch_tensor_type()
    return tensor_type is not None and isinstance(x, tensor_type)


def l2_norm(input: ArrayT, axis: int = 1) -> tuple[ArrayT, ArrayT]:
    """Divide `input` by its L2 norm along `axis`; returns (normalised, norm with axis kept).

    Works on torch tensors (torch ops, as the seed) and numpy arrays (numpy only, dtype kept
    for floating input). A zero vector gives NaNs, as in the seed.
    """
    if _is_tensor(input):
        import torch

        norm = torch.norm(input, 2, axis, True)
        return torch.div(input, norm), norm
    x = np.asarray(input)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    # Accumulate in float64 so float32 results match torch's reduction to the last ulp or so.
    norm = np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=axis, keepdims=True))
    norm = norm.astype(x.dtype, copy=False)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = x / norm
    return out, norm


def fuse_features_with_norm(
    stacked_embeddings: ArrayT, stacked_norms: ArrayT
) -> tuple[ArrayT, ArrayT]:
    """Fuse views: l2_norm(sum_i emb_i * norm_i); inputs [n_views, B, C] and [n_views, B, 1].

    Returns (fused [B, C], fused_norm [B, 1]) of the input's type (numpy or torch).
    """
    emb_is_tensor, norm_is_tensor = _is_tensor(stacked_embeddings), _is_tensor(stacked_norms)
    if emb_is_tensor != norm_is_tensor:
        raise TypeError("stacked_embeddings and stacked_norms must both be numpy or both torch")
    if not emb_is_tensor:
        stacked_embeddings = np.asarray(stacked_embeddings)
        stacked_norms = np.asarray(stacked_norms)
    # Raised explicitly (not `assert`) so the checks survive `python -O`.
    if stacked_embeddings.ndim != 3:
        raise AssertionError(
            "stacked_embeddings must be (n_features_to_fuse, batch_size, channel), "
            f"got ndim {stacked_embeddings.ndim}"
        )
    if stacked_norms.ndim != 3:
        raise AssertionError(
            "stacked_norms must be (n_features_to_fuse, batch_size, 1), "
            f"got ndim {stacked_norms.ndim}"
        )
    pre_norm_embeddings = stacked_embeddings * stacked_norms
    fused = pre_norm_embeddings.sum(0)
    return l2_norm(fused, axis=1)


# Substring of the lower-cased train_data_path -> (classes, classes with train_data_subset).
# None for the subset means the dataset has no subset variant.
_DATASET_CLASSES: tuple[tuple[str, str, int, int | None], ...] = (
    ("faces_emore", "MS1MV2", 85742, 70722),
    ("ms1m-retinaface-t1", "MS1MV3", 93431, None),
    ("faces_vgg_112x112", "VGGFace2", 9131, None),
    ("faces_webface_112x112", "CASIA-WebFace", 10572, None),
    ("webface4m", "WebFace4M", 205990, None),
    ("webface12m", "WebFace12M", 617970, None),
    ("webface42m", "WebFace42M", 2059906, None),
)


def get_num_class(hparams: Any) -> int:
    """Number of identities of the training set named by `hparams.train_data_path`.

    `hparams.custom_num_class != -1` wins; `train_data_subset` is only valid for MS1MV2.
    """
    if hparams.custom_num_class != -1:
        return hparams.custom_num_class
    path = hparams.train_data_path.lower()
    for key, name, full, subset in _DATASET_CLASSES:
        if key in path:
            if hparams.train_data_subset:
                if subset is None:
                    raise AssertionError(f"train_data_subset is not defined for {name}")
                return subset
            return full
    raise ValueError("Check your train_data_path", hparams.train_data_path)


def to_input(pil_rgb_image: Any) -> torch.Tensor:
    """RGB image (PIL or HxWx3 uint8) -> float32 tensor [1,3,H,W], BGR, (x/255 - 0.5) / 0.5."""
    import torch

    rgb = np.asarray(pil_rgb_image)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape HxWx3, got shape {rgb.shape}")
    # float64 arithmetic then one cast to float32, the same rounding as the seed.
    bgr = ((rgb[:, :, ::-1] / 255.0) - 0.5) / 0.5
    chw = np.ascontiguousarray(bgr.transpose(2, 0, 1)[None])
    return torch.from_numpy(chw).float()


def is_dist_avail_and_initialized() -> bool:
    """True when torch.distributed is available and a process group is initialised."""
    # No torch in the process means no process group: answer without importing torch.
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Processes in the default group (1 when not distributed)."""
    if not is_dist_avail_and_initialized():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def get_local_rank() -> int:
    """This process's rank on its node: $LOCAL_RANK (set by torchrun), 0 when not distributed.

    Falls back to the global rank when LOCAL_RANK is unset (a single-node launch).
    """
    if not is_dist_avail_and_initialized():
        return 0
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None:
        import torch.distributed as dist

        return dist.get_rank()
    return int(local_rank)


def all_gather(data: Any) -> list[Any]:
    """Gather picklable `data` from every rank; returns one entry per rank, in rank order."""
    world_size = get_world_size()
    if world_size == 1:
        return [data]
    import torch.distributed as dist

    # all_gather_object pickles and pads for us and runs on any backend (gloo on CPU too),
    # unlike the seed's CUDA byte-tensor exchange.
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, data)
    return gathered
