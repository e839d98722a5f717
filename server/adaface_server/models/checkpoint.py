"""Safe loading of AdaFace checkpoints (Lightning .ckpt or plain .pth) into IR backbones."""

from __future__ import annotations

import _codecs
import math
import os
import pickle
import tempfile
import types
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adaface_server.models.iresnet import ARCHS, EMBEDDING_DIM, build_model

MODEL_PREFIX = "model."
# Roots of an unprefixed backbone state_dict (a plain .pth saved from model.state_dict()).
_BACKBONE_ROOTS = ("input_layer.", "body.", "output_layer.")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the requested arch."""


# --------------------------------------------------------------------------- restricted pickle


class UnpickledObject(dict):
    """Inert stand-in for any pickled global outside the allowlist (never imported or called).

    It is a dict so that dict subclasses (Lightning's AttributeDict, AdaFace's dotdict) keep
    their items, and it keeps object state (argparse.Namespace attributes) as items too.
    """

    pickle_global = "?"
    __hash__ = object.__hash__  # dict is unhashable; placeholders may be used as keys

    def __new__(cls, *args: Any, **kwargs: Any) -> UnpickledObject:
        return dict.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Constructor arguments are recorded, never interpreted.
        self.__dict__["pickled_args"] = args

    def __setstate__(self, state: Any) -> None:
        parts = state if isinstance(state, tuple) else (state,)
        for part in parts:
            if isinstance(part, Mapping):
                self.update(part)
            elif part is not None:
                self.__dict__["pickled_state"] = part

    def append(self, item: Any) -> None:
        self.__dict__.setdefault("pickled_items", []).append(item)

    def extend(self, items: Any) -> None:
        self.__dict__.setdefault("pickled_items", []).extend(items)

    def __repr__(self) -> str:
        return f"<unpickled {self.pickle_global} {dict(self)!r}>"


@cache
def _placeholder(module: str, name: str) -> type[UnpickledObject]:
    return type(name, (UnpickledObject,), {"pickle_global": f"{module}.{name}"})


@cache
def _allowed_globals() -> dict[str, Any]:
    """Globals a checkpoint may reference: tensor rebuilding and plain containers only."""
    allowed: dict[str, Any] = {
        "collections.OrderedDict": OrderedDict,
        "collections.Counter": Counter,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.bytearray": bytearray,
        "builtins.complex": complex,
        "_codecs.encode": _codecs.encode,  # how protocol 2 stores bytes
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch.Tensor": torch.Tensor,
        "torch.nn.parameter.Parameter": nn.Parameter,
        "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
    }
    for fn in (
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
    ):
        if hasattr(torch._utils, fn):
            allowed[f"torch._utils.{fn}"] = getattr(torch._utils, fn)
    # vars() rather than dir()+getattr: the latter can trigger torch's lazy submodule imports.
    for attr, value in vars(torch).items():
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[f"torch.{attr}"] = value
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allowlisted globals and stubs every other one."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_globals().get(f"{module}.{name}")
        if allowed is not None:
            return allowed
        return _placeholder(module, name)


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# torch.load wants a module-like object exposing Unpickler and load.
restricted_pickle = types.ModuleType("adaface_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
restricted_pickle.load = _restricted_load  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- reading


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/constants.pkl") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _format_problem(path: Path) -> str | None:
    """Why path cannot be a torch.save file, judged by its first bytes; None if it may be."""
    with path.open("rb") as f:
        head = f.read(8)
    if not head:
        return "the file is empty"
    # torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (0x80 proto).
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return None
    return f"neither a zip archive nor a pickle (starts with {head!r})"


def read_checkpoint(path: Path | str) -> Any:
    """Unpickle a checkpoint on CPU without executing anything it references."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    problem = _format_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {problem}")
    if _is_torchscript(path):
        raise CheckpointError(
            f"{path} is a TorchScript model, not a checkpoint: pass the AdaFace .ckpt/.pth file"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refuses Lightning's pickled hyper-parameter classes; retry restricted.
        pass
    except Exception as error:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: {_describe(error)}"
        ) from error
    try:
        return torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle
        )
    except Exception as error:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: {_describe(error)}"
        ) from error


def load_backbone_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """Backbone weights from an AdaFace .ckpt (``model.`` keys) or a plain backbone .pth."""
    path = Path(path)
    obj = read_checkpoint(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a checkpoint dict or state_dict"
        )
    state = obj.get("state_dict", obj)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(state).__name__}, not a dict")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    prefixed = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    if prefixed:
        return prefixed
    if any(k.startswith(_BACKBONE_ROOTS) for k in tensors):
        return {k: v for k, v in tensors.items() if not k.startswith("head.")}
    sample = ", ".join(list(tensors)[:5]) or "none"
    raise CheckpointError(
        f"{path} has no backbone weights: expected keys starting with '{MODEL_PREFIX}' "
        f"(AdaFace Lightning .ckpt) or unprefixed backbone keys (input_layer.*, body.*, "
        f"output_layer.*); found {len(tensors)} tensors ({sample})"
    )


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def _arch_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build_model(arch)
    return {k: _shape(v) for k, v in model.state_dict().items()}


def guess_arch(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The arch whose keys and shapes match state_dict exactly, if any."""
    shapes = {k: _shape(v) for k, v in state_dict.items()}
    for arch in ARCHS:
        if _arch_shapes(arch) == shapes:
            return arch
    return None


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor], arch: str, source: str = "checkpoint"
) -> None:
    """Raise CheckpointError naming the first key that keeps a strict load from working."""
    expected = _arch_shapes(arch)
    mismatched = [
        k for k, shape in expected.items() if k in state_dict and _shape(state_dict[k]) != shape
    ]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if not (mismatched or missing or unexpected):
        return
    if mismatched:
        key = mismatched[0]
        first = (
            f"{key} has shape {_shape(state_dict[key])} in the checkpoint "
            f"but {expected[key]} in {arch}"
        )
    elif missing:
        first = f"{missing[0]} is missing from the checkpoint"
    else:
        first = f"{unexpected[0]} in the checkpoint is not a key of {arch}"
    counts = (
        f"{len(mismatched)} shape mismatches, {len(missing)} missing keys, "
        f"{len(unexpected)} unexpected keys"
    )
    guessed = guess_arch(state_dict)
    hint = f"; the weights fit {guessed}" if guessed else ""
    raise CheckpointError(f"{source} does not match {arch}: {first} ({counts}){hint}")


def load_backbone(path: Path | str, arch: str) -> nn.Module:
    """Build arch, load the checkpoint's backbone weights strictly, and return it in eval mode."""
    model = build_model(arch)
    state_dict = load_backbone_state_dict(path)
    check_state_dict(state_dict, arch, source=f"checkpoint {path}")
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


# --------------------------------------------------------------------------- synthetic weights


def random_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random weights for arch (same bytes on every machine for a given seed).

    Scales keep activations finite through the deepest nets: He-normal convs/linears, BN
    weights near 1, small biases and running means, running variances in [0.5, 1.5], PReLU
    slopes 0.25. The last BN of every residual branch gets weights near 0.1 instead of 1:
    with eval-mode BN on made-up running stats nothing renormalises, so unit-scale branches
    grew activations ~3x per block (norms ~1e15 for ir_101) and the SE gates then amplified
    float rounding (channels_last vs NCHW embeddings differed by 0.05 on ir_se_50). Small
    branches keep norms near 100 (trained AdaFace: tens), distinct inputs distinct, and every
    layout within ~3e-7.
    """
    with torch.device("meta"):
        model = build_model(arch)
    branch_ends = set()
    for unit_name, unit in model.body.named_children():
        norms = [n for n, m in unit.res_layer.named_children() if isinstance(m, nn.BatchNorm2d)]
        branch_ends.add(f"body.{unit_name}.res_layer.{norms[-1]}")
    return seeded_weights(model, seed, damped=branch_ends.__contains__)


def seeded_weights(
    model: nn.Module,
    seed: int,
    damped: Callable[[str], bool],
    ones: frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Random values for every entry of a (meta) model's state dict, drawn in key order.

    The scales of random_state_dict; `damped(name)` picks the BNs whose weights are near 0.1
    (each residual branch's last), and the BNs named in `ones` get weights of exactly 1 (a
    frozen layer). Draw order and scales fix the bytes, which golden vectors depend on.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, torch.Tensor] = {}
    for key, meta in model.state_dict().items():
        owner_name, leaf = key.rsplit(".", 1)
        owner = model.get_submodule(owner_name)
        shape = _shape(meta)
        if leaf == "num_batches_tracked":
            out[key] = torch.zeros((), dtype=torch.int64)
            continue
        if leaf == "running_mean":
            values = 0.1 * rng.standard_normal(shape, dtype=np.float32)
        elif leaf == "running_var":
            values = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif isinstance(owner, nn.PReLU):
            values = np.full(shape, 0.25, dtype=np.float32)
        elif isinstance(owner, nn.modules.batchnorm._BatchNorm):
            if leaf == "weight" and owner_name in ones:
                values = np.ones(shape, dtype=np.float32)
            elif leaf == "weight":
                gain = 0.1 if damped(owner_name) else 1.0
                values = (gain * rng.uniform(0.9, 1.1, shape)).astype(np.float32)
            else:
                values = 0.05 * rng.standard_normal(shape, dtype=np.float32)
        elif leaf == "weight":
            fan_in = math.prod(shape[1:])
            values = math.sqrt(2.0 / fan_in) * rng.standard_normal(shape, dtype=np.float32)
        else:
            values = 0.01 * rng.standard_normal(shape, dtype=np.float32)
        out[key] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return out


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adaface_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    path: Path | str,
    num_classes: int = 16,
    *,
    arch: str | None = None,
    seed: int = 0,
) -> Path:
    """Write backbone weights in the layout AdaFace's Lightning training run saves."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    kernel = rng.standard_normal((EMBEDDING_DIM, num_classes), dtype=np.float32)
    kernel /= np.linalg.norm(kernel, axis=0, keepdims=True)
    full: OrderedDict[str, torch.Tensor] = OrderedDict(
        (MODEL_PREFIX + k, v.detach().cpu()) for k, v in state_dict.items()
    )
    # The AdaFace margin head's parameter and EMA buffers; loaders must skip them.
    full["head.kernel"] = torch.from_numpy(kernel)
    full["head.t"] = torch.zeros(1)
    full["head.batch_mean"] = torch.full((1,), 20.0)
    full["head.batch_std"] = torch.full((1,), 100.0)
    checkpoint = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": "1.8.6",
        "state_dict": full,
        "loops": {},
        "callbacks": {},
        "optimizer_states": [],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {
            "arch": arch,
            "head": "adaface",
            "m": 0.4,
            "h": 0.333,
            "s": 64.0,
            "t_alpha": 0.01,
            "num_classes": num_classes,
            "note": "random untrained weights made by adaface-serving for tests",
        },
    }
    _atomic_torch_save(checkpoint, path)
    return path
